"""The sans-I/O request reader: bytes in, one result out (a request head and the bytes after it, or a
rejection), the same whatever the pieces, and never more than the limit held."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import Rejection
from proxy.request_reader import MAX_PROXY_HEADER_BYTES, RequestHead, RequestReader

UPGRADE = (
    b"GET /chat?room=1 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)
FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # a masked "Hello" the client sent too early


def read(data: bytes, pieces: list[int] | None = None, limit: int = 4096, proxy: bool = False):
    """Feed ``data`` in pieces ending at the offsets ``pieces`` (default: all at once); return the result
    with the bytes that followed it (a head's ``rest`` plus any pieces fed after), or None."""
    reader = RequestReader(limit, proxy_protocol=proxy)
    cuts = [*sorted(set(pieces or [])), len(data)]
    start = 0
    for end in cuts:
        result = reader.receive_data(data[start:end])
        start = end
        if result is not None:
            if isinstance(result, RequestHead):
                return RequestHead(
                    result.method, result.target, result.http_version, result.headers,
                    result.rest + data[start:],
                )  # fmt: skip
            return result
        bound = limit + (MAX_PROXY_HEADER_BYTES if proxy else 0)
        assert reader.buffered_bytes <= bound
    return None


def test_a_whole_request_is_read_with_the_bytes_after_it():
    head = read(UPGRADE + FRAME)
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.http_version) == ("GET", "/chat?room=1", "1.1")
    assert head.headers[0] == ("host", "example.com")
    assert ("sec-websocket-version", "13") in head.headers
    assert head.rest == FRAME


def test_a_request_byte_by_byte_is_the_same_request():
    assert read(UPGRADE + FRAME, list(range(1, len(UPGRADE) + 5))) == read(UPGRADE + FRAME)


def test_an_incomplete_request_needs_more():
    assert read(UPGRADE[:-2]) is None


def test_the_limit_counts_the_head_as_sent_at_once_or_trickled():
    exact = len(UPGRADE)
    assert isinstance(read(UPGRADE, limit=exact), RequestHead)
    assert read(UPGRADE, limit=exact - 1) == Rejection(431, "bad_request", "request headers too large")
    trickled = list(range(1, len(UPGRADE)))
    assert isinstance(read(UPGRADE, trickled, limit=exact), RequestHead)
    assert read(UPGRADE, trickled, limit=exact - 1).status == 431


def test_spaces_inside_headers_count_towards_the_limit():
    """h11 strips the spaces around a value; the limit counts the bytes that arrived."""
    padded = UPGRADE.replace(b"Host: example.com", b"Host:" + b" " * 3000 + b"example.com")
    assert read(padded, limit=4096) is not None and read(padded, limit=2048).status == 431


def test_a_huge_malformed_head_is_431_in_one_read_as_in_many():
    junk = b"GET / HTTP/1.1\r\n" + b"no colon here " * 1000 + b"\r\n\r\n"
    assert read(junk, limit=1024).status == 431
    assert read(junk, list(range(100, len(junk), 100)), limit=1024).status == 431


def test_malformed_http_is_400():
    result = read(b"GET / HTTP/1.1\r\nno colon\r\n\r\n")
    assert (result.status, result.reason) == (400, "bad_request")
    assert result.detail.startswith("malformed HTTP request")


def test_tls_bytes_on_a_plain_listener_are_400_at_the_first_byte():
    assert read(b"\x16\x03\x01\x02\x00").status == 400


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 5\r\n\r\nhello", b"Content-Length: 5\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n"],
    ids=["length-with-body", "length-body-not-sent", "chunked"],
)
def test_a_request_announcing_a_body_is_400_without_waiting_for_it(framing):
    request = UPGRADE[:-2] + framing
    assert read(request) == Rejection(400, "bad_request", "a WebSocket handshake has no body")


def test_content_length_zero_is_no_body():
    assert isinstance(read(UPGRADE[:-2] + b"Content-Length: 0\r\n\r\n"), RequestHead)


def v2_header(source: str, tlv: bytes = b"") -> bytes:
    address = ipaddress.ip_address(source)
    if address.version == 4:
        block = address.packed + bytes(4) + struct.pack("!HH", 40000, 443)
        family = 0x11
    else:
        block = address.packed + bytes(16) + struct.pack("!HH", 40000, 443)
        family = 0x21
    block += tlv
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


@pytest.mark.parametrize(
    ("header", "source"),
    [
        (b"PROXY TCP4 198.51.100.9 192.0.2.1 40000 443\r\n", "198.51.100.9"),
        (b"PROXY TCP6 2001:db8::9 2001:db8::1 40000 443\r\n", "2001:db8::9"),
        (b"PROXY UNKNOWN\r\n", None),
        (v2_header("198.51.100.9"), "198.51.100.9"),
        (v2_header("2001:db8::9", tlv=b"\x01\x00\x02h2"), "2001:db8::9"),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v1-unknown", "v2-ipv4", "v2-ipv6-tlv"],
)
def test_a_proxy_header_gives_the_source_and_then_the_request(header, source):
    for pieces in ([], [len(header)], list(range(1, len(header) + len(UPGRADE)))):
        reader = RequestReader(4096, proxy_protocol=True)
        data, start, result = header + UPGRADE, 0, None
        for end in [*pieces, len(data)]:
            result = reader.receive_data(data[start:end])
            start = end
            if result is not None:
                break
        assert isinstance(result, RequestHead) and result.target == "/chat?room=1"
        assert reader.source_ip == source


def test_a_connection_without_its_proxy_header_is_400():
    result = read(UPGRADE, proxy=True)
    assert (result.status, result.detail) == (400, "connection did not start with a PROXY protocol header")


def test_the_reader_is_finished_after_its_result():
    reader = RequestReader(4096)
    assert reader.receive_data(UPGRADE) is not None
    with pytest.raises(RuntimeError):
        reader.receive_data(b"more")


# -- properties ------------------------------------------------------------------------------------

#: Header names, except those that frame a body or name the host: a valid upgrade request has neither more.
TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~", min_size=1
).filter(lambda name: name.lower() not in ("content-length", "transfer-encoding", "host"))
VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=300)
OWS = st.sampled_from(["", " ", "  ", "\t", " " * 50])


@st.composite
def upgrade_requests(draw):
    """A valid upgrade request as bytes, the headers h11 will report, and the head's length."""
    path = "/" + draw(st.text(st.sampled_from("abc/-._~%20?=&"), max_size=200))
    headers = [("Host", "gateway.test"), ("Upgrade", "websocket"), ("Connection", "Upgrade")]
    headers += draw(st.lists(st.tuples(TOKEN, VALUE), max_size=20))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    lines = [f"GET {path} HTTP/1.1"]
    for name, value in headers:
        lines.append(f"{name}:{draw(OWS)}{value}{draw(OWS)}")
    head = (eol.join(lines) + eol + eol).encode()
    expected = tuple((name.lower(), value) for name, value in headers)
    return head, path, expected


def split_points(data_size: int):
    return st.lists(st.integers(min_value=1, max_value=max(1, data_size)), max_size=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request=upgrade_requests(),
    after=st.binary(max_size=200),
    limit=st.integers(min_value=1024, max_value=8192),
    proxy=st.sampled_from([None, b"PROXY TCP4 203.0.113.7 192.0.2.1 5000 443\r\n", v2_header("2001:db8::7")]),
    data=st.data(),
)
def test_valid_requests_read_the_same_in_any_pieces(request, after, limit, proxy, data):
    head, path, headers = request
    wire = (proxy or b"") + head + after
    whole = read(wire, limit=limit, proxy=proxy is not None)
    if len(head) > limit:
        assert whole == Rejection(431, "bad_request", "request headers too large")
    else:
        assert whole == RequestHead("GET", path, "1.1", headers, after)
    pieces = data.draw(split_points(len(wire)))
    assert read(wire, pieces, limit=limit, proxy=proxy is not None) == whole


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n", UPGRADE[:60]]),
    noise=st.binary(max_size=3000),
    proxy=st.booleans(),
    limit=st.integers(min_value=1024, max_value=2048),
    data=st.data(),
)
def test_random_bytes_give_the_same_answer_in_any_pieces(prefix, noise, proxy, limit, data):
    wire = prefix + noise
    whole = read(wire, limit=limit, proxy=proxy)
    assert whole is None or isinstance(whole, RequestHead | Rejection)
    if isinstance(whole, Rejection):
        assert whole.status in (400, 431) and whole.reason == "bad_request"
    pieces = data.draw(split_points(len(wire)))
    assert read(wire, pieces, limit=limit, proxy=proxy) == whole
