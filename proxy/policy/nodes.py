"""The YAML node walker: every value keeps its line, so every error says ``file:line: key.path: message``.

Policy files are composed into nodes (not loaded into dicts); :class:`Section` checks a mapping's keys (no
duplicates, no unknown keys, with a "did you mean" hint) and :meth:`Source.fail` raises the one error type
the loader has, :class:`~proxy.errors.PolicyError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from proxy.errors import PolicyError

T = TypeVar("T")
D = TypeVar("D")

#: What reads one value: ``(source, node, key path) -> value``, raising :class:`PolicyError` through
#: :meth:`Source.fail` when the value does not fit.
Reader = Callable[["Source", yaml.Node, str], Any]


class Source:
    """The file being read: where errors point and relative paths start.

    ``require_secrets`` is False for ``wsgate check`` and ``wsgate explain``: a secret's environment
    variable that is not set is then recorded in :attr:`warnings` instead of refusing the file.
    """

    def __init__(self, file: Path | None, require_secrets: bool = True) -> None:
        self.file = file
        self.name = str(file) if file is not None else "<policy>"
        self.base = file.parent if file is not None else Path.cwd()
        self.require_secrets = require_secrets
        self.warnings: list[str] = []

    def where(self, node: yaml.Node | None, path: str, message: str) -> str:
        """``file:line: key.path: message``, as :class:`PolicyError` renders it."""
        line = node.start_mark.line + 1 if node is not None else None
        return str(PolicyError(self.name, line, path, message))

    def fail(self, node: yaml.Node | None, path: str, message: str) -> NoReturn:
        line = node.start_mark.line + 1 if node is not None else None
        raise PolicyError(self.name, line, path, message)

    def warn(self, node: yaml.Node | None, path: str, message: str) -> None:
        self.warnings.append(self.where(node, path, message))


def scalar(node: yaml.Node) -> Any:
    """The value of a YAML node as the safe loader builds it.

    Raises:
        yaml.constructor.ConstructorError: the node's explicit tag does not fit its value (``!!timestamp
            soon``, ``!!bool maybe``, ``!!int`` with no value), with the node's line. PyYAML's
            constructors raise whatever their parsing raised (AttributeError, IndexError, KeyError...).
    """
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except (AttributeError, LookupError, TypeError, ValueError, ArithmeticError):
        shown = f" {node.value!r}" if isinstance(node, yaml.ScalarNode) else ""
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read{shown} as {tag}", node.start_mark
        ) from None


def scalar_or_none(node: yaml.Node) -> Any:
    """The value of a scalar node, or None for a list or mapping."""
    return scalar(node) if isinstance(node, yaml.ScalarNode) else None


class Section:
    """A YAML mapping with its keys checked: no duplicates, no unknown keys."""

    def __init__(self, source: Source, node: yaml.Node, path: str, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        if not isinstance(node, yaml.MappingNode):
            source.fail(node, path, "expected a mapping")
        self.source = source
        self.node = node
        self.path = path
        self.items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                source.fail(key_node, path, "keys must be strings")
            if key in self.items:
                first = self.items[key][0].start_mark.line + 1
                source.fail(key_node, self.child(key), f"duplicate key {key!r} (first at line {first})")
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                source.fail(
                    key_node, self.child(key),
                    f"unknown key {key!r}{suggestion}; expected one of: {', '.join(sorted(allowed))}",
                )  # fmt: skip
            self.items[key] = (key_node, value_node)

    def child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def node_of(self, key: str) -> yaml.Node:
        return self.items[key][1]

    def key_node(self, key: str) -> yaml.Node:
        return self.items[key][0]

    def get(self, key: str, read: Callable[[Source, yaml.Node, str], T], default: D) -> T | D:
        """The value of ``key`` read with ``read``, or ``default`` when absent."""
        if key not in self.items:
            return default
        return read(self.source, self.items[key][1], self.child(key))

    def fail(self, key: str, message: str) -> NoReturn:
        """Refuse the value of ``key`` (or the section itself, when ``key`` is absent)."""
        if key in self.items:
            self.source.fail(self.items[key][1], self.child(key), message)
        self.source.fail(self.node, self.path, message)


def items(source: Source, node: yaml.Node, path: str) -> Iterator[tuple[yaml.Node, str]]:
    """The elements of a YAML list, each with its path (``routes[2]``)."""
    if not isinstance(node, yaml.SequenceNode):
        source.fail(node, path, "expected a list")
    for index, item in enumerate(node.value):
        yield item, f"{path}[{index}]"
