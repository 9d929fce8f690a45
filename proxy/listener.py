"""The client listener's protocol until the 101: read one HTTP upgrade request, bounded in size and time.

A :class:`HandshakeProtocol` feeds what arrives to a sans-I/O :class:`~proxy.request_reader.RequestReader`,
pauses reading once the request is whole, and hands it to the gateway, which answers with
:meth:`HandshakeProtocol.reject` or takes the transport over for the relay. Anything that is not one
well-formed request within ``handshake_timeout`` and ``max_header_bytes`` gets a 4xx and the connection is
closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

from proxy import logs
from proxy.clientip import normalize_ip, peer_ip
from proxy.errors import Rejection
from proxy.policy.model import Limits
from proxy.request import ClientCertificate, HandshakeRequest
from proxy.request_reader import RequestHead, RequestReader

#: How long a rejected connection is kept half-open to swallow the rest of the client's request.
LINGER_SECONDS = 2.0


def new_request_id() -> str:
    """A random 16-hex-digit id, set on every request and passed upstream as ``X-Request-Id``."""
    return os.urandom(8).hex()


_PHRASES = {status.value: status.phrase for status in HTTPStatus}


def http_response(
    status: int, headers: list[tuple[str, str]] | tuple[tuple[str, str], ...], body: bytes = b""
) -> bytes:
    """A complete HTTP/1.1 response head (and body)."""
    lines = [f"HTTP/1.1 {status} {_PHRASES.get(status) or HTTPStatus(status).phrase}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if status != 101:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def rejection_response(rejection: Rejection, request_id: str) -> bytes:
    """The HTTP answer to a refused handshake: status, headers and ``{"error", "detail", "request_id"}``.

    It has one ``Connection`` header, ending in ``close`` (the connection is closed after it): the
    rejection's own ``Connection`` tokens, such as 426's ``Upgrade``, come first in it.
    """
    body = json.dumps(
        {"error": rejection.reason, "detail": rejection.detail, "request_id": request_id},
        separators=(",", ":"),
    ).encode()
    connection = [value for name, value in rejection.headers if name.lower() == "connection"]
    headers = [
        ("Content-Type", "application/json"),
        ("Connection", ", ".join([*connection, "close"])),
        ("X-Request-Id", request_id),
        *((name, value) for name, value in rejection.headers if name.lower() != "connection"),
    ]
    return http_response(rejection.status, headers, body)


def verified_certificate(transport: asyncio.BaseTransport) -> ClientCertificate | None:
    """The client certificate a TLS transport's handshake verified, if any. The listener's context asks
    for one only with ``client_ca`` set, and verifies every one it gets (a failure ends the handshake), so
    a certificate here is a verified one."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return ClientCertificate.from_der(der)
    except ValueError as error:  # OpenSSL verified what cryptography cannot read: judged as no certificate
        logs.event("tls.client_certificate_unreadable", logging.WARNING, error=str(error))
        return None


class HandshakeProtocol(asyncio.Protocol):
    """One client connection from accept until its 101 or its rejection: the I/O around a
    :class:`~proxy.request_reader.RequestReader`, which does all the parsing."""

    def __init__(
        self,
        limits: Limits,
        tls: bool,
        proxy_protocol: bool,
        deadline: float,
        on_open: Callable[[HandshakeProtocol], None],
        on_request: Callable[[HandshakeProtocol, HandshakeRequest], None],
        on_bad_request: Callable[[HandshakeProtocol, Rejection], None],
        on_close: Callable[[HandshakeProtocol], None],
        refusal: Rejection | None = None,
    ) -> None:
        """``deadline`` (loop time): when the request must have arrived, ``handshake_timeout`` after the
        connection was accepted, so a TLS handshake spends the same allowance. ``on_open`` is called once
        the connection is made; ``refusal``, decided at accept, is the answer to give at once then."""
        self.request_id = new_request_id()
        self.tls = tls
        self.transport: asyncio.Transport
        self.peer_ip = "unknown"
        #: The certificate the TLS handshake verified (None: plain TCP, or none asked for or sent).
        self.client_certificate: ClientCertificate | None = None
        #: Bytes the client sent after its request (it should wait for the 101, but may not).
        self.pending = b""
        self.lost = False
        self.answered = False
        self.task: asyncio.Task[None] | None = None
        self._deadline = deadline
        self._refusal = refusal
        self._on_open = on_open
        self._on_request = on_request
        self._on_bad_request = on_bad_request
        self._on_close = on_close
        #: Reads the request; None once it gave its result.
        self._reader: RequestReader | None = RequestReader(limits.max_header_bytes, proxy_protocol)
        self._timer: asyncio.TimerHandle | None = None
        #: After a rejection: the answer is sent and what the client still sends is discarded.
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer_ip = peer_ip(self.transport.get_extra_info("peername"))
        if self.tls:
            self.client_certificate = verified_certificate(self.transport)
        self._timer = asyncio.get_running_loop().call_at(self._deadline, self._timed_out)
        self._on_open(self)
        if self._refusal is not None:
            self._on_bad_request(self, self._refusal)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        reader = self._reader
        if reader is None or self.answered:
            self.pending += data  # reading is paused; only what was already in flight lands here
            return
        result = reader.receive_data(data)
        if reader.source_ip is not None:
            self.peer_ip = normalize_ip(reader.source_ip)
        if result is None:
            return
        self._reader = None
        if isinstance(result, Rejection):
            self._on_bad_request(self, result)
            return
        self._request_complete(result)

    def _request_complete(self, head: RequestHead) -> None:
        self._cancel_timer()
        self.transport.pause_reading()
        self.pending = head.rest
        request = HandshakeRequest.build(
            request_id=self.request_id,
            method=head.method,
            target=head.target,
            http_version=head.http_version,
            headers=head.headers,
            peer_ip=self.peer_ip,
            client_ip=self.peer_ip,
            tls=self.tls,
        )
        request.client_certificate = self.client_certificate
        self._on_request(self, request)

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
        try:
            transport.write_eof()
        except OSError:  # ENOTCONN: the client is already gone; nothing is left to linger for
            transport.abort()
            return
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
