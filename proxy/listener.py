"""The client listener's protocol until the 101: read one HTTP upgrade request, bounded in size and time.

A :class:`HandshakeProtocol` parses the request with h11 (sans-I/O), pauses reading once it is whole, and
hands it to the gateway, which answers with :meth:`HandshakeProtocol.reject` or takes the transport over for
the relay. Anything that is not one well-formed request within ``handshake_timeout`` and
``max_header_bytes`` gets a 4xx and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

import h11

from proxy.clientip import normalize_ip, peer_ip
from proxy.errors import Rejection
from proxy.policy.model import Limits
from proxy.proxyproto import ProxyHeaderError, parse_proxy_header
from proxy.request import HandshakeRequest

#: How long a rejected connection is kept half-open to swallow the rest of the client's request.
LINGER_SECONDS = 2.0


def new_request_id() -> str:
    """A random 16-hex-digit id, set on every request and passed upstream as ``X-Request-Id``."""
    return os.urandom(8).hex()


def http_response(
    status: int, headers: list[tuple[str, str]] | tuple[tuple[str, str], ...], body: bytes = b""
) -> bytes:
    """A complete HTTP/1.1 response head (and body)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if status != 101:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def rejection_response(rejection: Rejection, request_id: str) -> bytes:
    """The HTTP answer to a refused handshake: status, headers and ``{"error", "detail", "request_id"}``."""
    body = json.dumps(
        {"error": rejection.reason, "detail": rejection.detail, "request_id": request_id},
        separators=(",", ":"),
    ).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Connection", "close"),
        ("X-Request-Id", request_id),
        *rejection.headers,
    ]
    return http_response(rejection.status, headers, body)


class HandshakeProtocol(asyncio.Protocol):
    """One client connection from accept until its 101 or its rejection."""

    def __init__(
        self,
        limits: Limits,
        tls: bool,
        proxy_protocol: bool,
        on_request: Callable[[HandshakeProtocol, HandshakeRequest], None],
        on_bad_request: Callable[[HandshakeProtocol, Rejection], None],
        on_close: Callable[[HandshakeProtocol], None],
    ) -> None:
        self.request_id = new_request_id()
        self.tls = tls
        self.transport: asyncio.Transport
        self.peer_ip = "unknown"
        #: Bytes the client sent after its request (it should wait for the 101, but may not).
        self.pending = b""
        self.lost = False
        self.answered = False
        self.task: asyncio.Task[None] | None = None
        self._limits = limits
        self._on_request = on_request
        self._on_bad_request = on_bad_request
        self._on_close = on_close
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._request: h11.Request | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Bytes of a PROXY header still being read, or None once it was (or when none is expected).
        self._proxy_header: bytearray | None = bytearray() if proxy_protocol else None
        #: After a rejection: the answer is sent and what the client still sends is discarded.
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer_ip = peer_ip(self.transport.get_extra_info("peername"))
        timeout = self._limits.handshake_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self._request is not None or self.answered:
            self.pending += data  # reading is paused; only what was already in flight lands here
            return
        if self._proxy_header is not None:
            rest = self._read_proxy_header(data)
            if not rest:  # header incomplete or refused, or it filled this read: h11 reads b"" as EOF
                return
            data = rest
        self._parser.receive_data(data)
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as error:
                status = 431 if error.error_status_hint == 431 else 400
                detail = "request headers too large" if status == 431 else f"malformed HTTP request: {error}"
                self._on_bad_request(self, Rejection(status, "bad_request", detail))
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                # h11 bounds only a request still incomplete in its buffer; one that arrived whole in a
                # single read is measured here, so the limit does not depend on how TCP split the bytes.
                size = len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers)
                if size > self._limits.max_header_bytes:
                    self._on_bad_request(self, Rejection(431, "bad_request", "request headers too large"))
                    return
                self._request = event
                continue
            if isinstance(event, h11.Data):
                self._on_bad_request(self, Rejection(400, "bad_request", "a WebSocket handshake has no body"))
                return
            if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                self._request_complete()
                return
            if isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _read_proxy_header(self, data: bytes) -> bytes | None:
        """Consume the PROXY header; return what follows it, or None while it is incomplete or refused."""
        assert self._proxy_header is not None
        self._proxy_header += data
        try:
            parsed = parse_proxy_header(bytes(self._proxy_header))
        except ProxyHeaderError as error:
            self._on_bad_request(self, Rejection(400, "bad_request", str(error)))
            return None
        if parsed is None:
            return None
        source, length = parsed
        if source is not None:
            self.peer_ip = normalize_ip(source)
        rest = bytes(self._proxy_header[length:])
        self._proxy_header = None
        return rest

    def _request_complete(self) -> None:
        request = self._request
        assert request is not None
        self._cancel_timer()
        self.transport.pause_reading()
        self.pending = bytes(self._parser.trailing_data[0])
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers]
        parsed = HandshakeRequest.build(
            request_id=self.request_id,
            method=request.method.decode("ascii"),
            target=request.target.decode("latin-1"),
            http_version=request.http_version.decode("ascii"),
            headers=headers,
            peer_ip=self.peer_ip,
            client_ip=self.peer_ip,
            tls=self.tls,
        )
        self._on_request(self, parsed)

    def _timed_out(self) -> None:
        self._timer = None
        if not self.answered and not self.lost:
            self._on_bad_request(
                self, Rejection(408, "bad_request", "the upgrade request did not arrive in time")
            )

    def reject(self, rejection: Rejection) -> None:
        """Answer with the rejection and close the connection."""
        if self.answered or self.lost:
            return
        self.answered = True
        self._cancel_timer()
        transport = self.transport
        transport.write(rejection_response(rejection, self.request_id))
        if not transport.can_write_eof():
            transport.close()
            return
        # Lingering close, as nginx does: a client still sending its request would get a TCP reset on close,
        # and a reset can destroy our answer before the client reads it. Half-close, discard what still
        # arrives, and cut the socket when the client closes its side or after LINGER_SECONDS.
        self._lingering = True
        transport.write_eof()
        transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.abort)

    def accept(self, head: bytes) -> None:
        """Write the 101; the caller hands the transport to the relay right after."""
        self.answered = True
        self._cancel_timer()
        self.transport.write(head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._on_close(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
