"""Whatever YAML it is given, the policy loader answers with a policy or a PolicyError, never another
exception: random documents made of the policy's own keys, and the example policies mutated at random,
as structures and as text."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import PolicyError
from proxy.policy.load import parse_policy
from proxy.policy.schema import SECTION_CLASSES, key_names

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {path.name: path for path in sorted((ROOT / "policies").glob("*.yaml"))}
#: Bounded so the suite stays quick; a deeper hunt raises max_examples by hand.
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = sorted(
    {name for cls in SECTION_CLASSES for name in key_names(cls)}
    | {"allow", "deny", "main", "corp", "scope", "sub"}
)
#: Values close to valid ones: units, URLs, CIDRs, addresses, enum words, and their near misses.
WORDS = [
    "5s", "0", "0s", "-1s", "1d", "1MiB", "1.5B", "9999999999GiB", "10/s", "0/s", "1MiB/s", "ws://x/",
    "wss://h:99999/", "ws://[::1]:80/p", "ws://x#f", "ws://u:p@x/", "http://x", "ws://", "none", "/a", "/",
    "a?b", "10.0.0.0/8", "::/0", "10.0.0.300/8", "127.0.0.1:0", "[::1]:80", ":80", "x:", "::1:80", "HS256",
    "RS256", "EdDSA", "header", "subprotocol", "text", "binary", "close", "drop", "allow", "deny", "1.3",
    "https://*.example.com", "https://x:99999", "https://*", "prefix", "exact", "debug", "json", "",
    "missing.pem", "WSGATE_PROPERTY_SECRET", "https://login.example.com/jwks", "1e309", "nan", "maybe",
    "127.0.0.1:9090", "0.0.0.0:8080", "2026-13-45",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.sampled_from(KEYS),
)
keys = st.one_of(st.sampled_from(KEYS), st.integers(), st.none(), st.booleans(), st.sampled_from(WORDS))
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=15,
)


def only_policy_errors(text: str, source: Path | None = None) -> None:
    with contextlib.suppress(PolicyError):
        parse_policy(text, source)


@pytest.fixture(autouse=True, scope="module")
def hmac_secret() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WSGATE_PROPERTY_SECRET", "s" * 32)
        yield


@SETTINGS
@given(document=st.dictionaries(keys, values, max_size=10), versioned=st.booleans())
def test_random_documents_of_policy_keys_are_policies_or_policy_errors(document, versioned):
    if versioned:
        document["version"] = 1
    only_policy_errors(yaml.safe_dump(document, allow_unicode=True))


def positions(node: Any, found: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in a loaded YAML document."""
    if isinstance(node, dict):
        for key in list(node):
            found.append((node, key))
            positions(node[key], found)
    elif isinstance(node, list):
        for index in range(len(node)):
            found.append((node, index))
            positions(node[index], found)
    return found


@SETTINGS
@given(example=st.sampled_from(sorted(EXAMPLES)), data=st.data())
def test_mutated_example_policies_are_policies_or_policy_errors(example, data):
    document = copy.deepcopy(yaml.safe_load(EXAMPLES[example].read_text()))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        found = positions(document, [])
        if not found:
            break
        container, key = data.draw(st.sampled_from(found))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            container[key] = data.draw(values)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[data.draw(st.sampled_from(KEYS))] = data.draw(values)
        else:
            container.append(data.draw(values))
    only_policy_errors(yaml.safe_dump(document, allow_unicode=True), EXAMPLES[example])


#: YAML syntax that changes what a value means: anchors, aliases, tags, merges, flow and block markers.
TOKENS = [
    "&a ", "*a", "!!binary ", "!!timestamp ", "!!set ", "!!int ", "!!bool ", "!!float ", "!!null ", "!!omap ",
    "!!str ", "!!python/tuple ", "!custom ", "<<: *a", "[", "]", "{", "}", ": ", "- ", "? ", "|", ">", "#",
    "'", '"', "\t", "\n", "\n  ", "%YAML 1.1\n---\n", "...", "---", "\x00", "\ufeff", "~", "0x1F", "1_000",
]  # fmt: skip


@settings(SETTINGS, max_examples=400)
@given(example=st.sampled_from(sorted(EXAMPLES)), data=st.data())
def test_example_policies_edited_as_text_are_policies_or_policy_errors(example, data):
    """Values rewritten (a tag, an anchor, a near-miss word in place of what was there) and bytes inserted."""
    lines = EXAMPLES[example].read_text().splitlines()
    values = [index for index, line in enumerate(lines) if ": " in line and not line.lstrip().startswith("#")]
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        index = data.draw(st.sampled_from(values))
        key, _, _ = lines[index].partition(": ")
        tag = data.draw(st.sampled_from(["", *TOKENS]))
        lines[index] = f"{key}: {tag}{data.draw(st.sampled_from(WORDS))}"
    text = "\n".join(lines) + "\n"
    for _ in range(data.draw(st.integers(min_value=0, max_value=3))):
        position = data.draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:position] + data.draw(st.sampled_from(TOKENS)) + text[position:]
    only_policy_errors(text, EXAMPLES[example])
