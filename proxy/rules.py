"""Per-message rules the relay applies to one direction: type, size, UTF-8, JSON, schema, rate.

A :class:`MessageChecker` is built once per session direction from the frozen policy objects; its
:meth:`~MessageChecker.check` runs once per whole message and does only attribute reads, integer
arithmetic and, where the policy asks, one decode. Verdicts are ``None`` (pass) or ``(close code, reason)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import fastjsonschema

from proxy.errors import CloseCode
from proxy.policy.model import MessageRate, MessageRules

Verdict = tuple[int, str] | None

_TEXT = 1


@lru_cache(maxsize=64)
def _compiled(schema_json: str) -> Callable[[Any], Any]:
    return fastjsonschema.compile(json.loads(schema_json))


def compile_schema(schema: dict[str, object]) -> Callable[[Any], Any]:
    """A fast validator for a JSON Schema document (compiled once per distinct schema)."""
    return _compiled(json.dumps(schema, sort_keys=True))


class MessageChecker:
    """The rules of one direction of one session, with its rate buckets and violation counters."""

    __slots__ = (
        "_byte_burst",
        "_byte_tokens",
        "_bytes_per_second",
        "_json",
        "_last",
        "_message_burst",
        "_message_tokens",
        "_messages_per_second",
        "_schema",
        "_types",
        "_utf8",
        "drop",
        "dropped",
        "rate_drop",
        "violations",
    )

    def __init__(self, rules: MessageRules, rate: MessageRate | None, now: float) -> None:
        self._types = rules.types
        self._utf8 = rules.utf8
        self._json = rules.json
        self._schema = compile_schema(rules.schema) if rules.schema is not None else None
        #: Whether a content violation drops the message instead of closing.
        self.drop = rules.on_violation == "drop"
        rate = rate or MessageRate()
        self._messages_per_second = rate.messages_per_second
        self._message_burst = float(rate.message_burst)
        self._message_tokens = float(rate.message_burst)
        self._bytes_per_second = rate.bytes_per_second
        self._byte_burst = float(rate.byte_burst)
        self._byte_tokens = float(rate.byte_burst)
        self.rate_drop = rate.on_limit == "drop"
        self._last = now
        #: Messages dropped, and violations seen, by rule name: what metrics and the close log report.
        self.dropped = 0
        self.violations: dict[str, int] = {}

    def first_frame(self, opcode: int) -> Verdict:
        """Check what can be known from a message's first frame (its type)."""
        if opcode not in self._types:
            return self._violation(
                "type", CloseCode.UNSUPPORTED_DATA, f"{_name(opcode)} messages not allowed"
            )
        return None

    def reads_payload(self, opcode: int) -> bool:
        """Whether :meth:`check` looks at a message's bytes (text under UTF-8, JSON or schema rules);
        when it does not, :meth:`check_size` gives the same verdict without unmasking the payload."""
        return opcode == _TEXT and (self._utf8 or self._json or self._schema is not None)

    def check_size(self, size: int, now: float) -> Verdict:
        """The verdict for a message whose bytes need no reading: the rate limits only."""
        if self._messages_per_second is not None or self._bytes_per_second is not None:
            return self._take(size, now)
        return None

    def check(self, opcode: int, payload: bytes | bytearray, now: float) -> Verdict:
        """Check one whole message (unmasked payload) arriving at ``now`` (monotonic seconds)."""
        verdict = self.check_size(len(payload), now)
        if verdict is not None:
            return verdict
        if self.reads_payload(opcode):
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                return self._violation("utf8", CloseCode.INVALID_DATA, "text message is not valid UTF-8")
            if self._json or self._schema is not None:
                try:
                    document = json.loads(text)
                except (ValueError, RecursionError):
                    return self._violation("json", CloseCode.INVALID_DATA, "text message is not valid JSON")
                if self._schema is not None:
                    try:
                        self._schema(document)
                    except fastjsonschema.JsonSchemaException as error:
                        return self._violation(
                            "schema",
                            CloseCode.POLICY_VIOLATION,
                            f"message does not match the schema: {error}",
                        )
                    except RecursionError:
                        return self._violation(
                            "schema", CloseCode.POLICY_VIOLATION, "message nested too deeply to check"
                        )
        return None

    def _take(self, size: int, now: float) -> Verdict:
        """Take one message and ``size`` bytes from the buckets; a refused message takes nothing."""
        elapsed = now - self._last
        self._last = now
        message_tokens = self._message_tokens
        byte_tokens = self._byte_tokens
        refused = False
        if self._messages_per_second is not None:
            message_tokens = min(self._message_burst, message_tokens + elapsed * self._messages_per_second)
            refused = message_tokens < 1.0
        if self._bytes_per_second is not None:
            byte_tokens = min(self._byte_burst, byte_tokens + elapsed * self._bytes_per_second)
            refused = refused or byte_tokens < size
        if refused:
            self._message_tokens, self._byte_tokens = message_tokens, byte_tokens
            return self._violation("rate", CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        self._message_tokens, self._byte_tokens = message_tokens - 1.0, byte_tokens - size
        return None

    def drops(self, verdict: tuple[int, str]) -> bool:
        """Whether this verdict drops the message (True) or closes the offender (False)."""
        if verdict[1] == "rate limit exceeded":
            return self.rate_drop
        return self.drop

    def _violation(self, rule: str, code: int, reason: str) -> tuple[int, str]:
        self.violations[rule] = self.violations.get(rule, 0) + 1
        return code, reason[:123]


def _name(opcode: int) -> str:
    return {1: "text", 2: "binary"}.get(opcode, f"opcode {opcode}")
