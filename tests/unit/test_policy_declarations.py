"""Every policy key is declared once, on the field it fills, and everything else is derived from it."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.errors import PolicyError
from proxy.policy import model, values
from proxy.policy.declare import DERIVED, KEY, Scope, declarations, undeclared_fields
from proxy.policy.load import parse_policy
from proxy.policy.schema import SECTION_CLASSES, policy_schema, reference_table

ROOT = Path(__file__).resolve().parents[2]
MODEL_CLASSES = sorted(
    {
        cls
        for module in (model, values)
        for cls in vars(module).values()
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__
    },
    key=lambda cls: cls.__name__,
)


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_every_model_field_is_a_declared_key_or_says_what_it_is_derived_from(cls):
    assert undeclared_fields(cls) == [], f"{cls.__name__}: declare these fields with key() or derived()"
    for item in dataclasses.fields(cls):
        if DERIVED in item.metadata:
            assert item.metadata[DERIVED], f"{cls.__name__}.{item.name}: say what it is derived from"


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_a_class_with_keys_is_a_section_the_schema_and_the_loader_know(cls):
    has_keys = any(KEY in item.metadata for item in dataclasses.fields(cls))
    assert has_keys == (cls in SECTION_CLASSES)


@pytest.mark.parametrize("cls", SECTION_CLASSES, ids=lambda cls: cls.__name__)
def test_every_key_has_help_a_scope_and_one_name(cls):
    names = [declared.key.name for declared in declarations(cls)]
    assert len(names) == len(set(names))
    for declared in declarations(cls):
        assert declared.key.help and declared.key.scopes, declared.key.name
        assert re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)?", declared.key.name)


#: A valid value of each kind that differs from every default, and what it reads as.
EXAMPLES = {
    "size": ("2KiB", 2048),
    "duration": ("3s", 3.0),
    "rate": ("7/s", 7.0),
    "byte rate": ("1KiB/s", 1024.0),
    "whole number": (64, 64),
    "close / drop": ("drop", "drop"),
}
LIMITS = declarations(model.Limits)


@pytest.mark.parametrize("declared", LIMITS, ids=lambda declared: declared.key.name)
def test_every_limit_key_is_read_into_its_field_where_it_is_allowed(declared):
    text, expected = EXAMPLES[declared.key.kind.name]
    policy = parse_policy(
        yaml.safe_dump(
            {
                "version": 1,
                "limits": {declared.key.name: text},
                "routes": [{"path": "/a", "upstream": "ws://x/", "auth": "none"}],
            }
        )
    )
    assert getattr(policy.limits, declared.field_name) == expected
    assert getattr(policy.routes[0].limits, declared.field_name) == expected
    on_route = yaml.safe_dump(
        {
            "version": 1,
            "routes": [
                {"path": "/a", "upstream": "ws://x/", "auth": "none", "limits": {declared.key.name: text}},
                {"path": "/b", "upstream": "ws://x/", "auth": "none"},
            ],
        }
    )
    if Scope.ROUTE not in declared.key.scopes:
        with pytest.raises(
            PolicyError, match=rf":\d+: routes\[0\]\.limits\.{declared.key.name}: is policy-wide"
        ):
            parse_policy(on_route)
        return
    policy = parse_policy(on_route)
    assert getattr(policy.routes[0].limits, declared.field_name) == expected
    assert declared.field_name in policy.routes[0].own_limits
    assert getattr(policy.routes[1].limits, declared.field_name) == declared.default
    assert not policy.routes[1].own_limits


def test_defaults_are_the_declared_ones():
    policy = parse_policy("version: 1\nroutes: [{path: /a, upstream: 'ws://x/', auth: none}]\n")
    assert policy.limits == model.Limits()
    assert policy.listen.address == values.Address("0.0.0.0", 8080)
    assert policy.admin == values.Address("127.0.0.1", 9090)


# -- the JSON Schema ---------------------------------------------------------------------------------

VALIDATOR = jsonschema.Draft202012Validator(policy_schema())


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(policy_schema())
    assert policy_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_policy_validates_against_the_schema(path):
    errors = [error.message for error in VALIDATOR.iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


def test_the_kubernetes_policy_validates_against_the_schema():
    documents = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    configmap = next(document for document in documents if document["kind"] == "ConfigMap")
    assert list(VALIDATOR.iter_errors(yaml.safe_load(configmap["data"]["policy.yaml"]))) == []


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda doc: doc["limits"].update(max_mesage_size="1MiB"), "max_mesage_size"),
        (lambda doc: doc["routes"][0].update(upstrem="ws://x/"), "upstrem"),
        (lambda doc: doc["routes"][0].setdefault("limits", {}).update(drain_timeout="1s"), "drain_timeout"),
        (lambda doc: doc["auth"]["corp"].update(algorithm=["RS256"]), "algorithm"),
        (lambda doc: doc["limits"].update(idle_timeout="10 minutes"), "10 minutes"),
        (lambda doc: doc["routes"][0].update(match="regex"), "regex"),
        (lambda doc: doc.update(versoin=1), "versoin"),
    ],
    ids=["limit", "route", "policy-wide-on-route", "provider", "unit", "choice", "top"],
)
def test_a_misspelt_or_misplaced_key_fails_the_schema(edit, where):
    document = yaml.safe_load((ROOT / "policies" / "secure.yaml").read_text())
    edit(document)
    errors = list(VALIDATOR.iter_errors(document))
    assert errors, f"{where} was accepted by the schema"
    assert any(where in json.dumps(error.instance) or where in error.message for error in errors)


def test_readme_carries_the_generated_policy_reference():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- policy-reference:start -->\n", "<!-- policy-reference:end -->"
    assert start in readme and end in readme
    block = readme.split(start, 1)[1].split(end, 1)[0]
    assert block.strip() == reference_table().strip(), "regenerate it with: wsgate schema --format markdown"


def test_an_empty_algorithm_list_is_refused_by_the_loader_as_by_the_schema(monkeypatch):
    monkeypatch.setenv("WSGATE_DECLARATION_SECRET", "x" * 40)
    document = {
        "version": 1,
        "auth": {"p": {"secret_env": "WSGATE_DECLARATION_SECRET", "algorithms": []}},
        "routes": [{"path": "/a", "upstream": "ws://x/", "auth": "p"}],
    }
    with pytest.raises(PolicyError, match=r"auth\.p\.algorithms: name at least one algorithm"):
        parse_policy(yaml.safe_dump(document))
    assert not VALIDATOR.is_valid(document)


ROUTE = "routes: [{path: /a, upstream: 'ws://x/', auth: none}]\n"


@pytest.mark.parametrize("text", ["9" * 400 + "s", "9" * 400 + "/s"], ids=["duration", "rate"])
def test_an_absurd_duration_or_rate_is_a_policy_error(text):
    key = "idle_timeout" if text.endswith("s") and "/" not in text else "handshakes_per_ip"
    with pytest.raises(PolicyError, match=rf"limits\.{key}: .* too"):
        parse_policy(f"version: 1\nlimits: {{{key}: '{text}'}}\n" + ROUTE)


def test_the_committed_schema_is_the_generated_one():
    committed = json.loads((ROOT / "docs" / "policy.schema.json").read_text())
    assert committed == policy_schema(), "regenerate it with: wsgate schema > docs/policy.schema.json"


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_policy_names_the_schema_for_editors(path):
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../docs/policy.schema.json"
    assert (path.parent / "../docs/policy.schema.json").resolve().is_file()
