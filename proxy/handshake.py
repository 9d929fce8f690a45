"""The handshake pipeline: from a parsed upgrade request to an :class:`Admission` or a :class:`Rejection`.

Guards run in the order a reader of the policy expects, cheapest first; each returns ``None`` to pass or a
:class:`~proxy.errors.Rejection`. Nothing here touches a socket, so every step is testable on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proxy.errors import Rejection
from proxy.frames import is_valid_client_key
from proxy.policy.model import Policy, Route


@dataclass(slots=True)
class HandshakeRequest:
    """An HTTP upgrade request as the guards see it. Header names are lower case."""

    request_id: str
    method: str
    target: str
    path: str
    query: str
    http_version: str
    headers: list[tuple[str, str]]
    peer_ip: str
    client_ip: str
    tls: bool

    @classmethod
    def build(
        cls,
        request_id: str,
        method: str,
        target: str,
        http_version: str,
        headers: Iterable[tuple[str, str]],
        peer_ip: str,
        client_ip: str,
        tls: bool,
    ) -> HandshakeRequest:
        """Split the target into path and query; the path is matched as sent, never percent-decoded."""
        split = urlsplit(target)
        return cls(
            request_id=request_id,
            method=method,
            target=target,
            path=split.path or "/",
            query=split.query,
            http_version=http_version,
            headers=list(headers),
            peer_ip=peer_ip,
            client_ip=client_ip,
            tls=tls,
        )

    def header(self, name: str) -> str | None:
        """The first value of a header, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every occurrence of a header, stripped and lower case."""
        return [
            token.strip().lower()
            for key, value in self.headers
            if key == name
            for token in value.split(",")
            if token.strip()
        ]


@dataclass(frozen=True, slots=True)
class Admission:
    """A handshake that passed every guard: what the upstream connection and the session need."""

    route: Route
    client_ip: str
    #: Headers to add to the upstream request (identity headers come with the guards).
    extra_headers: tuple[tuple[str, str], ...] = field(default=())


#: A guard looks at the request and its route and says pass (None) or no.
Guard = Callable[[HandshakeRequest, Route, Policy], Rejection | None]


def check_upgrade(request: HandshakeRequest, route: Route, policy: Policy) -> Rejection | None:
    """The request must be a well-formed RFC 6455 opening handshake (section 4.2.1)."""
    if "websocket" not in request.header_tokens("upgrade"):
        return Rejection(
            426,
            "bad_request",
            "this route only speaks WebSocket; send an Upgrade: websocket request",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )
    if request.method != "GET":
        return Rejection(400, "bad_request", "a WebSocket handshake must use GET", (("Allow", "GET"),))
    if request.http_version != "1.1":
        return Rejection(400, "bad_request", "a WebSocket handshake needs HTTP/1.1")
    if "upgrade" not in request.header_tokens("connection"):
        return Rejection(400, "bad_request", "missing 'Connection: Upgrade'")
    if request.header("sec-websocket-version") != "13":
        return Rejection(
            426, "bad_request", "unsupported WebSocket version; use 13", (("Sec-WebSocket-Version", "13"),)
        )
    key = request.header("sec-websocket-key")
    if key is None or not is_valid_client_key(key):
        return Rejection(400, "bad_request", "missing or malformed Sec-WebSocket-Key")
    return None


#: The guards, in the order they run. The security guards slot in after the upgrade check.
GUARDS: tuple[Guard, ...] = (check_upgrade,)


def admit(request: HandshakeRequest, policy: Policy, draining: bool = False) -> Admission:
    """Run the pipeline for one request.

    Raises:
        Rejection: the first guard that said no (404 when no route matches, 503 while draining).
    """
    route = policy.match_route(request.path)
    if route is None:
        raise Rejection(404, "no_route", f"no route for {request.path}")
    if draining:
        raise Rejection(503, "draining", "the gateway is shutting down; retry", (("Retry-After", "1"),))
    for guard in GUARDS:
        rejection = guard(request, route, policy)
        if rejection is not None:
            raise rejection
    return Admission(route=route, client_ip=request.client_ip)
