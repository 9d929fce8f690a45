"""Loader answers kept from before the keys were declared on the model: the same file, the same verdict."""

from __future__ import annotations

import pytest

from proxy.errors import PolicyError
from proxy.policy.load import parse_policy

ROUTES = "routes: [{path: /a, upstream: 'ws://x/', auth: none}]\n"


def test_an_empty_admin_section_is_still_refused_for_its_missing_address() -> None:
    with pytest.raises(PolicyError, match=r"^<policy>:2: admin: missing 'address'$"):
        parse_policy("version: 1\nadmin: {}\n" + ROUTES)


def test_version_true_is_read_as_before() -> None:
    # YAML's true equals 1, and was always read as version 1
    parse_policy("version: true\n" + ROUTES)


@pytest.mark.parametrize("text", ["9" * 400 + "KiB", "9" * 400 + "B"])
def test_an_absurd_size_is_a_policy_error_not_an_overflow(text: str) -> None:
    with pytest.raises(PolicyError, match="max_message_size"):
        parse_policy(f"version: 1\nlimits: {{max_message_size: {text}}}\n" + ROUTES)
