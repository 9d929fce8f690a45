"""The upstream handshake's bytes: the request as h11 would write it, the answer read as h11 reads it.

httptools (llhttp) reads the common 101; anything else goes to h11. The property tests check that the
result, for any answer cut anywhere, is the one h11 alone gives.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import upstream_answer
from proxy.errors import UpstreamError, UpstreamUnreachable
from proxy.upstream_answer import _H11_REQUEST_HEADERS, Answer, AnswerReader, request_bytes

HEADERS = [
    ("host", "upstream.internal:8080"),
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("sec-websocket-version", "13"),
    ("x-forwarded-for", "203.0.113.7"),
    ("x-user-id", "alice \xe9"),
]


def test_request_bytes_are_what_h11_writes() -> None:
    connection = h11.Connection(h11.CLIENT)
    reordered = [HEADERS[5], *HEADERS[:5], HEADERS[6]]  # Host first, whatever the order given
    expected = connection.send(
        h11.Request(
            method=b"GET",
            target=b"/echo?x=1",
            headers=[(name.encode("latin-1"), value.encode("latin-1")) for name, value in reordered],
        )
    )
    assert request_bytes("/echo?x=1", reordered) == expected


def h11_answer(pieces: list[bytes]) -> tuple[str, object]:
    """What reading the answer with h11 alone gave (the reader before httptools), as (kind, detail)."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=upstream_answer.MAX_ANSWER_BYTES)
    connection.send(h11.Request(method=b"GET", target=b"/", headers=_H11_REQUEST_HEADERS))
    for piece in pieces:
        connection.receive_data(piece)
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError:
                return ("unreachable", None)
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                connection.next_event()
                headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
                return ("101", (headers, bytes(connection.trailing_data[0])))
            if isinstance(event, h11.Response):
                return ("unreachable" if event.status_code >= 500 else "refused", event.status_code)
    return ("incomplete", None)


def reader_answer(pieces: list[bytes]) -> tuple[str, object]:
    reader = AnswerReader()
    for piece in pieces:
        try:
            answer = reader.receive_data(piece)
        except UpstreamUnreachable as error:
            status = int(str(error).split()[3]) if "answered HTTP" in str(error) else None
            return ("unreachable", status)
        except UpstreamError as error:
            return ("refused", int(str(error).split()[3]))
        if answer is not None:
            return ("101", (answer.headers, answer.rest))
    return ("incomplete", None)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({point % (len(data) + 1) for point in points})
    return [data[a:b] for a, b in zip([0, *marks], [*marks, len(data)], strict=True) if b > a]


SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nX-Extra:  padded \t\r\n\r\n"
)


def test_a_common_101_is_read_by_llhttp_with_what_follows() -> None:
    reader = AnswerReader()
    answer = reader.receive_data(SWITCHING + b"\x81\x02hi")
    assert answer == Answer(
        [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ("x-extra", "padded"),
        ],
        b"\x81\x02hi",
    )
    assert reader._h11 is None  # the fast path took it


UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 101 OK\nUpgrade: websocket\n\nrest", "101"),  # bare LF: h11 takes it
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n", "101"),
        (b"HTTP/1.1 101 OK\r\n\r\n", "101"),
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "refused"),
        (b"HTTP/1.1 503 Busy\r\n\r\n", "unreachable"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "unreachable"),
        (b"HTTP/1.1 101 OK\r\nX: a\r\n b\r\n\r\n", "101"),  # obs-fold: h11 joins the lines
        (b"HTTP/1.1 101 OK\r\nX: a\x0bb\r\n\r\n", "unreachable"),
        (b"HTTP/1.1 101 OK\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n", "101"),  # whole in one read
        # llhttp takes these as 101s; h11 refuses them (and so the reader, as it always did)
        (b"HTTP/1.1 101 OK\r\n" + UPGRADE + b"Transfer-Encoding: gzip\r\n\r\n", "unreachable"),
        (b"HTTP/1.1 101 OK\r\n" + UPGRADE + b"Transfer-Encoding: chunked\r\n" * 2 + b"\r\n", "unreachable"),
        (b"HTTP/1.1 101 OK\r\n" + UPGRADE + b"Content-Length: 0\r\n\r\n", "101"),
        (b"HTTP/1.1 101 Sw\x0bitch\r\n" + UPGRADE + b"\r\n", "unreachable"),
        (b"HTTP/1.1 101 Sw\x00itch\r\n" + UPGRADE + b"\r\n", "unreachable"),
        (b"\r\nHTTP/1.1 101 OK\r\n" + UPGRADE + b"\r\n", "unreachable"),
    ],
)
def test_unusual_answers_are_judged_as_h11_judges_them(answer: bytes, expected: str) -> None:
    assert reader_answer([answer])[0] == expected
    assert reader_answer([answer]) == h11_answer([answer])


def test_an_interim_answer_in_the_same_read_lends_the_101_none_of_its_headers() -> None:
    answer = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nSec-WebSocket-Extensions: x\r\n\r\n"
        b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    for pieces in ([answer], [answer[:40], answer[40:]]):
        kind, detail = reader_answer(pieces)
        assert (kind, detail) == h11_answer(pieces)
        assert kind == "101" and [name for name, _ in detail[0]] == ["upgrade", "connection"]


def test_a_head_longer_than_the_bound_is_refused_while_it_is_incomplete() -> None:
    pieces = [b"HTTP/1.1 101 OK\r\nX: " + b"a" * 10000, b"a" * 10000, b"\r\n\r\n"]
    assert reader_answer(pieces) == h11_answer(pieces) == ("unreachable", None)


header_names = st.sampled_from(
    [
        "Transfer-Encoding",
        "Content-Length",
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Accept",
        "X-A",
        "x-b",
        "Bad Name",
        "",
    ]
)
header_values = st.binary(max_size=12) | st.sampled_from([b"websocket", b"Upgrade", b" v ", b"a\tb", b"\xe9"])
statuses = st.sampled_from([b"101", b"100", b"200", b"302", b"403", b"502", b"1O1", b"99"])


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    newline = draw(st.sampled_from([b"\r\n", b"\n"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1"]))
    reason = draw(st.sampled_from([b"OK", b"", b"Switching", b"Sw\x0bitch", b"a\tb", b"\xe9t\xe9"]))
    lines = [version + b" " + draw(statuses) + b" " + reason]
    if draw(st.booleans()):  # llhttp reads a 101 as an upgrade only with these
        lines += [b"Upgrade: websocket", b"Connection: Upgrade"]
    for _ in range(draw(st.integers(0, 5))):
        separator = draw(st.sampled_from([b": ", b":", b" : "]))
        lines.append(draw(header_names).encode() + separator + draw(header_values))
    data = newline.join(lines) + newline + newline + draw(st.binary(max_size=8))
    interim = draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n", b"\r\n"]))
    data = interim + data
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
    return data


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(answers(), st.lists(st.integers(0, 400), max_size=4))
def test_any_answer_cut_anywhere_is_read_as_h11_reads_it(answer: bytes, points: list[int]) -> None:
    pieces = cut(answer, points)
    assert reader_answer(pieces) == h11_answer(pieces)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=3))
def test_random_bytes_are_read_as_h11_reads_them(data: bytes, points: list[int]) -> None:
    pieces = cut(SWITCHING[:40] + data, points)
    assert reader_answer(pieces) == h11_answer(pieces)
