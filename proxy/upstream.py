"""Connecting to a route's upstream: TCP (or TLS), the client side of the WebSocket handshake, and the
headers the upstream gets.

The upstream is connected before the client gets its 101, so an unreachable or unwilling upstream is an
honest 502 rather than a 101 followed by a close.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from dataclasses import dataclass
from functools import lru_cache
from typing import cast
from urllib.parse import unquote_plus

import h11

from proxy.deflate import UPSTREAM_OFFER, Agreement, read_upstream_answer
from proxy.errors import UpstreamError
from proxy.frames import accept_key, new_client_key
from proxy.handshake import Admission, HandshakeRequest
from proxy.headers import header_value, subprotocol_list, without_cookie
from proxy.policy.model import AuthProvider, Route, Upstream

#: Hop-by-hop headers (RFC 9110 7.6.1) and the handshake's own headers: never copied from one hop to the next.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)

#: Headers the gateway sets itself; a client's own values are dropped so they cannot be spoofed.
_GATEWAY_SET = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-uri",
        "x-request-id",
        "forwarded",
    }
)


@dataclass(slots=True)
class UpstreamConnection:
    """An upstream that accepted the WebSocket; its transport is paused until the relay takes it."""

    transport: asyncio.Transport
    handshake: UpstreamHandshake
    subprotocol: str | None
    #: End-to-end headers of the upstream's 101 worth passing to the client (e.g. Set-Cookie).
    response_headers: list[tuple[str, str]]
    #: Bytes that arrived right behind the 101.
    pending: bytes
    #: What the upstream agreed to for permessage-deflate, or None.
    deflate: Agreement | None = None


def _header_value(value: object) -> str:
    """A claim as a header value: JSON for non-strings, control characters removed, and UTF-8 on the
    wire (returned as latin-1 text, the form every header value takes until it is written)."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    cleaned = "".join(char for char in text if char >= " " and char != "\x7f")
    return cleaned.encode("utf-8").decode("latin-1")


def upstream_query(request: HandshakeRequest, provider: AuthProvider | None) -> str:
    """The client's query without the token parameter (a token never travels upstream in a URL)."""
    if provider is None or "query" not in provider.token_sources or not request.query:
        return request.query
    name = provider.query_parameter
    # Compared decoded, as find_token() reads it: ?access%5Ftoken=... is the same parameter.
    return "&".join(part for part in request.query.split("&") if unquote_plus(part.partition("=")[0]) != name)


def offered_subprotocols(request: HandshakeRequest, provider: AuthProvider | None) -> list[str]:
    """The subprotocols the client offered, less a ``bearer.<token>`` entry carrying its token (split as
    the token guard splits them)."""
    offered = subprotocol_list(request.headers)
    if provider is not None and "subprotocol" in provider.token_sources:
        offered = [entry for entry in offered if not entry.startswith(provider.subprotocol_prefix)]
    return offered


def upstream_request_headers(
    request: HandshakeRequest, admission: Admission, host_header: str, key: str, offered: list[str]
) -> list[tuple[str, str]]:
    """The headers of the upstream handshake.

    The client's end-to-end headers pass, minus hop-by-hop ones and those its ``Connection`` header names,
    minus any it sent under a name the gateway sets (``X-Forwarded-*``, ``X-Request-Id``, the route's
    ``forward_claims`` headers) so none can be spoofed, minus the token (``Authorization``, token cookie)
    unless the route says ``forward_token``. Then the gateway's own are added.
    """
    route = admission.route
    provider = admission.provider
    strip_token = provider is not None and not route.forward_token
    named_hops = set(request.header_tokens("connection"))
    claim_headers = {header.lower() for _claim, header in route.forward_claims}
    headers: list[tuple[str, str]] = [
        ("host", host_header),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", key),
        ("sec-websocket-version", "13"),
    ]
    if offered:
        headers.append(("sec-websocket-protocol", ", ".join(offered)))
    if route.compression.upstream:
        # The client's own offer is never forwarded: each hop is negotiated by the gateway itself.
        headers.append(("sec-websocket-extensions", UPSTREAM_OFFER))
    for name, value in request.headers:
        if name in _NOT_FORWARDED or name in _GATEWAY_SET or name in named_hops or name in claim_headers:
            continue
        if strip_token and provider is not None:
            if name == "authorization":
                continue
            if name == "cookie" and "cookie" in provider.token_sources:
                value = without_cookie(value, provider.cookie_name)
                if not value:
                    continue
        headers.append((name, value))
    original_host = request.header("host")
    headers.append(("x-forwarded-for", admission.forwarded_for))
    headers.append(("x-forwarded-proto", "https" if request.tls else "http"))
    if original_host:
        headers.append(("x-forwarded-host", original_host))
    headers.append(("x-forwarded-uri", _target_without_token(request, provider)))
    headers.append(("x-request-id", request.request_id))
    identity = admission.identity
    if identity is not None:
        for claim, header in route.forward_claims:
            if claim in identity.claims:
                headers.append((header.lower(), _header_value(identity.claims[claim])))
    return headers


def _target_without_token(request: HandshakeRequest, provider: AuthProvider | None) -> str:
    query = upstream_query(request, provider)
    return f"{request.path}?{query}" if query else request.path


class UpstreamHandshake(asyncio.Protocol):
    """The protocol of an upstream connection until its 101: sends the request, reads the answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: str, headers: list[tuple[str, str]]) -> None:
        self.done: asyncio.Future[tuple[int, list[tuple[str, str]], bytes]] = loop.create_future()
        self.lost = False
        self._parser = h11.Connection(h11.CLIENT)
        # Header text is latin-1 for the bytes it stands for (as the listener decoded them); h11 would
        # encode str as ASCII and fail on a client's non-ASCII header, so hand it the exact bytes.
        request = h11.Request(
            method=b"GET",
            target=target.encode("latin-1"),
            headers=[(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        )
        self._request_bytes = self._parser.send(request) or b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request_bytes)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self._parser.receive_data(data)
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as error:
                self._fail(f"invalid HTTP from upstream: {error}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                if self._transport is not None:
                    self._transport.pause_reading()
                headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers]
                self._parser.next_event()  # PAUSED: what follows the 101 is WebSocket frames
                pending = self._parser.trailing_data[0]
                self.done.set_result((101, headers, bytes(pending)))
                return
            if isinstance(event, h11.Response):
                self._fail(f"upstream answered HTTP {event.status_code} instead of 101")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.done.done():
            self.done.set_exception(UpstreamError("upstream closed the connection during the handshake"))

    def _fail(self, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(UpstreamError(message))


_SKIP_IN_101 = _NOT_FORWARDED | {"date", "server"}


def _check_101(
    headers: list[tuple[str, str]], key: str, offered: list[str], deflate_offered: bool = False
) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate the upstream's 101 (RFC 6455 4.1); return its subprotocol and the headers to pass on.

    Its extensions are validated against what the gateway offered (``deflate_offered``) and read with
    :func:`upstream_deflate`."""
    if (header_value(headers, "upgrade") or "").lower() != "websocket":
        raise UpstreamError("upstream's 101 lacks 'Upgrade: websocket'")
    if header_value(headers, "sec-websocket-accept") != accept_key(key):
        raise UpstreamError("upstream Sec-WebSocket-Accept does not match the key sent")
    extensions = [value for name, value in headers if name == "sec-websocket-extensions"]
    if extensions and not deflate_offered:
        raise UpstreamError("upstream negotiated an extension the gateway did not offer")
    if len(extensions) > 1:
        raise UpstreamError("upstream answered more than one Sec-WebSocket-Extensions header")
    upstream_deflate(headers)
    subprotocol = header_value(headers, "sec-websocket-protocol")
    if subprotocol is not None and subprotocol not in offered:
        raise UpstreamError(f"upstream chose subprotocol {subprotocol!r}, which the client did not offer")
    passed = [(name, value) for name, value in headers if name not in _SKIP_IN_101]
    return subprotocol, passed


def upstream_deflate(headers: list[tuple[str, str]]) -> Agreement | None:
    """What the upstream's 101 agreed to for permessage-deflate, or None.

    Raises:
        UpstreamError: an answer the gateway's offer does not allow (502).
    """
    return read_upstream_answer(header_value(headers, "sec-websocket-extensions"))


@lru_cache(maxsize=32)
def _tls_context(ca_file: str | None, insecure_skip_verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def forget_tls_contexts() -> None:
    """Drop the cached upstream TLS contexts, so the next connections read CA files again."""
    _tls_context.cache_clear()


def upstream_tls_context(upstream: Upstream) -> ssl.SSLContext | None:
    """The client TLS context for a wss:// upstream: the system CAs, a ``ca_file``, or (tests only) none."""
    if not upstream.secure:
        return None
    ca_file = str(upstream.ca_file) if upstream.ca_file is not None else None
    return _tls_context(ca_file, upstream.insecure_skip_verify)


def _describe(error: BaseException, route: Route, timeout: float) -> str:
    target = f"{route.upstream.host}:{route.upstream.port}"
    if isinstance(error, TimeoutError):
        return f"upstream {target} did not complete the handshake within {timeout:g}s"
    if isinstance(error, ConnectionRefusedError):
        return f"upstream {target} refused the connection"
    if isinstance(error, socket.gaierror):
        return f"upstream host {route.upstream.host} could not be resolved"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"upstream {target} TLS certificate not trusted: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS with upstream {target} failed: {error.reason}"
    if isinstance(error, OSError):
        return f"cannot connect to upstream {target}: {error.strerror or error}"
    return str(error)


async def connect_upstream(request: HandshakeRequest, admission: Admission) -> UpstreamConnection:
    """Open the route's upstream and complete its WebSocket handshake within ``upstream_connect_timeout``.

    Raises:
        UpstreamError: with a short sentence naming the cause (refused, timed out, TLS, bad answer).
    """
    route = admission.route
    upstream = route.upstream
    loop = asyncio.get_running_loop()
    key = new_client_key()
    default_port = 443 if upstream.secure else 80
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    host_header = host if upstream.port == default_port else f"{host}:{upstream.port}"
    offered = offered_subprotocols(request, admission.provider)
    headers = upstream_request_headers(request, admission, host_header, key, offered)
    target = route.upstream_target(request.path, upstream_query(request, admission.provider))
    timeout = route.limits.upstream_connect_timeout
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, protocol = await loop.create_connection(
                lambda: UpstreamHandshake(loop, target, headers),
                upstream.host,
                upstream.port,
                ssl=upstream_tls_context(upstream),
                server_hostname=upstream.host if upstream.secure else None,
            )
            _status, response_headers, pending = await protocol.done
        subprotocol, passed = _check_101(response_headers, key, offered, route.compression.upstream)
    except UpstreamError:
        if transport is not None:
            transport.abort()
        raise
    except (OSError, TimeoutError) as error:
        if transport is not None:
            transport.abort()
        raise UpstreamError(_describe(error, route, timeout)) from error
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    return UpstreamConnection(
        transport, protocol, subprotocol, passed, pending, upstream_deflate(response_headers)
    )
