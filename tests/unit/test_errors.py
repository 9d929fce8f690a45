"""The error tree, rejections as values and exceptions, and the close verdicts."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

import proxy
from proxy import errors
from proxy.errors import (
    TOKEN_EXPIRED,
    Close,
    CloseCode,
    MessageTooBig,
    PeerError,
    ProtocolError,
    Rejection,
    RejectionTemplate,
    RuleBroken,
    WsgateError,
)
from proxy.rules import Rule, Violation


def _product_exceptions() -> list[type[BaseException]]:
    found = []
    for module_info in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if module_info.name in ("proxy.__main__",):
            continue
        module = importlib.import_module(module_info.name)
        for _name, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__.startswith("proxy."):
                found.append(value)
    return found


def test_every_exception_of_the_product_is_in_the_one_tree_in_errors_py() -> None:
    exceptions = set(_product_exceptions())
    assert exceptions, "the walk found no exception class"
    assert all(issubclass(error, WsgateError) for error in exceptions)
    assert {error.__module__ for error in exceptions} == {"proxy.errors"}


def _drawn_tree() -> dict[str, str]:
    """Each class name drawn in errors.py's docstring, with the name drawn as its parent."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped.startswith("WsgateError"):
            stack = [(line.index("W"), "WsgateError")]
        elif stack and "── " in line:
            column = line.index("── ") + 3
            name = line[column:].split()[0]
            while stack[-1][0] >= column:
                stack.pop()
            parents[name] = stack[-1][1]
            stack.append((column, name))
    return parents


def test_the_tree_drawn_in_the_docstring_is_the_tree_in_the_code() -> None:
    drawn = _drawn_tree()
    in_code = {error.__name__: error.__mro__[1].__name__ for error in _product_exceptions()}
    del in_code["WsgateError"]
    assert drawn == in_code


def test_a_rejection_is_an_exception_with_its_values_in_args() -> None:
    rejection = Rejection(429, "rate_limited", "slow down", (("Retry-After", "1"),))
    assert rejection.args == (429, "rate_limited", "slow down", (("Retry-After", "1"),))
    assert (rejection.status, rejection.reason, rejection.detail) == (429, "rate_limited", "slow down")
    assert rejection.headers == (("Retry-After", "1"),)
    assert str(rejection) == "429 rate_limited: slow down"
    assert str(Rejection(404, "no_route")) == "404 no_route"
    assert pickle.loads(pickle.dumps(rejection)) == rejection


def test_rejections_compare_by_value() -> None:
    assert Rejection(400, "bad_request", "x") == Rejection(400, "bad_request", "x")
    assert Rejection(400, "bad_request", "x") != Rejection(400, "bad_request", "y")
    assert len({Rejection(400, "bad_request"), Rejection(400, "bad_request")}) == 1


def test_a_rejection_template_makes_a_fresh_rejection_per_use() -> None:
    template = RejectionTemplate(503, "draining", "shutting down", (("Retry-After", "1"),))
    first, second = template(), template()
    assert first == second == Rejection(503, "draining", "shutting down", (("Retry-After", "1"),))
    assert first is not second
    with pytest.raises(Rejection) as raised:
        raise first
    assert raised.value.__traceback__ is not None
    assert second.__traceback__ is None  # what one raise collected is not on the next use


def test_peer_errors_carry_their_close_code_and_reason() -> None:
    assert (ProtocolError("bad frame").code, ProtocolError("bad frame").reason) == (1002, "bad frame")
    assert ProtocolError("bad reason", CloseCode.INVALID_DATA).code == 1007
    too_big = MessageTooBig("message larger than 10 bytes")
    assert (too_big.code, str(too_big)) == (1009, "message larger than 10 bytes")
    violation = Violation(Rule.RATE, CloseCode.POLICY_VIOLATION, "rate limit exceeded", drop=False)
    broken = RuleBroken(violation)
    assert (broken.code, broken.reason, broken.violation) == (1008, "rate limit exceeded", violation)
    assert all(isinstance(error, PeerError) for error in (too_big, broken, ProtocolError("x")))


def test_close_verdicts_are_code_and_reason() -> None:
    assert Close(CloseCode.POLICY_VIOLATION, "token expired") == TOKEN_EXPIRED
    code, reason = TOKEN_EXPIRED
    assert (code, reason) == (1008, "token expired")
    verdicts = [value for value in vars(errors).values() if isinstance(value, Close)]
    assert len(verdicts) >= 10
    assert all(isinstance(verdict.code, CloseCode) and verdict.reason for verdict in verdicts)


def test_rule_values_are_the_metric_labels() -> None:
    assert [rule.value for rule in Rule] == ["type", "rate", "size", "utf8", "json", "schema"]
    assert {Rule.TYPE: 1} == {"type": 1}  # counters keyed by Rule read like the labels
