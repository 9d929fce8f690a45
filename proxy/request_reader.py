"""One HTTP upgrade request read from a client's bytes, sans-I/O: bytes in, one result out.

A :class:`RequestReader` is fed what the socket delivered, in whatever pieces TCP made, and answers each
piece with ``None`` (more bytes needed), a :class:`RequestHead` with the bytes that followed it, or a
:class:`~proxy.errors.Rejection` (400 malformed or with a body, 431 too large). With
``proxy_protocol`` the bytes must start with a PROXY v1/v2 header (:mod:`proxy.proxyproto`), whose
source address is kept in :attr:`RequestReader.source_ip`. h11 parses the request itself.

What it guarantees, whatever the pieces (the property tests feed it random splits):

* the same result as for the whole input at once, so no limit depends on how TCP split the bytes;
* bounded memory: while it answers ``None`` it holds at most ``max_header_bytes`` of request, or a PROXY
  header still incomplete (at most :data:`MAX_PROXY_HEADER_BYTES`); h11 never sees more than
  ``max_header_bytes + 1`` bytes before the request head is complete, so it never parses more either;
* no exception for any input: only :class:`RuntimeError` for a caller that feeds it after its result.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

from proxy.errors import ProxyHeaderError, Rejection, RejectionTemplate
from proxy.policy.values import routing_host
from proxy.proxyproto import parse_proxy_header

#: The longest PROXY header: v2's 16-byte preamble and a 16-bit length of addresses and TLVs.
MAX_PROXY_HEADER_BYTES = 16 + 0xFFFF

TOO_LARGE = RejectionTemplate(431, "bad_request", "request headers too large")
HAS_BODY = RejectionTemplate(400, "bad_request", "a WebSocket handshake has no body")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head as the client sent it (header names lower case, values as sent), and ``rest``: the
    bytes after it, which a client should not send before the 101 but may."""

    method: str
    target: str
    http_version: str
    headers: tuple[tuple[str, str], ...]
    rest: bytes


class RequestReader:
    """Reads one upgrade request (after a PROXY header when ``proxy_protocol``), bounded in bytes.

    The size bound is on the request head as it arrived: from its first byte to the blank line that ends
    its headers, at most ``max_header_bytes``, else 431. A request with a body (a ``Transfer-Encoding``, or
    a ``Content-Length`` other than 0) is refused from its headers alone, before any body byte is waited
    for.
    """

    def __init__(self, max_header_bytes: int, proxy_protocol: bool = False) -> None:
        self.max_header_bytes = max_header_bytes
        #: The source address of the PROXY header, once read (None without one, or for LOCAL/UNKNOWN).
        self.source_ip: str | None = None
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        #: Bytes of a PROXY header still incomplete, or None once it was read (or when none is expected).
        self._proxy_header: bytearray | None = bytearray() if proxy_protocol else None
        #: Bytes of the request given to h11 so far.
        self._fed = 0
        self._finished = False

    @property
    def buffered_bytes(self) -> int:
        """How many bytes the reader holds while it waits for more."""
        held = len(self._parser.trailing_data[0])
        return held + (len(self._proxy_header) if self._proxy_header is not None else 0)

    def receive_data(self, data: bytes) -> RequestHead | Rejection | None:
        """Take the next bytes from the client.

        Returns:
            None while more bytes are needed; else the request, or the rejection to answer with. Either
            result is final.

        Raises:
            RuntimeError: called again after a result.
        """
        if self._finished:
            raise RuntimeError("the request was already read")
        result = self._receive(data)
        self._finished = result is not None
        return result

    def _receive(self, data: bytes) -> RequestHead | Rejection | None:
        if not data:  # h11 would read an empty piece as the end of the stream
            return None
        if self._proxy_header is not None:
            self._proxy_header += data
            try:
                parsed = parse_proxy_header(bytes(self._proxy_header))
            except ProxyHeaderError as error:
                return Rejection(400, "bad_request", str(error))
            if parsed is None:
                return None
            self.source_ip, length = parsed
            data = bytes(self._proxy_header[length:])
            self._proxy_header = None
            if not data:  # the header came alone, as balancers often send it
                return None
        if self._fed == 0 and data[0] < 0x21:
            # h11 refuses these too, but in words that depend on what else has arrived (a lone CR, or a CRLF).
            return Rejection(400, "bad_request", "malformed HTTP request: illegal request line")
        # Until the head is complete h11 gets at most one byte over the limit: then it has either found the
        # head's end or knows the head is too large (431), whether the bytes came at once or one by one.
        room = self.max_header_bytes + 1 - self._fed
        held_back = data[room:]
        self._parser.receive_data(data[:room])
        self._fed += min(len(data), room)
        try:
            event = self._parser.next_event()
            if event is h11.NEED_DATA:
                return None
            if not isinstance(event, h11.Request):  # nothing else can come first from a client
                return Rejection(400, "bad_request", "malformed HTTP request")
            rest = self._parser.trailing_data[0]
            if self._fed - len(rest) > self.max_header_bytes:
                return TOO_LARGE()
            if _announces_body(event):
                return HAS_BODY()
            if not isinstance(self._parser.next_event(), h11.EndOfMessage):  # h11: no body means this
                return HAS_BODY()
        except h11.RemoteProtocolError as error:
            if error.error_status_hint == 431:
                return TOO_LARGE()
            return Rejection(400, "bad_request", f"malformed HTTP request: {error}")
        target = event.target.decode("latin-1")
        try:
            routing_host(target, _host_header(event))
        except ValueError as error:
            return Rejection(400, "bad_request", str(error))
        return RequestHead(
            method=event.method.decode("ascii"),
            target=target,
            http_version=event.http_version.decode("ascii"),
            headers=tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers),
            rest=rest + held_back,
        )


def _host_header(request: h11.Request) -> str | None:
    for name, value in request.headers:
        if name == b"host":
            return value.decode("latin-1")
    return None


def _announces_body(request: h11.Request) -> bool:
    """Whether the request says a body follows (h11 has already refused a malformed Content-Length)."""
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and int(value) != 0):
            return True
    return False
