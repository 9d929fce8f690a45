"""The frame core, byte by byte: bytes in, what is forwarded and what closes out (RFC 6455 section 5).

Frames are built and read here with small helpers of their own, not with ``proxy.frames``, so the core is not
tested against its own encoder.
"""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.policy.model import MessageRate, MessageRules
from proxy.protocol import Events, FrameReader
from proxy.rules import MessageChecker

TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
MIB = 1024 * 1024


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head.append(bit | length)
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if mask:
        key = os.urandom(4)
        head += key
        payload = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    return bytes(head) + payload


def close(code: int, reason: bytes = b"", mask: bool = True) -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason, mask=mask)


def parse(stream: bytes) -> list[tuple[bool, int, bytes, bool]]:
    """Frames as (fin, opcode, unmasked payload, was masked); the stream must end on a frame boundary."""
    frames, pos = [], 0
    while pos < len(stream):
        b0, b1 = stream[pos], stream[pos + 1]
        length, pos = b1 & 0x7F, pos + 2
        if length == 126:
            (length,), pos = struct.unpack("!H", stream[pos : pos + 2]), pos + 2
        elif length == 127:
            (length,), pos = struct.unpack("!Q", stream[pos : pos + 8]), pos + 8
        key = stream[pos : pos + 4] if b1 & 0x80 else b""
        pos += len(key)
        payload = stream[pos : pos + length]
        assert len(payload) == length, "the core left the other side inside a frame"
        if key:
            payload = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
        frames.append((bool(b0 & 0x80), b0 & 0x0F, payload, bool(key)))
        pos += length
    return frames


def messages(stream: bytes) -> list[tuple[int, bytes]]:
    """Whole messages and control frames, in order, as the receiving side reassembles them."""
    out: list[tuple[int, bytes]] = []
    current: list[object] | None = None
    for fin, opcode, payload, _ in parse(stream):
        if opcode & 0x8:
            out.append((opcode, payload))
            continue
        if opcode:
            assert current is None, "a new message began inside another"
            current = [opcode, payload]
        else:
            assert current is not None, "a continuation outside a message"
            current[1] = current[1] + payload  # type: ignore[operator]
        if fin:
            out.append((current[0], current[1]))  # type: ignore[arg-type]
            current = None
    return out


def client_reader(max_bytes: int = MIB, max_fragments: int = 1024, **rules: object) -> FrameReader:
    checker = MessageChecker(MessageRules(max_message_bytes=max_bytes, **rules), None, 0.0)  # type: ignore[arg-type]
    return FrameReader(True, max_bytes, max_fragments, checker)


def feed(reader: FrameReader, *chunks: bytes) -> bytes:
    return b"".join(b"".join(reader.receive_data(chunk, 0.0)) for chunk in chunks)


# -- forwarding -------------------------------------------------------------------------------------


def test_client_frames_are_re_masked_with_a_fresh_key_and_keep_their_payload() -> None:
    reader = client_reader()
    data = frame(TEXT, b"hello") + frame(BINARY, bytes(range(256)) * 40)
    out = feed(reader, data)
    frames = parse(out)
    assert [(fin, opcode, payload) for fin, opcode, payload, _ in frames] == [
        (True, TEXT, b"hello"),
        (True, BINARY, bytes(range(256)) * 40),
    ]
    assert all(masked for *_, masked in frames)
    assert out[2:6] != data[2:6]  # the client's masking key never reaches the upstream
    assert (reader.messages, reader.bytes) == (2, 5 + 10240)


def test_upstream_frames_pass_byte_for_byte_as_one_piece() -> None:
    reader = FrameReader(False, MIB, 1024)
    data = (
        frame(TEXT, b"a", mask=False) + frame(BINARY, b"b" * 300, mask=False) + frame(PING, b"p", mask=False)
    )
    pieces = reader.receive_data(data, 0.0)
    assert pieces == [data]


def test_masked_frame_from_the_upstream_is_a_protocol_error() -> None:
    reader = FrameReader(False, MIB, 1024)
    assert feed(reader, frame(TEXT, b"x")) == b""
    assert (reader.events, reader.fail_code) == (Events.FAIL, 1002)


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 6, 7, 100])
def test_a_frame_split_anywhere_is_passed_on_as_frames_of_what_arrived(cut: int) -> None:
    reader = client_reader()
    data = frame(BINARY, b"z" * 200)
    first = feed(reader, data[:cut])
    assert messages(first + feed(reader, data[cut:])) == [(BINARY, b"z" * 200)]
    assert len(first) <= 14 + cut  # never more than what arrived, re-framed
    assert reader.buffered_bytes() == 0


def test_fragments_are_forwarded_as_they_arrive_not_held() -> None:
    reader = client_reader(utf8=False)
    out = feed(reader, frame(TEXT, b"ab", fin=False))
    assert parse(out)[0][:3] == (False, TEXT, b"ab")
    out = feed(reader, frame(CONT, b"cd", fin=False), frame(CONT, b"", fin=True))
    assert [f[:3] for f in parse(out)] == [(False, CONT, b"cd"), (True, CONT, b"")]
    assert reader.messages == 1


def test_control_frames_may_come_between_fragments() -> None:
    reader = client_reader()
    out = feed(reader, frame(TEXT, b"a", fin=False) + frame(PING, b"?") + frame(CONT, b"b"))
    assert messages(out) == [(PING, b"?"), (TEXT, b"ab")]


# -- protocol errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (frame(TEXT, b"x", mask=False), "unmasked frame from the client"),
        (frame(TEXT, b"x", rsv=0x40), "reserved bits set, but no extension was negotiated"),
        (frame(0x3, b"x"), "unknown opcode 3"),
        (frame(0x7, b"x"), "unknown opcode 7"),
        (frame(0xB, b"x"), "unknown opcode 11"),
        (frame(0xF, b""), "unknown opcode 15"),
        (frame(PING, b"x", fin=False), "control frame fragmented or longer than 125 bytes"),
        (frame(PING, b"x" * 126), "control frame fragmented or longer than 125 bytes"),
        (frame(CONT, b"x"), "continuation frame outside a message"),
        (frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"), "new message before the previous one ended"),
        (frame(CLOSE, b"\x03"), "close frame with a one-byte payload"),
        (close(1005), "close code 1005 may not be sent"),
        (close(999), "close code 999 may not be sent"),
        (close(5000), "close code 5000 may not be sent"),
    ],
)
def test_protocol_errors_close_the_sender_with_1002(data: bytes, reason: str) -> None:
    reader = client_reader()
    feed(reader, data)
    assert Events.FAIL in reader.events
    assert (reader.fail_code, reader.fail_reason) == (1002, reason)


def test_frames_before_the_bad_one_are_forwarded() -> None:
    reader = client_reader()
    out = feed(reader, frame(TEXT, b"good") + frame(TEXT, b"x", mask=False))
    assert messages(out) == [(TEXT, b"good")]
    assert reader.fail_code == 1002


# -- sizes and fragments ----------------------------------------------------------------------------


def test_a_message_over_the_limit_is_refused_from_its_header_alone() -> None:
    reader = client_reader(max_bytes=1000)
    header = bytes([0x82, 0x80 | 127]) + (8 << 30).to_bytes(8, "big") + b"\0\0\0\0"
    assert feed(reader, header) == b""
    assert (reader.fail_code, reader.oversized) == (1009, True)
    assert reader.fail_reason == "message larger than 1000 bytes"


def test_a_fragmented_message_over_the_limit_is_refused_at_the_fragment_that_crosses_it() -> None:
    reader = client_reader(max_bytes=1000)
    out = feed(reader, frame(BINARY, b"a" * 600, fin=False), frame(CONT, b"b" * 600))
    assert [f[2] for f in parse(out)] == [b"a" * 600]
    assert reader.fail_code == 1009


def test_empty_fragments_count_towards_max_fragments() -> None:
    reader = client_reader(max_fragments=5)
    out = feed(reader, frame(BINARY, b"", fin=False) + frame(CONT, b"", fin=False) * 4)
    assert reader.events == Events.NONE and len(parse(out)) == 5
    feed(reader, frame(CONT, b"", fin=False))
    assert (reader.fail_code, reader.fail_reason) == (1009, "message in more than 5 fragments")


def test_the_default_fragment_cap_follows_the_message_size() -> None:
    from proxy.policy.model import Limits

    assert Limits().fragments_allowed(MIB) == 4096
    assert Limits().fragments_allowed(64 * 1024) == 1024
    assert Limits(max_fragments=10).fragments_allowed(MIB) == 10


# -- UTF-8 ------------------------------------------------------------------------------------------


def test_invalid_utf8_text_is_1007() -> None:
    reader = client_reader()
    feed(reader, frame(TEXT, b"ok \xff"))
    assert (reader.fail_code, reader.fail_reason) == (1007, "text message is not valid UTF-8")


def test_utf8_is_checked_across_fragments_split_inside_a_character() -> None:
    reader = client_reader()
    text = "ß€😀".encode()
    out = feed(
        reader,
        *(frame(TEXT if i == 0 else CONT, text[i : i + 1], fin=i == len(text) - 1) for i in range(len(text))),
    )
    assert reader.events == Events.NONE
    assert messages(out) == [(TEXT, text)]


def test_utf8_invalid_in_a_later_fragment_fails_there() -> None:
    reader = client_reader()
    out = feed(reader, frame(TEXT, b"fine", fin=False), frame(CONT, b"\xed\xa0\x80", fin=True))
    assert [f[2] for f in parse(out)] == [b"fine"]
    assert reader.fail_code == 1007


def test_a_message_ending_inside_a_character_is_1007() -> None:
    reader = client_reader()
    feed(reader, frame(TEXT, "€".encode()[:2], fin=False), frame(CONT, b"", fin=True))
    assert reader.fail_code == 1007


def test_binary_is_never_decoded() -> None:
    reader = client_reader()
    assert messages(feed(reader, frame(BINARY, b"\xff\xfe"))) == [(BINARY, b"\xff\xfe")]


def test_a_close_reason_that_is_not_utf8_is_1007() -> None:
    reader = client_reader()
    feed(reader, close(1000, b"\xff"))
    assert reader.fail_code == 1007


# -- close ------------------------------------------------------------------------------------------


def test_a_close_frame_is_reported_with_its_payload_and_nothing_after_it_is_read() -> None:
    reader = client_reader()
    out = feed(reader, frame(TEXT, b"last") + close(4001, "bye ✓".encode()) + frame(TEXT, b"after"))
    assert messages(out) == [(TEXT, b"last")]
    assert reader.events == Events.CLOSE
    assert (reader.close_code, reader.close_reason) == (4001, "bye ✓")
    assert reader.close_payload == struct.pack("!H", 4001) + "bye ✓".encode()
    assert feed(reader, frame(TEXT, b"more")) == b""


def test_an_empty_close_has_no_code() -> None:
    reader = client_reader()
    feed(reader, frame(CLOSE, b""))
    assert (reader.events, reader.close_code, reader.close_payload) == (Events.CLOSE, None, b"")


def test_after_a_failure_frames_are_skipped_by_counting_until_the_close() -> None:
    reader = client_reader(max_bytes=100)
    huge = bytes([0x82, 0x80 | 127]) + (1 << 40).to_bytes(8, "big") + b"\0\0\0\0"
    feed(reader, huge)
    assert reader.fail_code == 1009
    # the announced terabyte is skipped, never held
    out = feed(reader, b"\0" * 65536, b"\0" * 65536)
    assert out == b"" and reader.buffered_bytes() == 0 and reader.events == Events.NONE


def test_after_discard_the_close_frame_is_still_found() -> None:
    reader = client_reader()
    reader.discard()
    out = feed(reader, frame(TEXT, b"dropped") + frame(PING, b"x") + close(1000))
    assert out == b""
    assert (reader.events, reader.close_code) == (Events.CLOSE, 1000)


def test_failure_and_close_in_one_read() -> None:
    reader = client_reader()
    feed(reader, frame(TEXT, b"\xff") + frame(BINARY, b"skipped") + close(1007))
    assert reader.events == Events.FAIL | Events.CLOSE
    assert (reader.fail_code, reader.close_code) == (1007, 1007)


# -- pings and pongs --------------------------------------------------------------------------------


def test_the_gateways_pong_is_consumed_other_pongs_cross() -> None:
    reader = client_reader()
    ping = parse(reader.ping())[0]
    assert ping[1] == PING and not ping[3]  # to a client: unmasked
    out = feed(reader, frame(PONG, b"unsolicited") + frame(PONG, ping[2]) + frame(PONG, ping[2]))
    assert messages(out) == [(PONG, b"unsolicited"), (PONG, ping[2])]  # a second copy is not ours
    assert reader.ping_payload is None


def test_pings_to_the_upstream_are_masked() -> None:
    reader = FrameReader(False, MIB, 1024)
    assert parse(reader.ping())[0][3]


def test_control_frames_count_against_the_message_rate() -> None:
    checker = MessageChecker(
        MessageRules(max_message_bytes=MIB), MessageRate(messages_per_second=10, message_burst=10), 0.0
    )
    reader = FrameReader(True, MIB, 1024, checker)
    out = b"".join(b"".join(reader.receive_data(frame(PING, b"x"), 0.0)) for _ in range(10))
    assert len(parse(out)) == 10 and reader.events == Events.NONE
    reader.receive_data(frame(PING, b"x"), 0.0)
    assert (reader.fail_code, reader.fail_reason) == (1008, "rate limit exceeded")


def test_in_drop_mode_a_ping_over_the_rate_is_dropped() -> None:
    rate = MessageRate(messages_per_second=1, message_burst=1, on_limit="drop")
    reader = FrameReader(True, MIB, 1024, MessageChecker(MessageRules(max_message_bytes=MIB), rate, 0.0))
    out = feed(reader, frame(PING, b"1") + frame(PING, b"2"))
    assert messages(out) == [(PING, b"1")]
    assert reader.checker is not None and reader.checker.dropped == 1


# -- rules that drop or gather ----------------------------------------------------------------------


def test_a_refused_type_in_drop_mode_drops_every_fragment_of_the_message() -> None:
    reader = client_reader(types=frozenset({TEXT}), on_violation="drop")
    out = feed(
        reader, frame(BINARY, b"a", fin=False) + frame(PING, b"") + frame(CONT, b"b") + frame(TEXT, b"t")
    )
    assert messages(out) == [(PING, b""), (TEXT, b"t")]
    assert reader.messages == 1


def test_json_messages_are_gathered_in_one_buffer_and_forwarded_whole() -> None:
    reader = client_reader(json=True)
    out = feed(reader, frame(TEXT, b'{"a":', fin=False), frame(CONT, b" 1}"))
    assert [f[:3] for f in parse(out)] == [(True, TEXT, b'{"a": 1}')]
    assert reader.buffered_bytes() == 0
    feed(reader, frame(TEXT, b"{", fin=False))
    assert reader.buffered_bytes() == 1
    feed(reader, frame(CONT, b"]"))
    assert reader.fail_code == 1007


def test_invalid_utf8_in_drop_mode_drops_the_whole_message() -> None:
    reader = client_reader(on_violation="drop")
    out = feed(reader, frame(TEXT, b"ok", fin=False), frame(CONT, b"\xff"), frame(TEXT, b"next"))
    assert messages(out) == [(TEXT, b"next")]
    assert reader.events == Events.NONE


# -- properties -------------------------------------------------------------------------------------

frame_specs = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["text", "binary"]), st.lists(st.binary(max_size=300), min_size=1, max_size=5)
        ),
        st.tuples(st.just("ping"), st.binary(max_size=125)),
        st.tuples(st.just("pong"), st.binary(max_size=125)),
    ),
    max_size=12,
)


def stream_of(specs: list[tuple[str, object]], close_code: int | None) -> bytes:
    """Messages (each as its fragments, a ping between them sometimes), then maybe a close."""
    data = b""
    for kind, body in specs:
        if kind in ("ping", "pong"):
            data += frame(PING if kind == "ping" else PONG, body)  # type: ignore[arg-type]
            continue
        parts: list[bytes] = body  # type: ignore[assignment]
        for i, part in enumerate(parts):
            opcode = (TEXT if kind == "text" else BINARY) if i == 0 else CONT
            if kind == "text":
                part = part.decode("latin-1").encode()  # valid UTF-8, split anywhere between fragments
            data += frame(opcode, part, fin=i == len(parts) - 1)
    if close_code is not None:
        data += close(close_code)
    return data


def outcome(reader: FrameReader, chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], tuple[object, ...]]:
    out = b""
    seen = Events.NONE
    for chunk in chunks:
        out += b"".join(reader.receive_data(chunk, 0.0))
        seen |= reader.events
    return messages(out), (seen, reader.fail_code, reader.close_code, reader.messages, reader.bytes)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=frame_specs, close_code=st.sampled_from([None, 1000, 4000]), points=st.lists(st.integers(0, 10**6))
)
def test_any_cut_of_a_valid_stream_gives_what_the_whole_stream_gives(
    specs: list[tuple[str, object]], close_code: int | None, points: list[int]
) -> None:
    data = stream_of(specs, close_code)
    whole = outcome(client_reader(max_fragments=8), [data])
    assert outcome(client_reader(max_fragments=8), cut(data, points)) == whole
    assert whole[1][0] == (Events.CLOSE if close_code else Events.NONE)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=2000), points=st.lists(st.integers(0, 10**6), max_size=20), masked=st.booleans()
)
def test_garbage_never_raises_and_buffers_within_the_bound(
    data: bytes, points: list[int], masked: bool
) -> None:
    limit = 512
    checker = MessageChecker(MessageRules(max_message_bytes=limit, json=True), None, 0.0)
    reader = FrameReader(masked, limit, 16, checker)
    for chunk in cut(data, points):
        pieces = reader.receive_data(chunk, 0.0)
        # a partial header or control frame (14 + 125), an incomplete character, the message gathered
        assert reader.buffered_bytes() <= 14 + 125 + 3 + limit
        # what is forwarded is whole frames only, so the other side can always be sent a close frame
        parse(b"".join(pieces))


# -- lengths, trickles and turns --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (bytes([0x82, 0x80 | 126]) + (5).to_bytes(2, "big"), "frame length not in its shortest form"),
        (bytes([0x82, 0x80 | 127]) + (300).to_bytes(8, "big"), "frame length not in its shortest form"),
        (bytes([0x82, 0x80 | 127]) + (1 << 63).to_bytes(8, "big"), "frame length over 2**63 - 1"),
    ],
)
def test_frame_lengths_must_be_in_their_shortest_form(header: bytes, reason: str) -> None:
    reader = client_reader()
    feed(reader, header + b"\0\0\0\0")
    assert (reader.fail_code, reader.fail_reason) == (1002, reason)


def test_a_frame_trickled_byte_by_byte_reaches_the_other_side_in_few_frames() -> None:
    reader = client_reader()
    payload = bytes(range(256)) * 40  # 10 KiB
    data = frame(BINARY, payload)
    out = feed(reader, *(data[i : i + 1] for i in range(len(data))))
    frames = parse(out)
    assert len(frames) <= len(payload) // 4096 + 1
    assert messages(out) == [(BINARY, payload)]


def test_a_read_of_many_frames_is_taken_in_turns() -> None:
    from proxy.protocol import FRAMES_PER_TURN

    reader = client_reader()
    data = frame(BINARY, b"a") * (FRAMES_PER_TURN * 2 + 10)
    turns = [reader.receive_data(data, 0.0)]
    while reader.backlogged:
        turns.append(reader.receive_data(b"", 0.0))
    assert len(turns) == 3
    assert reader.buffered_bytes() == 0
    assert sum(len(parse(b"".join(turn))) for turn in turns) == FRAMES_PER_TURN * 2 + 10
