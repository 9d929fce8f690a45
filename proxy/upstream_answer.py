"""The client side of the upstream's HTTP handshake, sans-I/O: the request's bytes, a reader of the answer.

The request is written directly: its target and every header value were already read and validated as
HTTP when the client's request was parsed (:mod:`proxy.request_reader`), or were made by the gateway
(``X-Forwarded-*``, ``X-Request-Id``, claim and certificate headers, whose values ``upstream.py`` cleans of
control characters and surrounding whitespace). ``Host`` comes first, as RFC 9112 3.2 asks.

The answer is parsed by httptools (llhttp, in C) and, for anything llhttp will not take as it comes (bare LF
line endings, an interim 1xx before the 101, a 101 without ``Upgrade``, a malformed answer), by h11 over the
same bytes, which was the only parser before: an upstream's answer is accepted or refused exactly as h11
accepts or refuses it, and the common case costs a few microseconds instead of tens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import h11
import httptools

from proxy.errors import UpstreamError, UpstreamUnreachable
from proxy.headers import TOKEN_BYTES

#: What h11 must have sent to read a 101 as the switch it asked for (its bytes are not used).
_H11_REQUEST_HEADERS = [(b"host", b"upstream"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")]

#: The longest answer head read before giving up (h11's default bound on an incomplete event).
MAX_ANSWER_BYTES = 16 * 1024


def request_bytes(target: str, headers: list[tuple[str, str]]) -> bytes:
    """``GET target HTTP/1.1`` with ``headers`` (text standing for latin-1 bytes), ``Host`` first."""
    lines = [f"GET {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers if name == "host")
    lines.extend(f"{name}: {value}" for name, value in headers if name != "host")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


@dataclass(frozen=True, slots=True)
class Answer:
    """The upstream's 101: its headers (lower-case names, latin-1 values) and the bytes that followed it."""

    headers: list[tuple[str, str]]
    rest: bytes


class AnswerReader:
    """Reads the upstream's answer to the handshake request until its 101.

    :meth:`receive_data` returns None while more bytes are needed, or the :class:`Answer`; it raises
    :class:`~proxy.errors.UpstreamUnreachable` for an answer that is not HTTP or is a 5xx (the endpoint is
    failing), :class:`~proxy.errors.UpstreamError` for another final status (the upstream's answer to this
    request). After a result or an error it must not be fed again.
    """

    def __init__(self) -> None:
        self._received = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        #: Answers llhttp began to read: a 101 read by it must be the first (an interim 1xx goes to h11).
        self._answers = 0
        #: The status llhttp has read (0 before), checked once its headers are complete.
        self._status = 0
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._h11: h11.Connection | None = None

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self._answers += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._status = self._parser.get_status_code()

    def receive_data(self, data: bytes) -> Answer | None:
        if self._h11 is not None:
            return self._receive_h11(data)
        self._received += data
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self._answers == 1 and self._status == 101 and self._h11_would_take():
                return Answer(_text_headers(self._headers), bytes(data[upgrade.args[0] :]))
            return self._receive_h11(b"")
        except httptools.HttpParserError:
            return self._receive_h11(b"")
        if self._status or len(self._received) > MAX_ANSWER_BYTES:
            # anything but a 101 (an interim answer, a refusal) or a head too long: h11 decides, as it
            # decided before, so an endpoint is marked failing for exactly the answers it was before
            return self._receive_h11(b"")
        return None

    def _h11_would_take(self) -> bool:
        """Whether h11 reads this 101 as llhttp did: llhttp is laxer in places (controls in the reason
        phrase or a value, a blank line before the status line, body headers on a 101, which h11 refuses)."""
        received = self._received
        end = received.find(b"\r\n")
        if end < 0 or _STATUS_LINE.fullmatch(received, 0, end) is None:
            return False
        for name, value in self._headers:
            token = name and not name.translate(None, TOKEN_BYTES)
            if not token or not _FIELD_VALUE.fullmatch(value.strip(b" \t")) or name.lower() in _BODY_HEADERS:
                return False
        return True

    def _receive_h11(self, data: bytes) -> Answer | None:
        if self._h11 is None:
            self._parser = None
            self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER_BYTES)
            self._h11.send(h11.Request(method=b"GET", target=b"/", headers=_H11_REQUEST_HEADERS))
            data = bytes(self._received) + data
            self._received = bytearray()
        parser = self._h11
        parser.receive_data(data)
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as error:
                raise UpstreamUnreachable(f"invalid HTTP from upstream: {error}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                parser.next_event()  # PAUSED: what follows the 101 is WebSocket frames
                return Answer(_text_headers(event.headers), bytes(parser.trailing_data[0]))
            if isinstance(event, h11.Response):
                _refuse(event.status_code)


def _refuse(status: int) -> None:
    """A final answer instead of the 101: 5xx, this endpoint is failing and another may serve; else the
    upstream's answer to this request."""
    error = UpstreamUnreachable if status >= 500 else UpstreamError
    raise error(f"upstream answered HTTP {status} instead of 101")


#: A header value as h11 reads it: no NUL, no whitespace but inner SP and HTAB.
_FIELD_VALUE = re.compile(rb"([^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
#: A status line as h11 reads it (RFC 9112 4): version, code, and a reason of SP, HTAB and visible bytes.
_STATUS_LINE = re.compile(rb"HTTP/[0-9]\.[0-9] [0-9]{3}(?: (?:[ \t]|[^\x00\s])*)?")
#: Headers that give a message a body: h11 judges a 101 carrying them.
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding"})


def _text_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header pairs as text: names lower case, values stripped of surrounding whitespace, latin-1."""
    return [
        (name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")) for name, value in headers
    ]
