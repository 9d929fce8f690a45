"""The policy's JSON Schema (draft 2020-12) and its reference table, both built from the declarations.

``wsgate schema`` prints the schema, so editors check a policy as it is typed (yaml-language-server reads
``# yaml-language-server: $schema=<file or URL>`` at the top of a YAML file); ``wsgate schema --format
markdown`` prints the reference table the README carries. The loader remains the authority: it also checks
files, environment variables and what spans several keys, which a schema cannot.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proxy.policy.declare import Declared, Kind, Scope, declarations
from proxy.policy.model import (
    AuthProvider,
    CertificatePair,
    Compression,
    Firewall,
    ForwardClientCertificate,
    HealthCheck,
    LimiterSettings,
    Limits,
    Listen,
    LogSettings,
    MessageRules,
    Policy,
    RedisLimiter,
    Revocation,
    Route,
    TlsListen,
    UpstreamPool,
    UpstreamTls,
)

#: Every class whose fields are policy keys.
SECTION_CLASSES: tuple[type, ...] = (
    Policy,
    Listen,
    TlsListen,
    CertificatePair,
    Limits,
    Route,
    ForwardClientCertificate,
    UpstreamPool,
    HealthCheck,
    UpstreamTls,
    Compression,
    MessageRules,
    Firewall,
    AuthProvider,
    Revocation,
    LogSettings,
    LimiterSettings,
    RedisLimiter,
)

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def key_names(cls: type) -> set[str]:
    """Every YAML key name ``cls`` declares, the parts of dotted names included."""
    return {part for declared in declarations(cls) for part in declared.key.name.split(".")}


def _allowed(declared: Declared, scope: Scope | None) -> bool:
    return scope is None or scope in declared.key.scopes


def _description(declared: Declared) -> str:
    default = declared.default_text
    if declared.key.required and "." not in declared.key.name:
        return f"{declared.key.help} (required)"
    return f"{declared.key.help} (default: {default})" if default else declared.key.help


def _value_schema(kind: Kind, declared: Declared, defs: dict[str, Any]) -> dict[str, Any]:
    if kind.section is None:
        schema = dict(kind.schema)
        key = declared.key
        if schema.get("type") == "integer":
            if key.minimum is not None:
                schema["minimum"] = key.minimum
            if key.maximum is not None:
                schema["maximum"] = key.maximum
        return schema
    name = kind.section.__name__ + (f"_{kind.scope.name.lower()}" if kind.scope is not None else "")
    if name not in defs:
        defs[name] = {}  # reserved first: a section may (some day) hold itself
        defs[name] = _object(kind.section, kind.scope, defs)
    reference: dict[str, Any] = {"$ref": f"#/$defs/{name}"}
    if kind.schema:  # a short form besides the mapping (``upstream: URL``)
        return {"anyOf": [dict(kind.schema), reference]}
    if kind.many == "list":
        return {"type": "array", "items": reference, "minItems": 1}
    if kind.many == "map":
        return {"type": "object", "additionalProperties": reference}
    return reference


def _object(cls: type, scope: Scope | None, defs: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    nested: dict[str, dict[str, Any]] = {}
    for declared in declarations(cls):
        if not _allowed(declared, scope):
            continue
        first, _, rest = declared.key.name.partition(".")
        schema = _value_schema(declared.key.kind, declared, defs)
        schema["description"] = _description(declared)
        if rest:
            holder = nested.setdefault(
                first, {"type": "object", "properties": {}, "additionalProperties": False}
            )
            holder["properties"][rest] = schema
            if declared.key.required:
                holder.setdefault("required", []).append(rest)
            continue
        properties[first] = schema
        if declared.key.required:
            required.append(first)
    properties.update(nested)
    result: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        result["required"] = required
    if cls.__doc__:
        result["description"] = " ".join(cls.__doc__.split("\n\n")[0].split())
    return result


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file, version 1."""
    defs: dict[str, Any] = {}
    root = _object(Policy, None, defs)
    root["title"] = "wsgate policy, version 1"
    return {"$schema": DRAFT, **root, "$defs": defs}


# -- the reference table ----------------------------------------------------------------------------


def _rows(
    cls: type, prefix: str, scope: Scope | None, seen: dict[tuple[type, Scope | None], str]
) -> Iterator[str]:
    seen[cls, scope] = prefix.rstrip(".")
    for declared in declarations(cls):
        if not _allowed(declared, scope):
            continue
        key, kind = declared.key, declared.key.kind
        path = prefix + key.name
        if kind.many == "list":
            path += "[]"
        elif kind.many == "map":
            path += ".NAME"
        if kind.section is not None:
            same = seen.get((kind.section, kind.scope))
            if same is not None or (kind.section is Limits and kind.scope is Scope.ROUTE):
                keys = "the keys of `limits` marked per route" if same is None else f"the keys of `{same}`"
                where = _where(declared)
                yield f"| `{path}` | mapping | {declared.default_text} | {where} | {key.help}: {keys} |"
                continue
            if kind.schema:  # a short form besides the mapping: the key has a row of its own
                yield f"| `{path}` | {kind.name} | {_required(declared)} | {_where(declared)} | {key.help} |"
            yield from _rows(kind.section, path + ".", kind.scope, seen)
            continue
        default = declared.default_text
        if key.required:
            parent = key.name.partition(".")[0] if "." in key.name else ""
            default = f"{default} (required in `{prefix}{parent}`)" if parent else "(required)"
        where, what = _where(declared), _bounds(declared) + key.help
        yield f"| `{path}` | {kind.name} | {default} | {where} | {what} |"


def _required(declared: Declared) -> str:
    return "(required)" if declared.key.required else declared.default_text


def _where(declared: Declared) -> str:
    scopes = declared.key.scopes
    if scopes == {Scope.POLICY, Scope.ROUTE}:
        return "policy-wide, per route"
    return ", ".join(scope.value for scope in Scope if scope in scopes)


def _bounds(declared: Declared) -> str:
    key = declared.key
    return f"{key.bounds.removeprefix('must be ')}; " if key.bounds else ""


def reference_table() -> str:
    """Every policy key as one Markdown table: path, kind, default, where it may appear, what it does."""
    header = ["| key | kind | default | where | what it does |", "| --- | --- | --- | --- | --- |"]
    return "\n".join([*header, *_rows(Policy, "", None, {})]) + "\n"
