"""Connecting to a route's upstream: TCP (or TLS), the client side of the WebSocket handshake, and the
headers the upstream gets.

The upstream is connected before the client gets its 101, so an unreachable or unwilling upstream is an
honest 502 rather than a 101 followed by a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import ssl
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote_plus

from proxy.deflate import UPSTREAM_OFFER, Agreement, read_upstream_answer
from proxy.errors import CloseCode, UpstreamError, UpstreamUnreachable
from proxy.frames import Opcode, accept_key, close_payload, encode_frame, new_client_key
from proxy.handshake import Admission, HandshakeRequest
from proxy.headers import header_value, subprotocol_list, without_cookie
from proxy.policy.model import AuthProvider, Upstream
from proxy.policy.values import url_host
from proxy.upstream_answer import AnswerReader, request_bytes

if TYPE_CHECKING:
    from proxy.pool import Endpoint, RoutePool

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
    #: The pool endpoint it went to (None for a health check's connection).
    endpoint: Endpoint | None = None
    #: What the upstream agreed to for permessage-deflate, or None.
    deflate: Agreement | None = None


def _header_value(value: object) -> str:
    """A claim as a header value: JSON for non-strings, control characters and surrounding spaces removed
    (RFC 9110 5.5: a field value has no leading or trailing whitespace), and UTF-8 on the wire (returned as
    latin-1 text, the form every header value takes until it is written)."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    cleaned = "".join(char for char in text if char >= " " and char != "\x7f").strip(" ")
    return cleaned.encode("utf-8").decode("latin-1")


def upstream_query(request: HandshakeRequest, providers: tuple[AuthProvider, ...]) -> str:
    """The client's query without the token parameter of any of the route's providers (a token never
    travels upstream in a URL, whichever provider took it)."""
    names = {provider.query_parameter for provider in providers if "query" in provider.token_sources}
    if not names or not request.query:
        return request.query
    # Compared decoded, as find_token() reads it: ?access%5Ftoken=... is the same parameter. Pieces
    # after a ';' are looked at too: the token guard splits on '&' only, but an upstream that also splits
    # on ';' (as some frameworks do) would read ?x=1;access_token=... as a token parameter.
    kept = []
    for part in request.query.split("&"):
        pieces = [piece for piece in part.split(";") if unquote_plus(piece.partition("=")[0]) not in names]
        if pieces:
            kept.append(";".join(pieces))
    return "&".join(kept)


def offered_subprotocols(request: HandshakeRequest, providers: tuple[AuthProvider, ...]) -> list[str]:
    """The subprotocols the client offered, less every ``bearer.<token>`` entry (each subprotocol
    provider's prefix) carrying a token (split as the token guard splits them)."""
    prefixes = tuple(
        provider.subprotocol_prefix for provider in providers if "subprotocol" in provider.token_sources
    )
    offered = subprotocol_list(request.headers)
    if prefixes:
        offered = [entry for entry in offered if not entry.startswith(prefixes)]
    return offered


def upstream_request_headers(
    request: HandshakeRequest, admission: Admission, host_header: str, key: str, offered: list[str]
) -> list[tuple[str, str]]:
    """The headers of the upstream handshake.

    The client's end-to-end headers pass, minus hop-by-hop ones and those its ``Connection`` header names,
    minus any it sent under a name the gateway sets (``X-Forwarded-*``, ``X-Request-Id``, the
    ``forward_claims`` and ``forward_client_certificate`` headers of every route of the policy) so none can
    be spoofed, on any route, with or without a certificate, minus the token (``Authorization``, the token
    cookie of each of the route's providers) unless the route says ``forward_token``. Then the gateway's
    own are added.
    """
    route = admission.route
    providers = admission.providers
    strip_token = bool(providers) and not route.forward_token
    token_cookies = {provider.cookie_name for provider in providers if "cookie" in provider.token_sources}
    named_hops = set(request.header_tokens("connection"))
    claim_headers = route.gateway_set_headers
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
        if strip_token:
            if name == "authorization":
                continue
            if name == "cookie" and token_cookies:
                for cookie_name in token_cookies:
                    value = without_cookie(value, cookie_name)
                if not value:
                    continue
        headers.append((name, value))
    original_host = request.header("host")
    headers.append(("x-forwarded-for", admission.forwarded_for))
    headers.append(("x-forwarded-proto", "https" if request.tls else "http"))
    if original_host:
        headers.append(("x-forwarded-host", original_host))
    headers.append(("x-forwarded-uri", _target_without_token(request, providers)))
    headers.append(("x-request-id", request.request_id))
    identity = admission.identity
    if identity is not None:
        for claim, header in route.forward_claims:
            if claim in identity.claims:
                headers.append((header.lower(), _header_value(identity.claims[claim])))
    certificate = request.client_certificate
    certificate_headers = route.forward_client_certificate
    if certificate_headers is not None and certificate is not None:
        if certificate_headers.subject_header:
            headers.append((certificate_headers.subject_header.lower(), _header_value(certificate.subject)))
        if certificate_headers.sha256_header:
            headers.append((certificate_headers.sha256_header.lower(), certificate.sha256))
    return headers


def _target_without_token(request: HandshakeRequest, providers: tuple[AuthProvider, ...]) -> str:
    query = upstream_query(request, providers)
    return f"{request.path}?{query}" if query else request.path


class UpstreamHandshake(asyncio.Protocol):
    """The protocol of an upstream connection until its 101: sends the request, reads the answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target: str, headers: list[tuple[str, str]]) -> None:
        self.done: asyncio.Future[tuple[int, list[tuple[str, str]], bytes]] = loop.create_future()
        self.lost = False
        #: Resolved when the connection is gone (a health check waits on it after its close frame).
        self.closed: asyncio.Future[None] = loop.create_future()
        self._reader = AnswerReader()
        self._request_bytes = request_bytes(target, headers)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request_bytes)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            answer = self._reader.receive_data(data)
        except UpstreamError as error:
            self.done.set_exception(error)
            return
        if answer is not None:
            if self._transport is not None:
                self._transport.pause_reading()
            self.done.set_result((101, answer.headers, answer.rest))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.done.done():
            self.done.set_exception(
                UpstreamUnreachable("upstream closed the connection during the handshake")
            )


_SKIP_IN_101 = _NOT_FORWARDED | {"date", "server"}


def _check_101(
    headers: list[tuple[str, str]], key: str, deflate_offered: bool = False
) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate the upstream's 101 (RFC 6455 4.1); return the subprotocol it chose and the headers to pass
    on. The same for a session's connect and a health check. Its extensions are validated against what
    the gateway offered (``deflate_offered``: the route's, never the client's) and read with
    :func:`upstream_deflate`.

    Raises:
        UpstreamUnreachable: the 101 is broken whatever the request (no ``Upgrade: websocket``, an accept
            that does not match the gateway's own key, an extension the gateway did not offer or
            parameters its offer does not allow): the endpoint is broken, as one answering 5xx is.
    """
    if (header_value(headers, "upgrade") or "").lower() != "websocket":
        raise UpstreamUnreachable("upstream's 101 lacks 'Upgrade: websocket'")
    if header_value(headers, "sec-websocket-accept") != accept_key(key):
        raise UpstreamUnreachable("upstream Sec-WebSocket-Accept does not match the key sent")
    extensions = [value for name, value in headers if name == "sec-websocket-extensions"]
    if extensions and not deflate_offered:
        raise UpstreamUnreachable("upstream negotiated an extension the gateway did not offer")
    if len(extensions) > 1:
        raise UpstreamUnreachable("upstream answered more than one Sec-WebSocket-Extensions header")
    try:
        upstream_deflate(headers)
    except UpstreamError as error:
        raise UpstreamUnreachable(str(error)) from None
    passed = [(name, value) for name, value in headers if name not in _SKIP_IN_101]
    return header_value(headers, "sec-websocket-protocol"), passed


def _check_subprotocol(subprotocol: str | None, offered: list[str]) -> None:
    """The upstream's subprotocol must be one the client offered.

    Raises:
        UpstreamError: it is not. This depends on what the client offered, so it is the upstream's answer
            to this request, not a sign of a broken endpoint (else a client could mark endpoints down).
    """
    if subprotocol is not None and subprotocol not in offered:
        raise UpstreamError(f"upstream chose subprotocol {subprotocol!r}, which the client did not offer")


def upstream_deflate(headers: list[tuple[str, str]]) -> Agreement | None:
    """What the upstream's 101 agreed to for permessage-deflate, or None.

    Raises:
        UpstreamError: an answer the gateway's offer does not allow (502).
    """
    return read_upstream_answer(header_value(headers, "sec-websocket-extensions"))


@lru_cache(maxsize=32)
def _tls_context(
    ca_file: str | None, insecure_skip_verify: bool, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def forget_tls_contexts() -> None:
    """Drop the cached upstream TLS contexts, so the next connections read CA and client certificate
    files again."""
    _tls_context.cache_clear()


def upstream_tls_context(upstream: Upstream) -> ssl.SSLContext | None:
    """The client TLS context for a wss:// upstream: the system CAs, a ``ca_file``, or (tests only) none;
    with the client certificate of ``upstream_tls.cert`` when one is set.

    Raises:
        OSError, ssl.SSLError: a file no longer loads (it changed since the policy was loaded).
    """
    if not upstream.secure:
        return None
    ca_file = str(upstream.ca_file) if upstream.ca_file is not None else None
    cert = str(upstream.cert_file) if upstream.cert_file is not None else None
    key = str(upstream.key_file) if upstream.key_file is not None else None
    return _tls_context(ca_file, upstream.insecure_skip_verify, cert, key)


def _describe(error: OSError, where: str) -> str:
    """Why a connect to ``where`` (``host:port``, with the address tried when the host is a name) failed."""
    if isinstance(error, ConnectionRefusedError):
        return f"upstream {where} refused the connection"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"upstream {where} TLS certificate not trusted: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS with upstream {where} failed: {error.reason}"
    return f"cannot connect to upstream {where}: {error.strerror or error}"


#: One address to try: (family, proto, sockaddr) as ``getaddrinfo`` gives them.
Address = tuple[int, int, tuple[Any, ...]]


async def resolve_addresses(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to now, in the resolver's order (asked again by every connect).
    An IP address is its own answer, with no resolver and no timer involved.

    Raises:
        socket.gaierror: the name does not resolve.
    """
    literal = _literal_address(host, port)
    if literal is not None:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, proto, sockaddr) for family, _type, proto, _name, sockaddr in infos]


@lru_cache(maxsize=256)
def _literal_address(host: str, port: int) -> Address | None:
    """``host`` as the address ``getaddrinfo`` would give for it, when it is an IP address (else None;
    also for an IPv6 address with a zone, whose scope id the resolver finds)."""
    if "%" in host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4:
        return (socket.AF_INET, socket.IPPROTO_TCP, (host, port))
    return (socket.AF_INET6, socket.IPPROTO_TCP, (host, port, 0, 0))


def _host_header(upstream: Upstream) -> str:
    default_port = 443 if upstream.secure else 80
    host = url_host(upstream.host)
    return host if upstream.port == default_port else f"{host}:{upstream.port}"


async def _connect(
    upstream: Upstream, target: str, headers: list[tuple[str, str]], connect_by: float
) -> tuple[asyncio.Transport, UpstreamHandshake]:
    """TCP (and TLS) to ``upstream`` by ``connect_by`` (loop time), the handshake request sent.

    The host is resolved again (within the same time), and each address it resolves to gets an equal
    share of the time left among the addresses left: one that swallows packets cannot use up the others'
    time (as ``create_connection`` given the name would, trying them in turn under one timeout). TLS
    names the host, not the address.

    Raises:
        UpstreamUnreachable: not resolved, no address connected, or the TLS files no longer load.
    """
    loop = asyncio.get_running_loop()
    where = f"{upstream.host}:{upstream.port}"
    try:
        addresses = [literal] if (literal := _literal_address(upstream.host, upstream.port)) else None
        if addresses is None:
            async with asyncio.timeout_at(connect_by):
                addresses = await resolve_addresses(upstream.host, upstream.port)
        tls = upstream_tls_context(upstream)
    except TimeoutError as error:
        raise UpstreamUnreachable(f"upstream host {upstream.host} was not resolved in time") from error
    except socket.gaierror as error:
        raise UpstreamUnreachable(f"upstream host {upstream.host} could not be resolved") from error
    except OSError as error:  # ssl.SSLError is an OSError
        detail = error.strerror or error
        raise UpstreamUnreachable(f"TLS files of upstream_tls do not load: {detail}") from error
    failures: list[str] = []
    for index, (family, proto, sockaddr) in enumerate(addresses):
        share = (connect_by - loop.time()) / (len(addresses) - index)
        address = str(sockaddr[0])
        tried = where if address == upstream.host else f"{where} ({address})"
        if share <= 0:
            failures.append(f"upstream {tried} not tried: no connect time left")
            break
        try:
            async with asyncio.timeout(share):
                transport, protocol = await loop.create_connection(
                    lambda: UpstreamHandshake(loop, target, headers),
                    address,
                    sockaddr[1],
                    family=family,
                    proto=proto,
                    ssl=tls,
                    server_hostname=upstream.host if tls is not None else None,
                )
        except TimeoutError:
            failures.append(f"upstream {tried} did not connect within {round(share, 3):g}s")
            continue
        except OSError as error:  # ssl.SSLError is an OSError
            failures.append(_describe(error, tried))
            continue
        return transport, protocol
    if not failures:
        raise UpstreamUnreachable(f"upstream host {upstream.host} resolved to no address")
    raise UpstreamUnreachable("; ".join(failures))


async def _open(
    upstream: Upstream,
    target: str,
    headers: list[tuple[str, str]],
    connect_by: float,
    answer_by: float,
    bound: str,
) -> tuple[asyncio.Transport, UpstreamHandshake, list[tuple[str, str]], bytes]:
    """TCP (or TLS) to ``upstream`` by ``connect_by``, then its answer to the handshake request by
    ``answer_by`` (loop times; ``bound`` names that deadline in the error). As Envoy splits its connect
    timeout from the request's: a connection once made may wait for its 101 as long as the route's
    deadline allows, so a healthy but slow endpoint is not cut short by a share meant for endpoints that
    do not connect at all.

    Raises:
        UpstreamUnreachable: no connection, no TLS, no answer in time, closed, invalid HTTP or a 5xx.
        UpstreamError: an answer other than 101 that is not a 5xx.
    """
    transport, protocol = await _connect(upstream, target, headers, connect_by)
    try:
        async with asyncio.timeout_at(answer_by):
            _status, response_headers, pending = await protocol.done
    except TimeoutError as error:
        transport.abort()
        raise UpstreamUnreachable(
            f"upstream {upstream.host}:{upstream.port} connected but did not answer the upgrade within"
            f" {bound}"
        ) from error
    except BaseException:
        transport.abort()
        raise
    return transport, protocol, response_headers, pending


async def _connect_endpoint(
    request: HandshakeRequest,
    admission: Admission,
    upstream: Upstream,
    offered: list[str],
    connect_by: float,
    answer_by: float,
) -> UpstreamConnection:
    """One endpoint's WebSocket handshake: connected by ``connect_by``, its 101 by ``answer_by``.

    Raises:
        UpstreamUnreachable: the endpoint failed (see :func:`_open`) or its 101 is broken.
        UpstreamError: it answered this request with something else than a 101 the client can take.
    """
    key = new_client_key()
    headers = upstream_request_headers(request, admission, _host_header(upstream), key, offered)
    target = admission.route.upstream_target(
        request.path, upstream_query(request, admission.providers), upstream
    )
    timeout = admission.route.limits.upstream_connect_timeout
    transport, protocol, response_headers, pending = await _open(
        upstream, target, headers, connect_by, answer_by, f"{timeout:g}s (upstream_connect_timeout)"
    )
    try:
        subprotocol, passed = _check_101(response_headers, key, admission.route.compression.upstream)
        _check_subprotocol(subprotocol, offered)
    except BaseException:
        transport.abort()
        raise
    return UpstreamConnection(
        transport, protocol, subprotocol, passed, pending, deflate=upstream_deflate(response_headers)
    )


async def connect_upstream(
    request: HandshakeRequest, admission: Admission, pool: RoutePool
) -> UpstreamConnection:
    """Open one of the route's endpoints and complete its WebSocket handshake, all within the route's
    ``upstream_connect_timeout``.

    Endpoints are tried in the pool's order (:meth:`~proxy.pool.RoutePool.order`). Each try's TCP (and
    TLS) connect gets an equal share of the time left among the endpoints left (a pool of one: the whole
    timeout), so a dead endpoint that swallows packets cannot use up the deadline; once connected, its 101
    may take until the route's deadline, so a slow but healthy endpoint is not cut short. A failed
    endpoint (no connection, no 101 by the deadline, a 5xx, a broken 101) is marked down and the next is
    tried; another answer (a 4xx) is the upstream's answer to this request and is not tried elsewhere.

    Raises:
        UpstreamError: with a short sentence naming the cause (refused, timed out, TLS, bad answer); for a
            pool of several, each endpoint's.
    """
    loop = asyncio.get_running_loop()
    offered = offered_subprotocols(request, admission.providers)
    timeout = admission.route.limits.upstream_connect_timeout
    deadline = loop.time() + timeout
    identity = admission.identity
    order = pool.order(admission.client_ip, identity.subject if identity is not None else None)
    failures: list[str] = []
    for index, endpoint in enumerate(order):
        now = loop.time()
        if now >= deadline:
            failures.append(f"{endpoint.label} not tried: upstream_connect_timeout ({timeout:g}s) passed")
            break
        connect_by = now + (deadline - now) / (len(order) - index)
        endpoint.connecting += 1
        try:
            connection = await _connect_endpoint(
                request, admission, endpoint.upstream, offered, connect_by, deadline
            )
        except UpstreamUnreachable as error:
            endpoint.connect_failed(str(error))
            failures.append(str(error))
            continue
        finally:
            endpoint.connecting -= 1
        endpoint.connect_succeeded()
        connection.endpoint = endpoint
        return connection
    if len(order) == 1:
        raise UpstreamError(failures[0])
    raise UpstreamError(f"no endpoint of {len(order)} answered: " + "; ".join(failures))


async def probe_websocket(upstream: Upstream, target: str, timeout: float) -> str | None:
    """An active health check by WebSocket handshake: None when ``upstream`` answered 101 within
    ``timeout`` (then it is sent a close 1000, and given the rest of the time to close), else why not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    key = new_client_key()
    headers = [
        ("host", _host_header(upstream)),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", key),
        ("sec-websocket-version", "13"),
        ("user-agent", "wsgate-health-check"),
    ]
    try:
        transport, protocol, response_headers, _pending = await _open(
            upstream, target, headers, deadline, deadline, f"{timeout:g}s (the health check's timeout)"
        )
    except UpstreamError as error:
        return str(error)
    try:
        try:
            _check_101(response_headers, key)  # as a session's connect judges it (its subprotocol aside)
        except UpstreamUnreachable as error:
            return str(error)
        transport.write(encode_frame(Opcode.CLOSE, close_payload(CloseCode.NORMAL), os.urandom(4)))
        transport.resume_reading()  # its close frame, then its FIN
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await protocol.closed
        return None
    finally:
        transport.abort()
