"""One HTTP upgrade request read from a client's bytes, sans-I/O: bytes in, one result out.

A :class:`RequestReader` is fed what the socket delivered, in whatever pieces TCP made, and answers each
piece with ``None`` (more bytes needed), a :class:`RequestHead` with the bytes that followed it, or a
:class:`~proxy.errors.Rejection` (400 malformed or with a body, 431 too large). With
``proxy_protocol`` the bytes must start with a PROXY v1/v2 header (:mod:`proxy.proxyproto`), whose
source address is kept in :attr:`RequestReader.source_ip`.

Two parsers, one answer. h11 is the reference: for every input the result is the one h11 gives (driven as
:class:`_H11HeadReader` drives it), accepted or refused, down to the words of a rejection. httptools
(llhttp, in C) only makes the common case cheap: the reader finds the end of the head as h11's receive
buffer does (the first blank line, CRLF or bare LF), within the same bytes, and has llhttp split the
complete head in one call. That split is used only when the head's bytes are exactly what it describes,
written in the plain form browsers send (CRLF lines, ``Name: value``, HTTP/1.1, one Host, no body
headers), and every part passes h11's own grammar (:func:`_parse_plain_head` says why h11 then reports the
same fields); anything else (llhttp refusing the bytes, bare LF, obs-fold, extra spaces in the request
line or after a colon, a Content-Length) goes to h11 with the same bytes, and its answer is the result.
``parser="h11"`` reads with h11 alone, as the reference the tests compare with;
:attr:`RequestReader.parsed_by` says which parser made a result.

What it guarantees, whatever the pieces (the property tests feed it random splits):

* the same result as for the whole input at once, so no limit depends on how TCP split the bytes;
* bounded memory: while it answers ``None`` it holds at most ``max_header_bytes`` of request, or a PROXY
  header still incomplete (at most :data:`MAX_PROXY_HEADER_BYTES`); no parser ever sees more than
  ``max_header_bytes + 1`` bytes of request before the head is complete, so none parses more either;
* no exception for any input: only :class:`RuntimeError` for a caller that feeds it after its result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import h11
import httptools

from proxy.errors import ProxyHeaderError, Rejection, RejectionTemplate
from proxy.headers import TOKEN_BYTES
from proxy.policy.values import routing_host
from proxy.proxyproto import parse_proxy_header

#: The longest PROXY header: v2's 16-byte preamble and a 16-bit length of addresses and TLVs.
MAX_PROXY_HEADER_BYTES = 16 + 0xFFFF

TOO_LARGE = RejectionTemplate(431, "bad_request", "request headers too large")
HAS_BODY = RejectionTemplate(400, "bad_request", "a WebSocket handshake has no body")

#: Which parser reads the request: httptools for the plain case with h11 for the rest, or h11 alone.
Parser = Literal["httptools", "h11"]


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
    for. ``parser`` picks how the head is parsed (see the module's docstring); the result is the same.
    """

    def __init__(
        self, max_header_bytes: int, proxy_protocol: bool = False, parser: Parser = "httptools"
    ) -> None:
        self.max_header_bytes = max_header_bytes
        #: The source address of the PROXY header, once read (None without one, or for LOCAL/UNKNOWN).
        self.source_ip: str | None = None
        #: Which parser made the result: "httptools" (the plain case), "h11", or None (no result yet, or
        #: one decided before any parser saw the request: a PROXY header refused, a first byte that
        #: cannot start a request line).
        self.parsed_by: Parser | None = None
        self._head: _H11HeadReader | _PlainHeadReader = (
            _H11HeadReader(max_header_bytes) if parser == "h11" else _PlainHeadReader(max_header_bytes)
        )
        #: Bytes of a PROXY header still incomplete, or None once it was read (or when none is expected).
        self._proxy_header: bytearray | None = bytearray() if proxy_protocol else None
        self._request_started = False
        self._finished = False

    @property
    def buffered_bytes(self) -> int:
        """How many bytes the reader holds while it waits for more."""
        held = self._head.buffered_bytes
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
        if not self._request_started and data[0] < 0x21:
            # h11 refuses these too, but in words that depend on what else has arrived (a lone CR, or a CRLF).
            return Rejection(400, "bad_request", "malformed HTTP request: illegal request line")
        self._request_started = True
        result = self._head.receive(data)
        if result is not None:
            self.parsed_by = self._head.parsed_by
        return result


class _H11HeadReader:
    """The reference: h11 reads the request head, fed at most ``max_header_bytes + 1`` bytes before the
    head is complete. Its answer is the same for any split of the same bytes."""

    parsed_by: Parser = "h11"

    def __init__(self, max_header_bytes: int) -> None:
        self._max_header_bytes = max_header_bytes
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        #: Bytes of the request given to h11 so far.
        self._fed = 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._parser.trailing_data[0])

    def receive(self, data: bytes) -> RequestHead | Rejection | None:
        # Until the head is complete h11 gets at most one byte over the limit: then it has either found the
        # head's end or knows the head is too large (431), whether the bytes came at once or one by one.
        room = self._max_header_bytes + 1 - self._fed
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
            if self._fed - len(rest) > self._max_header_bytes:
                return TOO_LARGE()
            if _announces_body(event):
                return HAS_BODY()
            if not isinstance(self._parser.next_event(), h11.EndOfMessage):  # h11: no body means this
                return HAS_BODY()
        except h11.RemoteProtocolError as error:
            if error.error_status_hint == 431:
                return TOO_LARGE()
            return Rejection(400, "bad_request", f"malformed HTTP request: {error}")
        return _routed_head(
            host=_host_header(event),
            method=event.method.decode("ascii"),
            target=event.target.decode("latin-1"),
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


#: Where h11's receive buffer ends a head: at the first blank line, each of its two line ends CRLF or LF.
_HEAD_END = re.compile(b"\n\r?\n")


class _PlainHeadReader:
    """Finds the end of the head as h11 would, within the same bytes, and parses it with httptools when it
    is written in the plain form (:func:`_parse_plain_head`); otherwise, and from then on, h11
    (:class:`_H11HeadReader`) reads the same bytes and gives the answer."""

    def __init__(self, max_header_bytes: int) -> None:
        self._max_header_bytes = max_header_bytes
        #: The request's bytes so far, at most ``max_header_bytes + 1`` (the rest of a piece is held back).
        self._received = bytearray()
        #: Where to resume looking for the head's end: a blank line may straddle two pieces.
        self._search_from = 0
        #: h11, once it reads in httptools' place.
        self._h11: _H11HeadReader | None = None
        self.parsed_by: Parser = "httptools"

    @property
    def buffered_bytes(self) -> int:
        return self._h11.buffered_bytes if self._h11 is not None else len(self._received)

    def receive(self, data: bytes) -> RequestHead | Rejection | None:
        if self._h11 is not None:
            return self._h11.receive(data)
        room = self._max_header_bytes + 1 - len(self._received)
        self._received += data[:room]
        held_back = data[room:]
        end = _HEAD_END.search(self._received, self._search_from)
        if end is None:
            if len(self._received) <= self._max_header_bytes:
                self._search_from = max(0, len(self._received) - 2)
                return None
            return self._read_with_h11(held_back)  # no end within the limit: 431, as h11 words it
        head_length = end.end()
        fields = _parse_plain_head(bytes(self._received[:head_length]))
        if fields is None:
            return self._read_with_h11(held_back)
        if head_length > self._max_header_bytes:
            return TOO_LARGE()
        method, target, headers, host = fields
        rest = bytes(self._received[head_length:]) + held_back
        return _routed_head(method, target, "1.1", headers, host, rest)

    def _read_with_h11(self, held_back: bytes) -> RequestHead | Rejection | None:
        """Everything received so far, given to h11 at once: as h11's answer does not depend on how the
        bytes were split, this is the answer h11 would have given to the pieces as they came."""
        self.parsed_by = "h11"
        self._h11 = _H11HeadReader(self._max_header_bytes)
        data = bytes(self._received) + held_back
        self._received = bytearray()
        return self._h11.receive(data)


class _HeadParts:
    """What llhttp reports of a head, through httptools' callbacks."""

    __slots__ = ("complete", "names", "target", "values")

    def __init__(self) -> None:
        self.target = b""
        self.names: list[bytes] = []
        self.values: list[bytes] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.names.append(name)
        self.values.append(value)

    def on_headers_complete(self) -> None:
        self.complete = True


#: h11's request-target bytes (``h11._abnf.request_target``): VCHAR.
_TARGET_BYTES = bytes(range(0x21, 0x7F))


def _parse_plain_head(head: bytes) -> tuple[str, str, tuple[tuple[str, str], ...], str] | None:
    """The method, target, headers and Host of a complete head (up to and including its blank line)
    written in the plain form, exactly as h11 reports them; None for any other head, which h11 must read.

    The plain form: ``METHOD SP target SP HTTP/1.1 CRLF``, then ``Name: value CRLF`` lines, then CRLF, with
    the method and the names h11 tokens, the target h11's VCHARs, no CR, LF, NUL, VT or FF in a value,
    one Host header and no Content-Length or Transfer-Encoding. llhttp proposes the split, and the head
    must be written back from it byte for byte, so nothing llhttp tolerates or trims (extra spaces, bare
    LF, obs-fold) can slip through. On such a head h11 cuts the same lines (no field holds a line end, so
    its first blank line is the last one), reads the same method and target and version 1.1, finds no
    obs-fold (a name starts every line), matches each value with its field-value grammar (SP and HTAB
    are the only whitespace left in a value) and strips the spaces and tabs around it, as done here,
    lower-cases the same names, and has nothing to refuse or merge: one Host, no body headers.
    """
    parts = _HeadParts()
    parser = httptools.HttpRequestParser(parts)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # llhttp stops after an upgrade request's head, which is all it was given
    except httptools.HttpParserError:
        return None  # h11 refuses it too, probably, and in its own words
    names, values, target, method = parts.names, parts.values, parts.target, parser.get_method()
    if not (
        parts.complete
        and parser.get_http_version() == "1.1"
        and method
        and not method.translate(None, TOKEN_BYTES)
        and target
        and not target.translate(None, _TARGET_BYTES)
        and all(names)
        and not b"".join(names).translate(None, TOKEN_BYTES)
    ):
        return None
    lines = b"\r\n".join(map(b": ".join, zip(names, values, strict=True)))
    if head != b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, target, lines):
        return None
    joined_values = b"\n".join(values)
    if (
        joined_values.count(b"\n") != len(values) - 1  # a value holds an LF
        or b"\r" in joined_values
        or b"\x00" in joined_values
        or b"\x0b" in joined_values
        or b"\x0c" in joined_values
    ):
        return None
    # Names are ASCII tokens and no value holds an LF, so each list is lowered or decoded in one piece. With
    # CR, LF, VT and FF ruled out, bytes.strip() strips what h11 strips around a value: spaces and tabs.
    lowered = b"\n".join(names).lower().decode("latin-1").split("\n")
    if lowered.count("host") != 1 or "content-length" in lowered or "transfer-encoding" in lowered:
        return None
    stripped = b"\n".join(map(bytes.strip, values)).decode("latin-1").split("\n")
    headers = tuple(zip(lowered, stripped, strict=True))
    return method.decode("ascii"), target.decode("ascii"), headers, stripped[lowered.index("host")]


def _routed_head(
    method: str,
    target: str,
    http_version: str,
    headers: tuple[tuple[str, str], ...],
    host: str | None,
    rest: bytes,
) -> RequestHead | Rejection:
    """The head, or 400 when the host it is routed by (its target's or its ``host`` header's) is not valid."""
    try:
        routing_host(target, host)
    except ValueError as error:
        return Rejection(400, "bad_request", str(error))
    return RequestHead(method=method, target=target, http_version=http_version, headers=headers, rest=rest)
