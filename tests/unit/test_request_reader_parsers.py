"""The request reader's two parsers give one answer: whatever the bytes and however they are split, the
reader (httptools for the plain case, h11 for the rest) returns exactly what h11 alone returns, and a
browser's ordinary upgrade request takes the httptools path."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.errors import Rejection
from proxy.request_reader import MAX_PROXY_HEADER_BYTES, Parser, RequestHead, RequestReader

#: Chromium's upgrade request, with a bearer token and cookies as an application adds them.
BEARER = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9." + "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ" * 5 + ".c2ln"
)
CHROMIUM = [
    ("Host", "gateway.example.com"),
    ("Connection", "Upgrade"),
    ("Pragma", "no-cache"),
    ("Cache-Control", "no-cache"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0"),
    ("Upgrade", "websocket"),
    ("Origin", "https://app.example.com"),
    ("Sec-WebSocket-Version", "13"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Accept-Language", "en-US,en;q=0.9"),
    ("Authorization", f"Bearer {BEARER}"),
    ("Cookie", "session=5f2b8c1e9a; theme=dark; _ga=GA1.2.1234567890.1700000000"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
]
FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
PROXY_V1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 5000 443\r\n"


def plain(headers: list[tuple[str, str]], target: str = "/chat?room=1") -> bytes:
    lines = [f"GET {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class Reading:
    result: RequestHead | Rejection | None
    parsed_by: Parser | None
    source_ip: str | None


def read(
    data: bytes, parser: Parser, pieces: list[int] = (), limit: int = 4096, proxy: bool = False
) -> Reading:
    """Feed ``data`` in pieces ending at the offsets ``pieces``; the result carries in ``rest`` every byte
    after the head, fed with it or after it."""
    reader = RequestReader(limit, proxy_protocol=proxy, parser=parser)
    start = 0
    for end in [*sorted(set(pieces)), len(data)]:
        result = reader.receive_data(data[start:end])
        start = end
        if isinstance(result, RequestHead):
            result = RequestHead(
                result.method, result.target, result.http_version, result.headers, result.rest + data[start:]
            )
        if result is not None:
            return Reading(result, reader.parsed_by, reader.source_ip)
        assert reader.buffered_bytes <= limit + (MAX_PROXY_HEADER_BYTES if proxy else 0)
        assert reader.parsed_by is None
    return Reading(None, None, reader.source_ip)


def test_a_browsers_upgrade_request_takes_the_httptools_path():
    wire = plain(CHROMIUM) + FRAME
    for pieces in ([], [100, 101, 500], list(range(1, len(wire)))):
        reading = read(wire, "httptools", pieces, limit=8192)
        assert reading.parsed_by == "httptools"
        assert reading.result == RequestHead(
            "GET", "/chat?room=1", "1.1", tuple((name.lower(), value) for name, value in CHROMIUM), FRAME
        )
        assert reading == Reading(read(wire, "h11", limit=8192).result, "httptools", None)


def test_the_httptools_path_still_refuses_a_head_over_the_limit_and_a_bad_host():
    wire = plain(CHROMIUM)
    assert read(wire, "httptools", limit=len(wire)).parsed_by == "httptools"
    too_large = read(wire, "httptools", limit=len(wire) - 1)
    assert too_large == Reading(Rejection(431, "bad_request", "request headers too large"), "httptools", None)
    bad_host = plain([("Host", "bad host!"), *CHROMIUM[1:]])
    reading = read(bad_host, "httptools", limit=8192)
    assert reading.parsed_by == "httptools" and reading.result == read(bad_host, "h11", limit=8192).result
    assert reading.result.status == 400


#: Heads llhttp accepts, or splits differently from h11, or that h11 reads in its own way. Most go to h11;
#: whitespace around a value the plain form's write-back can see is stripped as h11 strips it.
STRIPPED_ON_THE_HTTPTOOLS_PATH = {"trailing space in a value", "trailing tab in a value", "an empty value"}
UNUSUAL = {
    "two spaces after the method": plain(CHROMIUM).replace(b"GET ", b"GET  ", 1),
    "trailing space in a value": plain(CHROMIUM).replace(b"Upgrade\r\n", b"Upgrade \r\n", 1),
    "trailing tab in a value": plain(CHROMIUM).replace(b"websocket\r\n", b"websocket\t\r\n", 1),
    "two spaces before a value": plain(CHROMIUM).replace(b"Pragma: ", b"Pragma:  ", 1),
    "no space before a value": plain(CHROMIUM).replace(b"Pragma: ", b"Pragma:", 1),
    "an empty value": plain([*CHROMIUM, ("X-Empty", "")]),
    "an empty value, no space": plain(CHROMIUM)[:-2] + b"X-Empty:\r\nX-Next: 1\r\n\r\n",
    "bare LF line ends": plain(CHROMIUM).replace(b"\r\n", b"\n"),
    "one bare LF": plain(CHROMIUM).replace(b"no-cache\r\n", b"no-cache\n", 1),
    "a CR inside a value": plain(CHROMIUM).replace(b"no-cache", b"no\rcache", 1),
    "obs-fold": plain(CHROMIUM).replace(b"\r\nPragma", b" folded\r\n\tPragma", 1),
    "space before a colon": plain(CHROMIUM).replace(b"Pragma:", b"Pragma :", 1),
    "two Host headers": plain([*CHROMIUM, ("Host", "other.example.com")]),
    "no Host header": plain(CHROMIUM[1:]),
    "Content-Length: 0": plain([*CHROMIUM, ("Content-Length", "0")]),
    "Content-Length: 0, 0": plain([*CHROMIUM, ("Content-Length", "0, 0")]),
    "two Content-Length: 0": plain([*CHROMIUM, ("Content-Length", "0"), ("content-length", "0")]),
    "Content-Length: 5": plain([*CHROMIUM, ("Content-Length", "5")]) + b"hello",
    "Transfer-Encoding": plain([*CHROMIUM, ("Transfer-Encoding", "chunked")]),
    "HTTP/1.0": plain(CHROMIUM).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    "HTTP/2.0": plain(CHROMIUM).replace(b"HTTP/1.1", b"HTTP/2.0", 1),
    "a lower-case method": plain(CHROMIUM).replace(b"GET", b"get", 1),
    "a method llhttp does not know": plain(CHROMIUM).replace(b"GET", b"FETCH", 1),
    "a high byte in the target": plain(CHROMIUM, target="/caf\xe9"),
    "a NUL in a value": plain(CHROMIUM).replace(b"no-cache", b"no\x00cache", 1),
    "a VT in a value": plain(CHROMIUM).replace(b"no-cache", b"no\x0bcache", 1),
    "a high byte in a name": plain([*CHROMIUM, ("X-Caf\xe9", "1")]),
}


@pytest.mark.parametrize("case", UNUSUAL)
def test_unusual_heads_read_as_h11_reads_them(case):
    wire = UNUSUAL[case] + FRAME
    reading = read(wire, "httptools", limit=8192)
    assert reading.result == read(wire, "h11", limit=8192).result
    assert reading.parsed_by == ("httptools" if case in STRIPPED_ON_THE_HTTPTOOLS_PATH else "h11")


@pytest.mark.parametrize(
    "headers",
    [
        [("Host", "a.test"), ("X-Ctl", "a\x01b\x7fc"), ("X-High", "caf\xe9 \xff")],  # h11 allows these
        [("Host", "a.test"), ("X-Inner", "a \t b"), ("X-Colon", "a: b")],
        [("HOST", "a.test"), ("x-MiXeD", "1"), ("Upgrade", "websocket")],
    ],
    ids=["control-and-high-bytes", "inner-whitespace-and-colon", "name-case"],
)
def test_plain_heads_with_unusual_but_valid_values_read_the_same(headers):
    wire = plain(headers)
    reading, reference = read(wire, "httptools"), read(wire, "h11")
    assert reading.result == reference.result and isinstance(reading.result, RequestHead)


# -- differential properties --------------------------------------------------------------------------

TCHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~"
#: Value characters: printable ones, the controls and high bytes h11 tolerates, inner whitespace, colons
#: (what h11 refuses in a value comes from VALUE's samples and from the random edits).
VALUE_CHARS = st.one_of(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), st.sampled_from(" \t:\x01\x7f\x80\xe9\xff")
)
NAME = st.one_of(
    *[st.text(TCHARS, min_size=1, max_size=20)] * 6, st.sampled_from(["Host", "host", "X-\xe9", "A B", ""])
)
VALUE = st.one_of(
    *[st.text(VALUE_CHARS, max_size=80)] * 6,
    st.sampled_from(["websocket", "", " ", "a\x00b", "a\x0bb", "a\x0cb", "a\rb", "a\nb"]),
)
SEPARATOR = st.sampled_from([": "] * 12 + [":", ":  ", ": \t", ":\t", " : ", " :", "\t:"])
TRAILER = st.sampled_from([""] * 12 + [" ", "\t", " \t"])
LINE_END = st.sampled_from(["\r\n"] * 12 + ["\n", "\r\r\n", "\r"])
EXTRA_HEADERS = st.sampled_from(
    [
        [("Host", "other.test")],
        [("Content-Length", "0")],
        [("Content-Length", "0"), ("Content-Length", "0")],
        [("Content-Length", "0, 0")],
        [("Content-Length", "7")],
        [("Content-Length", "x")],
        [("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "gzip")],
        [("Connection", "close")],
        [("Expect", "100-continue")],
    ]
)
METHOD = st.sampled_from(
    ["GET"] * 8 + ["get", "POST", "CONNECT", "OPTIONS", "M-SEARCH", "FETCH", "PRI", "G\xe9T"]
)
TARGET = st.one_of(
    st.sampled_from(["/", "/chat?room=1", "*", "http://a.test/ws", "a.test:443", "/caf\xe9", "/a b", ""]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60).map(
        lambda t: "/" + t
    ),
)
PATH = st.text(st.sampled_from("abcxyz019/-._~%?=&+:@!$'()*,;"), max_size=200).map(lambda t: "/" + t)
VERSION = st.sampled_from(
    ["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "http/1.1", "HTTP/1.1 "]
)
LINE_SPACE = st.sampled_from([" "] * 12 + ["  ", "\t"])
#: Bytes a random edit inserts or writes over: line ends, whitespace, colons, the bytes h11 refuses.
EDIT_BYTES = st.one_of(
    st.sampled_from(
        [
            *(b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b": ", b"\x00", b"\x0b", b"\x0c", b"\x7f", b"\xff"),
            *(
                b"\r\n ",
                b"\r\n\t",
                b"\r\n\r\n",
                b"\n\n",
                b"\n\r\n",
                b"Host: x.test\r\n",
                b"Content-Length: 0\r\n",
            ),
        ]
    ),
    st.binary(min_size=1, max_size=6),
)


@st.composite
def heads(draw):
    """A request head: most often the plain form of a browser's upgrade request, varied in its headers
    and their values, with now and then one of the deviations h11 and llhttp read differently."""
    headers = [
        ("Host", draw(st.sampled_from(["gateway.example.com", "a.test:8443", "[2001:db8::1]", "bad host"])))
    ]
    headers += draw(st.lists(st.sampled_from(CHROMIUM[1:]), max_size=14, unique=True))
    if draw(st.booleans()):
        headers += draw(st.lists(st.tuples(NAME, VALUE), max_size=4))
    if draw(st.integers(0, 3)) == 0:
        headers += draw(EXTRA_HEADERS)
    headers = draw(st.permutations(headers))
    if draw(st.integers(0, 3)) == 0:  # a head near a limit of a few KiB
        headers.append(("X-Padding", "p" * draw(st.integers(0, 6000))))
    deviate = draw(st.integers(0, 3)) == 0
    space = draw(LINE_SPACE) if deviate else " "
    method, version = (draw(METHOD), draw(VERSION)) if deviate else ("GET", "HTTP/1.1")
    target = draw(TARGET if deviate else PATH)
    line = f"{method}{space}{target}{space}{version}"
    wire = line + (draw(LINE_END) if deviate else "\r\n")
    for name, value in headers:
        if deviate:
            wire += f"{name}{draw(SEPARATOR)}{value}{draw(TRAILER)}{draw(LINE_END)}"
        else:
            wire += f"{name}: {value}\r\n"
    wire += draw(LINE_END) if deviate else "\r\n"
    return wire.encode("latin-1")


@st.composite
def edited(draw, data: bytes):
    """``data`` with a few random edits: bytes inserted, written over or deleted."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        kind = draw(st.sampled_from(["insert", "replace", "delete"]))
        piece = draw(EDIT_BYTES)
        if kind == "insert":
            out[at:at] = piece
        elif kind == "replace":
            out[at : at + len(piece)] = piece
        else:
            del out[at : at + draw(st.integers(1, 8))]
    return bytes(out)


AFTER = st.one_of(
    st.sampled_from([b"", FRAME, plain(CHROMIUM[:3]), b"\r\n", b"hello"]), st.binary(max_size=40)
)


def pieces(data: st.DataObject, size: int) -> list[int]:
    return data.draw(st.lists(st.integers(min_value=1, max_value=max(1, size)), max_size=20))


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(head=heads(), edit=st.integers(0, 3), after=AFTER, proxy=st.booleans(), data=st.data())
def test_any_head_reads_as_h11_alone_reads_it(head, edit, after, proxy, data):
    if edit == 0:
        head = data.draw(edited(head))
    wire = (PROXY_V1 if proxy else b"") + head + after
    if data.draw(st.booleans()):  # a limit around the head's length, where 431 starts
        limit = max(1, len(head) + data.draw(st.integers(-3, 3)))
    else:
        limit = data.draw(st.integers(min_value=256, max_value=8192))
    reading = read(wire, "httptools", pieces(data, len(wire)), limit, proxy)
    reference = read(wire, "h11", pieces(data, len(wire)), limit, proxy)
    event(f"parsed by {reading.parsed_by}")
    assert reading.result == reference.result
    assert reading.source_ip == reference.source_ip
    assert reading.parsed_by in (None, "httptools", "h11")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(
        [b"", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a.test\r\n", plain(CHROMIUM)[:200]]
    ),
    noise=st.binary(max_size=2000),
    limit=st.integers(min_value=64, max_value=2048),
    data=st.data(),
)
def test_random_bytes_read_as_h11_alone_reads_them(prefix, noise, limit, data):
    wire = prefix + noise
    reading = read(wire, "httptools", pieces(data, len(wire)), limit)
    assert reading.result == read(wire, "h11", pieces(data, len(wire)), limit).result
