"""Loader behaviour the declared-keys rewrite must keep, and the schema's agreement with the loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from jsonschema import Draft202012Validator

from proxy.errors import PolicyError
from proxy.policy.load import parse_policy

ROUTES = "routes: [{path: /a, upstream: 'ws://x/', auth: none}]\n"


def test_an_empty_admin_section_is_still_refused_for_its_missing_address() -> None:
    # a9e4af3: "<policy>:2: admin: missing 'address'", as an empty listen section still is
    with pytest.raises(PolicyError, match=r"^<policy>:2: admin: missing 'address'$"):
        parse_policy("version: 1\nadmin: {}\n" + ROUTES)


def test_version_true_is_read_as_before() -> None:
    # a9e4af3 accepted it (YAML true == 1); refusing it now is a silent behaviour change
    parse_policy("version: true\n" + ROUTES)


@pytest.mark.parametrize("text", ["9" * 400 + "KiB", "9" * 400 + "B"])
def test_an_absurd_size_is_a_policy_error_not_an_overflow(text: str) -> None:
    with pytest.raises(PolicyError, match="max_message_size"):
        parse_policy(f"version: 1\nlimits: {{max_message_size: {text}}}\n" + ROUTES)


def test_the_schema_accepts_what_the_loader_accepts_for_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGATE_REVIEW_SECRET", "x" * 40)
    text = (
        "version: 1\nauth: {p: {secret_env: WSGATE_REVIEW_SECRET, algorithms: []}}\n"
        "routes: [{path: /a, upstream: 'ws://x/', auth: p}]\n"
    )
    schema = json.loads(
        subprocess.run(
            [sys.executable, "-m", "proxy", "schema"], check=True, capture_output=True, text=True
        ).stdout
    )
    loader_accepts = True
    try:
        parse_policy(text)
    except PolicyError:
        loader_accepts = False
    schema_accepts = not list(Draft202012Validator(schema).iter_errors(yaml.safe_load(text)))
    assert loader_accepts == schema_accepts
