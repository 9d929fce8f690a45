"""Per-message rules the relay applies to one direction: type, rate, UTF-8, JSON, schema.

A :class:`MessageChecker` is built once per session direction from the frozen policy objects. The frame core
(:mod:`proxy.protocol`) asks it at each frame header -- :meth:`~MessageChecker.start` for a message's first
frame, :meth:`~MessageChecker.more` for a continuation, :meth:`~MessageChecker.control` for a ping, pong or
close -- and, for a message it gathered whole, :meth:`~MessageChecker.content`. Each answer is ``None``
(pass) or a :class:`Violation`, made once per checker and only counted when returned, so the per-message
path allocates nothing.

A message is admitted or refused at its first frame: its later fragments are charged to the byte bucket and
may refuse it ("close" mode) or put the bucket in debt ("drop" mode: half a message already forwarded
cannot be dropped).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from functools import lru_cache
from typing import Any, Final

import fastjsonschema

from proxy.errors import CloseCode
from proxy.policy.model import MessageRate, MessageRules

_TEXT: Final = 1


@lru_cache(maxsize=64)
def _compiled(schema_json: str) -> Callable[[Any], Any]:
    return fastjsonschema.compile(json.loads(schema_json))


def compile_schema(schema: dict[str, object]) -> Callable[[Any], Any]:
    """A fast validator for a JSON Schema document (compiled once per distinct schema)."""
    return _compiled(json.dumps(schema, sort_keys=True))


class Rule(StrEnum):
    """The per-message rules a message can break; each value is the ``rule`` label of
    ``wsgate_message_violations`` (a string users scrape: never rename one)."""

    #: A text or binary message where the route allows only the other type (1003).
    TYPE = "type"
    #: Over the message or byte rate (1008, or the message dropped).
    RATE = "rate"
    #: Over ``max_message_bytes`` or ``max_fragments`` (1009): found by the frame core, not a checker.
    SIZE = "size"
    #: Text that is not UTF-8 (1007).
    UTF8 = "utf8"
    #: Text that is not JSON where the route wants JSON (1007).
    JSON = "json"
    #: A JSON document the route's schema refuses (1008).
    SCHEMA = "schema"


class Violation:
    """A broken rule: which one, the close code and reason the offender gets, and whether the message is
    dropped (and the session kept) instead."""

    __slots__ = ("code", "drop", "reason", "rule")

    def __init__(self, rule: Rule, code: int, reason: str, drop: bool) -> None:
        self.rule = rule
        self.code = code
        self.reason = reason[:123]
        self.drop = drop

    def __repr__(self) -> str:
        return f"Violation({self.rule.value!r}, {self.code}, {self.reason!r}, drop={self.drop})"


class MessageChecker:
    """The rules of one direction of one session, with its rate buckets and violation counters."""

    __slots__ = (
        "_binary_refused",
        "_byte_burst",
        "_byte_tokens",
        "_bytes_per_second",
        "_json",
        "_last",
        "_message_burst",
        "_message_tokens",
        "_messages_per_second",
        "_rate",
        "_schema",
        "_text_refused",
        "_types",
        "_utf8",
        "drop",
        "dropped",
        "gathers_text",
        "rate_drop",
        "utf8_text",
        "violations",
    )

    def __init__(self, rules: MessageRules, rate: MessageRate | None, now: float) -> None:
        self._types = rules.types
        self._utf8 = rules.utf8
        self._json = rules.json
        self._schema = compile_schema(rules.schema) if rules.schema is not None else None
        #: Whether a content violation drops the message instead of closing.
        self.drop = rules.on_violation == "drop"
        #: Text must be valid UTF-8; checked as the fragments pass unless the message is gathered.
        self.utf8_text = rules.utf8
        #: Text messages are gathered whole before they are forwarded: JSON and schema rules read the whole
        #: document, and a message to be dropped for a content rule must not be half forwarded.
        self.gathers_text = self._json or self._schema is not None or (self._utf8 and self.drop)
        rate = rate or MessageRate()
        self._messages_per_second = rate.messages_per_second
        self._message_burst = float(rate.message_burst)
        self._message_tokens = float(rate.message_burst)
        self._bytes_per_second = rate.bytes_per_second
        self._byte_burst = float(rate.byte_burst)
        self._byte_tokens = float(rate.byte_burst)
        self.rate_drop = rate.on_limit == "drop"
        self._last = now
        self._rate = Violation(Rule.RATE, CloseCode.POLICY_VIOLATION, "rate limit exceeded", self.rate_drop)
        self._text_refused = Violation(
            Rule.TYPE, CloseCode.UNSUPPORTED_DATA, "text messages not allowed", self.drop
        )
        self._binary_refused = Violation(
            Rule.TYPE, CloseCode.UNSUPPORTED_DATA, "binary messages not allowed", self.drop
        )
        #: Messages (and control frames) dropped, and violations seen by rule: what metrics and the close
        #: log report.
        self.dropped = 0
        self.violations: dict[Rule, int] = {}

    # -- at frame headers ------------------------------------------------------------------------

    def start(self, opcode: int, frame_bytes: int, now: float) -> Violation | None:
        """A message's first frame: its type, one message and the frame's bytes from the buckets."""
        if opcode not in self._types:
            return self._count(self._text_refused if opcode == _TEXT else self._binary_refused)
        if self._messages_per_second is None and self._bytes_per_second is None:
            return None
        return self._take(1.0, frame_bytes, now, refuse=True)

    def more(self, frame_bytes: int, now: float) -> Violation | None:
        """A continuation frame of an admitted message: its bytes from the byte bucket."""
        if self._bytes_per_second is None:
            return None
        return self._take(0.0, frame_bytes, now, refuse=not self.rate_drop)

    def control(self, now: float, refuse: bool = True) -> Violation | None:
        """A ping, pong or close: it counts as a message against the message rate (a close is counted but
        never refused: it ends the session anyway)."""
        if self._messages_per_second is None:
            return None
        return self._take(1.0, 0, now, refuse)

    # -- on a gathered message -----------------------------------------------------------------

    def content(self, opcode: int, payload: bytes | bytearray) -> Violation | None:
        """The content rules on one whole, unmasked text message (UTF-8, JSON, schema)."""
        if opcode != _TEXT or not (self._utf8 or self._json or self._schema is not None):
            return None
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return self.invalid_utf8()
        if self._json or self._schema is not None:
            try:
                document = json.loads(text)
            except (ValueError, RecursionError):
                return self._new(Rule.JSON, CloseCode.INVALID_DATA, "text message is not valid JSON")
            if self._schema is not None:
                try:
                    self._schema(document)
                except fastjsonschema.JsonSchemaException as error:
                    return self._new(
                        Rule.SCHEMA, CloseCode.POLICY_VIOLATION, f"message does not match the schema: {error}"
                    )
                except RecursionError:
                    return self._new(
                        Rule.SCHEMA, CloseCode.POLICY_VIOLATION, "message nested too deeply to check"
                    )
        return None

    def invalid_utf8(self) -> Violation:
        """The violation for text that is not UTF-8 (found whole, or as its fragments passed)."""
        return self._new(Rule.UTF8, CloseCode.INVALID_DATA, "text message is not valid UTF-8")

    # -- buckets ---------------------------------------------------------------------------------

    def _take(self, messages: float, size: int, now: float, refuse: bool) -> Violation | None:
        """Take ``messages`` and ``size`` bytes from the buckets. A refused take takes nothing; with
        ``refuse`` False the byte bucket may go into debt instead."""
        elapsed = now - self._last
        self._last = now
        message_tokens = self._message_tokens
        byte_tokens = self._byte_tokens
        refused = False
        if self._messages_per_second is not None:
            message_tokens = min(self._message_burst, message_tokens + elapsed * self._messages_per_second)
            refused = message_tokens < messages
        if self._bytes_per_second is not None:
            byte_tokens = min(self._byte_burst, byte_tokens + elapsed * self._bytes_per_second)
            refused = refused or byte_tokens < size
        if refused and refuse:
            self._message_tokens, self._byte_tokens = message_tokens, byte_tokens
            return self._count(self._rate)
        self._message_tokens, self._byte_tokens = message_tokens - messages, byte_tokens - size
        return None

    def _count(self, violation: Violation) -> Violation:
        self.violations[violation.rule] = self.violations.get(violation.rule, 0) + 1
        return violation

    def _new(self, rule: Rule, code: int, reason: str) -> Violation:
        return self._count(Violation(rule, code, reason, self.drop))
