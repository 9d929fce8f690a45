"""Every error wsgate raises, the WebSocket close codes it sends, and the closes it gives with a reason.

The errors form one tree; catching :class:`WsgateError` catches every error of the product and nothing
else::

    WsgateError
    ├── PolicyError         a policy file was refused (check, start-up, reload): file:line: key: message
    ├── ArgumentError       a command-line value argparse accepts but that is not usable
    ├── StartupError        the gateway could not start serving: exit 1
    ├── Rejection           a handshake was refused: an HTTP status, a reason word and a JSON body
    ├── UpstreamError       the upstream could not be reached or refused the WebSocket: 502
    │   └── UpstreamUnreachable  this endpoint failed (refused, timed out, TLS, 5xx): try the pool's next
    ├── ProxyHeaderError    the connection did not start with a valid PROXY header: 400
    ├── AdminRequestError   an admin API request refused as it stands (a bad selector or reason): 400
    ├── LimiterUnavailable  the shared limiter (Redis) could not decide in time and on_error is deny: 503
    └── PeerError           one side of a session must be closed, with ``code`` and ``reason``
        ├── ProtocolError   it broke RFC 6455 or 7692: 1002 (1007: a close reason not UTF-8, bad deflate)
        ├── MessageTooBig   a message over max_message_bytes or max_fragments: 1009
        └── RuleBroken      a message rule in "close" mode refused a message: the rule's code

A close the gateway gives with a fixed reason is a :class:`Close` constant here (``TOKEN_EXPIRED``,
``IDLE_TIMEOUT``...), so a code never travels apart from its reason.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from proxy.rules import Violation


class CloseCode(IntEnum):
    """Close codes of RFC 6455 section 7.4.1 (and the IANA registry) that wsgate sends itself."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015


class Close(NamedTuple):
    """A close frame's code and reason, as the gateway sends it to one side."""

    #: A :class:`CloseCode` (a message rule's code travels as the plain int the frame core holds).
    code: int
    reason: str


#: A session whose token's ``exp`` (plus leeway) passed.
TOKEN_EXPIRED = Close(CloseCode.POLICY_VIOLATION, "token expired")
#: A session that relayed no data message for ``idle_timeout``.
IDLE_TIMEOUT = Close(CloseCode.GOING_AWAY, "idle timeout")
#: A live session a reloaded policy refuses.
POLICY_CHANGED = Close(CloseCode.POLICY_VIOLATION, "policy changed")
#: Every live session when the gateway stops (SIGTERM, SIGINT).
SHUTTING_DOWN = Close(CloseCode.GOING_AWAY, "server shutting down")
#: A side that did not answer the gateway's ping within ``ping_timeout``.
KEEPALIVE_TIMEOUT = Close(CloseCode.INTERNAL_ERROR, "keepalive timeout")
#: A side whose bytes made the relay fail (a bug): it costs this session, never the process.
INTERNAL_ERROR = Close(CloseCode.INTERNAL_ERROR, "internal error")
#: The client, when the upstream's connection vanished without a close frame.
UPSTREAM_LOST = Close(CloseCode.INTERNAL_ERROR, "upstream connection lost")
#: The upstream, when the client's connection vanished without a close frame.
CLIENT_WENT_AWAY = Close(CloseCode.GOING_AWAY, "client went away")
#: What the session records for a side whose connection vanished without a close frame (never sent).
CONNECTION_LOST = Close(CloseCode.ABNORMAL, "connection lost")
#: The client, when the gateway closed the upstream for breaking the protocol.
UPSTREAM_PROTOCOL_ERROR = Close(CloseCode.BAD_GATEWAY, "upstream protocol error")
#: The upstream, when the gateway closed the client for breaking the protocol or a rule.
CLIENT_CLOSED_BY_GATEWAY = Close(CloseCode.GOING_AWAY, "client closed by gateway")


class WsgateError(Exception):
    """The root of every error wsgate raises (the tree is drawn in this module's docstring)."""


class PolicyError(WsgateError):
    """A policy file was refused.

    ``str(error)`` is the one line an operator needs: ``file:line: key.path: message``.
    """

    def __init__(self, file: Path | str | None, line: int | None, key_path: str, message: str) -> None:
        self.file = str(file) if file is not None else "<policy>"
        self.line = line
        self.key_path = key_path
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key_path}: {self.message}" if self.key_path else f"{where}: {self.message}"


class ArgumentError(WsgateError):
    """A command-line value that argparse accepts but that is not usable (an IP, a JSON object)."""


class StartupError(WsgateError):
    """The gateway could not start serving (an address in use, a permission denied); exit 1 with this."""


class Rejection(WsgateError):
    """A handshake refused before any byte reached the upstream.

    ``reason`` is a short, stable, low-cardinality word (``no_route``, ``bad_request``...) used in the JSON
    body, the log line and metrics labels; ``detail`` is a human sentence for the body and the log.

    Rejections compare by value (guards return them, tests compare them). A rejection the gateway gives
    often is a :class:`RejectionTemplate` constant that makes a fresh one per use: a raised exception
    collects a traceback and a context, which one instance shared by concurrent handshakes must not.
    """

    def __init__(
        self, status: int, reason: str, detail: str = "", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(status, reason, detail, headers)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers

    def __str__(self) -> str:
        return (
            f"{self.status} {self.reason}: {self.detail}" if self.detail else f"{self.status} {self.reason}"
        )

    def __repr__(self) -> str:
        return f"Rejection({self.status!r}, {self.reason!r}, {self.detail!r}, {self.headers!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rejection):
            return NotImplemented
        return (self.status, self.reason, self.detail, self.headers) == (
            other.status,
            other.reason,
            other.detail,
            other.headers,
        )

    def __hash__(self) -> int:
        return hash((self.status, self.reason, self.detail, self.headers))


class RejectionTemplate(NamedTuple):
    """A rejection the gateway gives often, as a constant: calling it makes a fresh :class:`Rejection`."""

    status: int
    reason: str
    detail: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def __call__(self) -> Rejection:
        return Rejection(self.status, self.reason, self.detail, self.headers)


#: A client arriving while ``limits.max_connections`` connections are held.
OVERLOADED = RejectionTemplate(
    503, "overloaded", "the gateway holds as many connections as it may; retry", (("Retry-After", "1"),)
)
#: A handshake the gateway's stop catches before its 101.
DRAINING = RejectionTemplate(503, "draining", "the gateway is shutting down; retry", (("Retry-After", "1"),))
#: A handshake the shared limiter could not judge in time, under ``limiter.on_error: deny``.
LIMITER_UNAVAILABLE = RejectionTemplate(
    503, "limiter_unavailable", "the rate limiter is unavailable; retry", (("Retry-After", "1"),)
)
#: A route with ``client_certificate: required`` (or ``client_subjects``) and a connection whose TLS
#: handshake verified no client certificate.
CLIENT_CERTIFICATE_MISSING = RejectionTemplate(
    403, "client_certificate", "this route requires a verified client certificate"
)
#: A verified client certificate whose subject is not on the route's ``client_subjects``.
CLIENT_SUBJECT_REFUSED = RejectionTemplate(
    403, "client_certificate", "the client certificate's subject is not allowed on this route"
)
#: A bug met while judging or connecting one handshake: it costs that handshake, never the process.
INTERNAL = RejectionTemplate(500, "internal_error", "internal error")


class UpstreamError(WsgateError):
    """The upstream could not be connected or refused the WebSocket upgrade; the client gets 502."""


class UpstreamUnreachable(UpstreamError):
    """One endpoint could not be connected, closed during the handshake or answered 5xx: it is marked down
    and the pool's next endpoint is tried. Other upstream errors (a 4xx, a 101 that does not fit) are the
    upstream's answer to this request, and are not tried elsewhere."""


class ProxyHeaderError(WsgateError):
    """The connection did not start with a valid PROXY header; the client gets 400."""


class AdminRequestError(WsgateError):
    """An admin API request refused as it stands (HTTP 400); ``str(error)`` says exactly what is wrong."""


class LimiterUnavailable(WsgateError):
    """The shared limiter could not make a decision in time (Redis unreachable, slow or refusing us) and
    the policy says to refuse rather than guess (``limiter.on_error: deny``). Guards answer it with
    :data:`LIMITER_UNAVAILABLE`; session control across replicas raises it when Redis cannot carry the
    request."""


class PeerError(WsgateError):
    """One side of a session broke the protocol, a limit or a rule: it is closed with ``code`` and
    ``reason`` (``str(error)``)."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ProtocolError(PeerError):
    """A peer broke RFC 6455; the relay closes that peer with ``code`` and tells the other side."""

    def __init__(self, reason: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(reason, code)


class MessageTooBig(PeerError):
    """A message over ``max_message_bytes`` (known from its frame headers) or in more than
    ``max_fragments`` frames: 1009."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, CloseCode.MESSAGE_TOO_BIG)


class RuleBroken(PeerError):
    """A message rule in "close" mode refused a message; ``violation`` says which rule and how to close."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.reason, violation.code)
        self.violation = violation
