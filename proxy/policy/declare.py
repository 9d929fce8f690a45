"""Each policy key declared once, on the model field it fills.

A field of a policy section (:mod:`proxy.policy.model`) is either a **key** -- its YAML name, its kind (how
the value is read, shown and described in JSON Schema), its default (the field's own), its bounds, one line
of help and where it may appear -- or **derived** from other keys, saying from what. The loader, ``wsgate
check``, ``wsgate schema`` and the README's policy reference all read these declarations, so a key added
to the model is read, validated, documented and schema-checked without another list to update.

The JSON Schema is a draft 2020-12 document; the loader stays the authority (it knows files, environment
variables and cross-key rules) and the schema is what editors check as a policy is typed.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.policy.nodes import Reader

KEY = "wsgate.key"
DERIVED = "wsgate.derived"


class Scope(enum.Enum):
    """Where a key may appear."""

    POLICY = "policy-wide"
    ROUTE = "per route"
    PROVIDER = "per provider"


POLICY = frozenset({Scope.POLICY})
ROUTE = frozenset({Scope.ROUTE})
PROVIDER = frozenset({Scope.PROVIDER})
POLICY_AND_ROUTE = frozenset({Scope.POLICY, Scope.ROUTE})


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list | frozenset):
        return "[" + ", ".join(_shown(item) for item in value) + "]" if value else ""
    return str(value)


@dataclass(frozen=True)
class Kind:
    """How a value of one kind is read from YAML, shown in the reference, and described in JSON Schema.

    A kind with ``section`` set is a nested mapping declared by that class; ``many`` makes it a list
    (``list``) or a mapping of names (``map``) of such sections; ``scope`` picks which of the section's
    keys apply there (a route's ``limits`` take the per-route ones).
    """

    name: str
    read: Reader | None = None
    schema: Mapping[str, Any] = field(default_factory=dict)
    show: Callable[[Any], str] = _shown
    section: type | None = None
    many: str | None = None
    scope: Scope | None = None


@dataclass(frozen=True)
class Key:
    """One policy key: everything the loader, the schema and the reference need to know about it."""

    name: str
    kind: Kind
    help: str
    scopes: frozenset[Scope]
    #: The key must be present; a dotted key (``admin.address``) only when its parent mapping is.
    required: bool = False
    #: Said after "missing 'name'" when a required key is absent.
    hint: str = ""
    #: Inclusive bounds on the read value (bytes, seconds, a count), and what is said when outside them.
    minimum: float | None = None
    maximum: float | None = None
    bounds: str = ""
    #: A further rule on the read value: returns the error message, or None.
    check: Callable[[Any], str | None] | None = None
    #: Shown in the reference instead of the field's default (a computed or environment-dependent one).
    default_text: str | None = None
    #: Said when the key appears where its scopes do not allow it.
    misplaced: str = ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with a read value, or None."""
        if self.minimum is not None and value < self.minimum:
            return self.bounds or f"must be at least {self.minimum:g}"
        if self.maximum is not None and value > self.maximum:
            return self.bounds or f"must be at most {self.maximum:g}"
        return self.check(value) if self.check is not None else None


def key(
    default: Any = dataclasses.MISSING,
    *,
    kind: Kind,
    help: str,
    scopes: frozenset[Scope],
    name: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    **options: Any,
) -> Any:
    """A dataclass field declared as a policy key (``name`` defaults to the field's name)."""
    metadata = {KEY: (name, kind, help, scopes, options)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def derived(source: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field the loader computes from other keys (``source`` says from what)."""
    return field(default=default, metadata={DERIVED: source}, **kwargs)


@dataclass(frozen=True)
class Declared:
    """A key as declared on one field, with the field's name and default."""

    field_name: str
    key: Key
    default: Any

    @property
    def default_text(self) -> str:
        if self.key.default_text is not None:
            return self.key.default_text
        if self.default is dataclasses.MISSING or self.default is None:
            return ""
        return self.key.kind.show(self.default)


def declarations(cls: type) -> list[Declared]:
    """The keys declared by a section class, in field order."""
    found = []
    for item in dataclasses.fields(cls):
        declared = item.metadata.get(KEY)
        if declared is None:
            continue
        name, kind, help_text, scopes, options = declared
        default = item.default
        if item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        found.append(Declared(item.name, Key(name or item.name, kind, help_text, scopes, **options), default))
    return found


def undeclared_fields(cls: type) -> list[str]:
    """Fields of ``cls`` that are neither a key nor derived: what the declaration test refuses."""
    return [
        item.name
        for item in dataclasses.fields(cls)
        if KEY not in item.metadata and DERIVED not in item.metadata
    ]
