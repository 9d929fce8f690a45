"""Which live sessions an operator means, what the admin API tells about each, and closing them.

Pure functions over :class:`~proxy.sessions.Session` objects, so that the admin endpoints stay thin and a
fan-out across replicas can reuse them. Guarantees:

- a :class:`Selector` names sessions by ANDing the fields it was given; one with no field selects every
  session for a listing, and is refused by :func:`close_request` so that no request closes everything;
- anything an operator sends that is not understood (unknown field, wrong type, empty value, bad
  address, over-long reason) is an :class:`AdminRequestError` with a message saying exactly what, and
  nothing is closed;
- :func:`describe` never holds a token or its claims: who the session is (subject, token id, provider,
  client certificate subject), where it came from, where it went (route, host, endpoint) and what it
  relayed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.errors import AdminRequestError, Close, CloseCode
from proxy.metrics import FROM_CLIENT, FROM_UPSTREAM
from proxy.policy.values import parse_route_host, url_host

if TYPE_CHECKING:
    from proxy.sessions import Session

#: A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455 5.5: 125 bytes of payload, 2 for the code).
MAX_REASON_BYTES = 123
DEFAULT_REASON = "closed by operator"

#: ``close_sessions(selector, reason)``: closes the sessions ``selector`` names, wherever they live, and
#: says what it did as a JSON-ready dict with at least ``closed`` (how many sessions it closed). A
#: fan-out across replicas adds what it knows (``replicas``); the admin API answers with the dict as is.
CloseSessions = Callable[["Selector", str], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Selector:
    """Which sessions: every field given must match; a field left None matches any session."""

    subject: str | None = None
    token_id: str | None = None
    #: The session's client IP is inside this network (a single address is a /32 or /128).
    client_ip: IPv4Network | IPv6Network | None = None
    #: The route's path as the policy declares it (``/chat``, not the request's ``/chat/room/7``). Only the
    #: path: routes of two hosts may share it, and ``host`` tells them apart.
    route: str | None = None
    request_id: str | None = None
    #: The auth provider that verified the session's token: subjects of two providers may be equal.
    provider: str | None = None
    #: The route's ``host`` as the policy declares it, normalized (``chat.example.com``, ``*.example.com``):
    #: exactly that route host, never the hosts a wildcard serves, and never a route without a host.
    host: str | None = None
    #: The label of the upstream endpoint a session is relayed to (``ws://10.0.0.5:8080/chat``): a URL is
    #: read as its label is written (default port filled in, query left out).
    endpoint: str | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], allowed_extra: Iterable[str] = ()) -> Selector:
        """A selector from JSON-like ``values`` (each a string); keys in ``allowed_extra`` are skipped.

        Raises:
            AdminRequestError: an unknown key, a value that is not a non-empty string, a bad address.
        """
        names = cls.field_names()
        extra = set(allowed_extra)
        unknown = sorted(str(key) for key in values if key not in names and key not in extra)
        if unknown:
            raise AdminRequestError(
                f"unknown field {', '.join(map(repr, unknown))}; known: {', '.join((*names, *sorted(extra)))}"
            )
        given: dict[str, Any] = {}
        for name in names:
            if name not in values:
                continue
            value = values[name]
            if not isinstance(value, str):
                raise AdminRequestError(f"{name} must be a string, not {_json_type(value)}")
            if not value:
                raise AdminRequestError(f"{name} must not be empty")
            given[name] = _PARSED.get(name, _as_is)(value)
        return cls(**given)

    @classmethod
    def from_query(cls, pairs: Iterable[tuple[str, str]]) -> Selector:
        """A selector from URL query parameters, as ``(key, value)`` pairs in the order sent.

        Raises:
            AdminRequestError: as :meth:`from_mapping`, and for a parameter given twice.
        """
        values: dict[str, str] = {}
        for key, value in pairs:
            if key in values:
                raise AdminRequestError(f"query parameter {key!r} given more than once")
            values[key] = value
        return cls.from_mapping(values)

    @property
    def empty(self) -> bool:
        """No field given: the selector matches every session."""
        return all(getattr(self, name) is None for name in self.field_names())

    def matches(self, session: Session) -> bool:
        identity = session.identity
        if self.subject is not None and (identity is None or identity.subject != self.subject):
            return False
        if self.token_id is not None and (identity is None or identity.token_id != self.token_id):
            return False
        if self.provider is not None and (identity is None or identity.provider != self.provider):
            return False
        if self.route is not None and session.route.path != self.route:
            return False
        if self.host is not None and session.route.host != self.host:
            return False
        if self.endpoint is not None and session.endpoint != self.endpoint:
            return False
        if self.request_id is not None and session.request_id != self.request_id:
            return False
        return self.client_ip is None or _in_network(session.client_ip, self.client_ip)

    def to_mapping(self) -> dict[str, str]:
        """The fields given, as strings: for a log line, or to send the selector to another replica
        (``Selector.from_mapping(selector.to_mapping()) == selector``)."""
        return {name: str(value) for name in self.field_names() if (value := getattr(self, name)) is not None}


def close_request(body: object) -> tuple[Selector, str]:
    """The selector and close reason of a ``POST /sessions/close`` body (a JSON object).

    Raises:
        AdminRequestError: not an object, a selector with no field, a bad field, a bad reason.
    """
    if not isinstance(body, dict):
        raise AdminRequestError(f"the body must be a JSON object, not {_json_type(body)}")
    selector = Selector.from_mapping(body, allowed_extra=("reason",))
    if selector.empty:
        raise AdminRequestError(
            f"name at least one of {', '.join(Selector.field_names())}: closing every session is refused"
        )
    reason = body.get("reason", DEFAULT_REASON)
    return selector, close_reason(reason)


def close_reason(reason: object) -> str:
    """``reason`` if it fits a close frame.

    Raises:
        AdminRequestError: not a string, empty, or over :data:`MAX_REASON_BYTES` bytes of UTF-8.
    """
    if not isinstance(reason, str):
        raise AdminRequestError(f"reason must be a string, not {_json_type(reason)}")
    if not reason:
        raise AdminRequestError("reason must not be empty (leave it out for the default)")
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError:
        raise AdminRequestError("reason is not valid Unicode (it holds a lone surrogate)") from None
    if size > MAX_REASON_BYTES:
        raise AdminRequestError(
            f"reason is {size} bytes of UTF-8; a close reason holds at most {MAX_REASON_BYTES}"
        )
    return reason


def matching(sessions: Iterable[Session], selector: Selector) -> list[Session]:
    """The live sessions ``selector`` names, oldest first."""
    found = [session for session in sessions if not session.finished and selector.matches(session)]
    found.sort(key=lambda session: session.started)
    return found


def close_matching(sessions: Iterable[Session], selector: Selector, reason: str) -> int:
    """Close every open session ``selector`` names with 1008 ``reason`` on both sides; how many.

    A session already closing (either side sent its close, or the gateway did) is left to finish as it
    is and not counted. The reason is expected checked by :func:`close_reason`.
    """
    verdict = Close(CloseCode.POLICY_VIOLATION, reason)
    closed = 0
    for session in matching(sessions, selector):
        if session.initiator is None:
            session.close(verdict)
            closed += 1
    return closed


def local_close(sessions: Callable[[], Iterable[Session]]) -> CloseSessions:
    """A :data:`CloseSessions` over this process's sessions only: ``{"closed": N}``."""

    async def close_sessions(selector: Selector, reason: str) -> dict[str, Any]:
        return {"closed": close_matching(sessions(), selector, reason)}

    return close_sessions


def describe(session: Session) -> dict[str, Any]:
    """One session as the admin listing shows it (JSON-ready)."""
    identity = session.identity
    certificate = session.client_certificate
    return {
        "request_id": session.request_id,
        "route": session.route.path,
        "host": session.route.host,
        "request_host": session.host,
        "path": session.request_path,
        "endpoint": session.endpoint,
        "client_ip": session.client_ip,
        "subject": identity.subject if identity is not None else None,
        "token_id": identity.token_id if identity is not None else None,
        "provider": identity.provider if identity is not None else None,
        "client_subject": certificate.subject if certificate is not None else None,
        "subprotocol": session.subprotocol,
        "opened_at": _iso(session.opened_at),
        "opened_at_unix": round(session.opened_at, 3),
        "closing": session.initiator is not None,
        "messages": {FROM_CLIENT: session.client.messages, FROM_UPSTREAM: session.upstream.messages},
        "bytes": {FROM_CLIENT: session.client.bytes, FROM_UPSTREAM: session.upstream.bytes},
    }


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix)) + f".{int(unix % 1 * 1000):03d}Z"


def _as_is(value: str) -> str:
    return value


def _route_host(value: str) -> str:
    """The route host a ``host`` filter names, normalized as the policy's ``routes[].host`` is (an IPv6
    address in brackets or, as a normalized host is written, without them)."""
    try:
        return (
            str(ip_address(value)) if ":" in value and not value.startswith("[") else parse_route_host(value)
        )
    except ValueError as error:
        raise AdminRequestError(f"host must be a route's host: {error}") from None


def _endpoint_label(value: str) -> str:
    """The endpoint label an ``endpoint`` filter names: a ws:// or wss:// URL, as
    :attr:`~proxy.policy.values.Upstream.label` writes it (its query, which may hold a secret, dropped)."""
    try:
        split = urlsplit(value)
        port = split.port
    except ValueError:
        split, port = None, None
    if split is None or split.scheme not in ("ws", "wss") or not split.hostname:
        raise AdminRequestError(f"endpoint must be a ws:// or wss:// URL, not {value[:100]!r}")
    if port is None:
        port = 443 if split.scheme == "wss" else 80
    return f"{split.scheme}://{url_host(split.hostname)}:{port}{split.path}"


def _network(value: str) -> IPv4Network | IPv6Network:
    """The network a ``client_ip`` filter names. An IPv4-mapped IPv6 one (``::ffff:10.0.0.0/104``) is
    its IPv4 network, as client addresses are; a scoped address (``fe80::1%eth0``) names no client."""
    try:
        if "%" in value:
            raise ValueError("scoped")
        network = ip_network(value, strict=False)
    except ValueError:
        raise AdminRequestError(f"client_ip must be an IP address or a CIDR network, not {value!r}") from None
    mapped = network.network_address.ipv4_mapped if isinstance(network, IPv6Network) else None
    if mapped is not None and network.prefixlen >= 96:
        return IPv4Network((mapped, network.prefixlen - 96))
    return network


#: How a selector field's text becomes its value (a field not named here is kept as sent).
_PARSED: dict[str, Callable[[str], Any]] = {
    "client_ip": _network,
    "host": _route_host,
    "endpoint": _endpoint_label,
}


def _in_network(client_ip: str, network: IPv4Network | IPv6Network) -> bool:
    try:
        address = ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version == network.version and address in network


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, as the operator wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else type(value).__name__
