"""permessage-deflate (RFC 7692): negotiation on each hop, and the frame core inflating, checking and
compressing messages -- bytes in, frames and close codes out."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.deflate import (
    UPSTREAM_OFFER,
    Agreement,
    Deflater,
    Inflater,
    accept_client_offer,
    read_upstream_answer,
)
from proxy.errors import MessageTooBig, ProtocolError, UpstreamError
from proxy.policy.model import MessageRules
from proxy.protocol import Events, FrameReader
from proxy.rules import MessageChecker

TEXT, BINARY, CLOSE, PING, CONT = 0x1, 0x2, 0x8, 0x9, 0x0
RSV1 = 0x40
MIB = 1 << 20


def compress(data: bytes, wbits: int = 15, stream: zlib._Compress | None = None) -> bytes:
    """A message's payload as a peer compresses it (RFC 7692 7.2.1), independently of proxy.deflate."""
    stream = stream or zlib.compressobj(6, zlib.DEFLATED, -wbits)
    out = stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    length, bit = len(payload), 0x80 if mask else 0
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


def parse(stream: bytes) -> list[tuple[int, int, bytes]]:
    """Frames as (first byte, opcode, unmasked payload)."""
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
        assert len(payload) == length
        if key:
            payload = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
        frames.append((b0, b0 & 0x0F, payload))
        pos += length
    return frames


def inflate_messages(stream: bytes, wbits: int = 15) -> list[tuple[int, bytes, bool]]:
    """Whole data messages as a receiver reassembles them: (opcode, payload, was compressed)."""
    out: list[tuple[int, bytes, bool]] = []
    parts: list[bytes] = []
    opcode, compressed = 0, False
    decoder = zlib.decompressobj(wbits=-wbits)
    for b0, op, payload in parse(stream):
        if op & 0x8:
            continue
        if op:
            opcode, compressed, parts = op, bool(b0 & RSV1), []
        parts.append(payload)
        if b0 & 0x80:
            data = b"".join(parts)
            if compressed:
                data = decoder.decompress(data + b"\x00\x00\xff\xff")
            out.append((opcode, data, compressed))
    return out


def feed(reader: FrameReader, *chunks: bytes) -> bytes:
    return b"".join(b"".join(reader.receive_data(chunk, 0.0)) for chunk in chunks)


def reader(
    *,
    inflate: bool = True,
    deflate: bool = False,
    max_bytes: int = MIB,
    no_context: bool = False,
    passthrough: bool = False,
    **rules: object,
) -> FrameReader:
    checker = (
        MessageChecker(MessageRules(max_message_bytes=max_bytes, **rules), None, 0.0)  # type: ignore[arg-type]
        if rules
        else None
    )
    return FrameReader(
        True,
        max_bytes,
        1024,
        checker,
        Inflater(15, no_context) if inflate else None,
        Deflater(12, no_context) if deflate else None,
        passthrough,
    )


# -- negotiation, the client's hop ------------------------------------------------------------------------


def test_a_plain_offer_is_accepted_as_it_is() -> None:
    agreement = accept_client_offer(["permessage-deflate"])
    assert agreement == Agreement("permessage-deflate", False, 15, False, 12)


def test_the_browser_offer_gets_a_client_window_the_gateway_chose() -> None:
    agreement = accept_client_offer(["permessage-deflate; client_max_window_bits"])
    assert agreement is not None
    assert agreement.header == "permessage-deflate; client_max_window_bits=13"
    assert agreement.peer_window_bits == 13


def test_all_four_parameters_are_honoured() -> None:
    agreement = accept_client_offer(
        [
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            'server_max_window_bits="10"; client_max_window_bits=9'
        ]
    )
    assert agreement is not None
    assert agreement.header == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
        "server_max_window_bits=10; client_max_window_bits=9"
    )
    assert (agreement.peer_no_context_takeover, agreement.peer_window_bits) == (True, 9)
    assert (agreement.gateway_no_context_takeover, agreement.gateway_window_bits) == (True, 10)


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=8",  # zlib cannot write a raw stream with 2**8
        "permessage-deflate; client_max_window_bits=010",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_max_window_bits=10; client_max_window_bits=11",
        "permessage-deflate; x_unknown",
        'permessage-deflate; server_max_window_bits="1',
        "permessage-deflate; ;",
        "x-webkit-deflate-frame",
        "",
    ],
)
def test_a_malformed_or_unacceptable_offer_is_declined_not_an_error(offer: str) -> None:
    assert accept_client_offer([offer]) is None


def test_the_first_acceptable_offer_wins() -> None:
    agreement = accept_client_offer(
        [
            "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_no_context_takeover, permessage-deflate",
        ]
    )
    assert agreement is not None
    assert agreement.header == "permessage-deflate; server_no_context_takeover"


# -- negotiation, the upstream's hop ------------------------------------------------------------------------


def test_the_upstream_offer_lets_the_upstream_limit_the_gateway_window() -> None:
    assert UPSTREAM_OFFER == "permessage-deflate; client_max_window_bits"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("permessage-deflate", (False, 15, False, 12)),
        ("permessage-deflate; server_no_context_takeover", (True, 15, False, 12)),
        ("permessage-deflate; client_no_context_takeover", (False, 15, True, 12)),
        ("permessage-deflate; server_max_window_bits=10; client_max_window_bits=9", (False, 10, False, 9)),
        # a window zlib cannot write: the gateway sends that upstream plain messages
        ("permessage-deflate; client_max_window_bits=8", (False, 15, False, 0)),
    ],
)
def test_a_valid_upstream_answer_is_read(answer: str, expected: tuple[bool, int, bool, int]) -> None:
    agreement = read_upstream_answer(answer)
    assert agreement is not None
    got = (
        agreement.peer_no_context_takeover,
        agreement.peer_window_bits,
        agreement.gateway_no_context_takeover,
        agreement.gateway_window_bits,
    )
    assert got == expected
    assert (agreement.deflater() is None) == (expected[3] == 0)


@pytest.mark.parametrize(
    "answer",
    [
        "x-other",
        "permessage-deflate, permessage-deflate",
        "permessage-deflate; client_max_window_bits",  # a value is required in an answer
        "permessage-deflate; x_unknown=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; server_max_window_bits=16",
    ],
)
def test_an_upstream_answer_the_offer_does_not_allow_is_a_502(answer: str) -> None:
    with pytest.raises(UpstreamError):
        read_upstream_answer(answer)


# -- the inflater and the deflater -----------------------------------------------------------------------


def test_the_inflater_stops_at_its_budget_and_says_too_big() -> None:
    bomb = compress(b"\x00" * (64 * MIB))
    inflater = Inflater(15, False)
    with pytest.raises(MessageTooBig):
        inflater.inflate(bomb, True, MIB)
    assert not inflater.active  # its zlib object is dropped with the session's last hope


def test_a_message_that_fits_exactly_passes() -> None:
    data = os.urandom(1000) * 4
    assert Inflater(15, False).inflate(compress(data), True, len(data)) == data


def test_a_corrupt_stream_is_1007() -> None:
    with pytest.raises(ProtocolError) as caught:
        Inflater(15, False).inflate(b"\xff\xff\xff\xff", True, MIB)
    assert caught.value.code == 1007


def test_deflater_output_inflates_back_with_context_kept_or_not() -> None:
    for no_context in (False, True):
        deflater = Deflater(12, no_context)
        decoder = zlib.decompressobj(wbits=-12)
        for _ in range(3):
            message = b'{"kind": "quote", "price": 12.5}' * 20
            out = deflater.deflate(message[:100], False) + deflater.deflate(message[100:], True)
            if no_context:
                decoder = zlib.decompressobj(wbits=-12)
            assert decoder.decompress(out + b"\x00\x00\xff\xff") == message
        assert deflater.active is not no_context


def test_zlib_objects_are_made_at_the_first_message_only() -> None:
    inflater, deflater = Inflater(15, False), Deflater(12, False)
    assert not inflater.active and not deflater.active
    inflater.inflate(compress(b"x"), True, 10)
    deflater.deflate(b"x", True)
    assert inflater.active and deflater.active


# -- the frame core with the extension ----------------------------------------------------------------


def test_a_compressed_message_is_inflated_for_a_plain_hop() -> None:
    core = reader()
    out = feed(core, frame(TEXT, compress(b"hello " * 100), rsv=RSV1))
    assert inflate_messages(out) == [(TEXT, b"hello " * 100, False)]
    assert (core.events, core.inflated, core.messages) == (Events.NONE, 1, 1)


def test_a_plain_message_is_compressed_for_a_compressed_hop() -> None:
    core = reader(inflate=False, deflate=True)
    out = feed(core, frame(BINARY, b"abc" * 1000))
    assert inflate_messages(out, wbits=12) == [(BINARY, b"abc" * 1000, True)]
    assert len(out) < 200
    assert core.deflated == 1


def test_context_takeover_carries_across_messages_and_fragments() -> None:
    peer = zlib.compressobj(6, zlib.DEFLATED, -15)
    core = reader(deflate=True)
    first, second = b"the same words again " * 50, b"the same words again " * 60
    data = compress(first, stream=peer)
    payload = compress(second, stream=peer)
    out = feed(
        core,
        frame(TEXT, data, rsv=RSV1),
        frame(TEXT, payload[:10], fin=False, rsv=RSV1),
        frame(PING, b"p"),
        frame(CONT, payload[10:]),
    )
    assert [(op, body) for op, body, _ in inflate_messages(out, wbits=12)] == [(TEXT, first), (TEXT, second)]
    assert core.events == Events.NONE


def test_a_message_may_be_split_anywhere_on_the_wire() -> None:
    message = os.urandom(300) * 30
    wire = frame(BINARY, compress(message), rsv=RSV1)
    for cut in (1, 2, 7, 100, len(wire) - 1):
        core = reader()
        out = feed(core, wire[:cut], wire[cut:])
        assert [(op, body) for op, body, _ in inflate_messages(out)] == [(BINARY, message)], cut


def test_a_bomb_is_closed_1009_before_more_than_the_limit_is_inflated() -> None:
    core = reader(max_bytes=MIB)
    bomb = compress(b"\x00" * (64 * MIB))
    wire = frame(BINARY, bomb, rsv=RSV1)
    out = b""
    for start in range(0, len(wire), 16384):
        out += feed(core, wire[start : start + 16384])
        if core.events:
            break
    assert core.events & Events.FAIL and core.fail_code == 1009
    assert core.oversized
    assert len(out) <= MIB + 64  # what was passed on, frame headers included


def test_a_corrupt_stream_closes_the_sender_1007() -> None:
    core = reader()
    feed(core, frame(TEXT, b"\xff\xfe\xfd\xfc", rsv=RSV1))
    assert core.events & Events.FAIL and core.fail_code == 1007


@pytest.mark.parametrize(
    "wire",
    [
        frame(PING, b"x", rsv=RSV1),
        frame(TEXT, compress(b"ab"), fin=False, rsv=RSV1) + frame(CONT, b"", rsv=RSV1),
        frame(TEXT, b"x", rsv=0x20),
    ],
    ids=["control", "continuation", "rsv2"],
)
def test_rsv1_outside_a_message_start_is_1002(wire: bytes) -> None:
    core = reader()
    feed(core, wire)
    assert core.events & Events.FAIL and core.fail_code == 1002


def test_rsv1_on_a_hop_without_the_extension_is_1002() -> None:
    core = reader(inflate=False, deflate=True)
    feed(core, frame(TEXT, compress(b"hi"), rsv=RSV1))
    assert core.events & Events.FAIL and core.fail_code == 1002


def test_utf8_is_checked_on_the_inflated_text() -> None:
    core = reader(utf8=True)
    feed(core, frame(TEXT, compress("héllo".encode()[:-2] + b"\xc3\x28"), rsv=RSV1))
    assert core.events & Events.FAIL and core.fail_code == 1007


def test_json_rules_read_the_inflated_message() -> None:
    core = reader(json=True, deflate=True)
    out = feed(core, frame(TEXT, compress(b'{"a": 1}'), rsv=RSV1))
    assert [(op, body) for op, body, _ in inflate_messages(out, wbits=12)] == [(TEXT, b'{"a": 1}')]
    feed(core, frame(TEXT, compress(b"{not json"), rsv=RSV1))
    assert core.events & Events.FAIL and core.fail_code == 1007


def test_a_dropped_compressed_message_still_keeps_the_context() -> None:
    peer = zlib.compressobj(6, zlib.DEFLATED, -15)
    core = reader(json=True, on_violation="drop")
    dropped = compress(b"not json, but words that come back", stream=peer)
    kept = compress(b'"words that come back"', stream=peer)
    out = feed(core, frame(TEXT, dropped, rsv=RSV1), frame(TEXT, kept, rsv=RSV1))
    assert [(op, body) for op, body, _ in inflate_messages(out)] == [(TEXT, b'"words that come back"')]
    assert core.events == Events.NONE


def test_the_size_limit_applies_to_the_inflated_message() -> None:
    core = reader(max_bytes=1000)
    feed(core, frame(TEXT, compress(b"a" * 1001), rsv=RSV1))
    assert core.events & Events.FAIL and core.fail_code == 1009
    fits = reader(max_bytes=1000)
    out = feed(fits, frame(TEXT, compress(b"a" * 1000), rsv=RSV1))
    assert fits.events == Events.NONE and len(inflate_messages(out)[0][1]) == 1000


def test_one_turn_inflates_a_bounded_amount_and_the_rest_waits() -> None:
    peer = zlib.compressobj(6, zlib.DEFLATED, -15)
    core = reader(max_bytes=MIB)
    wire = b"".join(frame(BINARY, compress(b"z" * (512 * 1024), stream=peer), rsv=RSV1) for _ in range(8))
    out = feed(core, wire)
    assert core.backlogged and len(out) < 2 * MIB
    total = len(out)
    while core.backlogged:
        total += len(feed(core, b""))
    assert core.messages == 8 and total > 4 * MIB


# -- pass-through ----------------------------------------------------------------------------------------


def test_passed_through_a_compressed_message_keeps_its_bytes_and_rsv1() -> None:
    peer = zlib.compressobj(6, zlib.DEFLATED, -15)
    core = reader(passthrough=True, utf8=True)
    first = compress(b"words words words " * 40, stream=peer)
    second = compress(b"words again " * 40, stream=peer)
    out = feed(
        core,
        frame(TEXT, first, rsv=RSV1),
        frame(TEXT, second[:5], fin=False, rsv=RSV1),
        frame(CONT, second[5:]),
    )
    frames = parse(out)
    assert frames[0] == (0x80 | RSV1 | TEXT, TEXT, first)  # re-masked, otherwise as it came
    assert b"".join(payload for _, _, payload in frames[1:]) == second
    assert frames[1][0] & RSV1 and not frames[-1][0] & RSV1
    assert inflate_messages(out) == [
        (TEXT, b"words words words " * 40, True),
        (TEXT, b"words again " * 40, True),
    ]
    assert (core.inflated, core.passed, core.deflated, core.events) == (2, 2, 0, Events.NONE)
    assert core.bytes == len(b"words words words " * 40) + len(b"words again " * 40)


def test_a_frame_passed_through_in_pieces_keeps_rsv1_on_its_first_piece_only() -> None:
    message = os.urandom(20000)
    wire = frame(BINARY, compress(message), rsv=RSV1)
    core = reader(passthrough=True)
    out = feed(core, wire[:9000], wire[9000:])
    frames = parse(out)
    assert len(frames) > 1 and frames[0][0] & RSV1 and not any(b0 & RSV1 for b0, _, _ in frames[1:])
    assert [(op, body) for op, body, _ in inflate_messages(out)] == [(BINARY, message)]


def test_passed_through_text_is_still_checked_for_utf8_and_size() -> None:
    core = reader(passthrough=True, utf8=True)
    feed(core, frame(TEXT, compress(b"ok \xc3\x28"), rsv=RSV1))
    assert core.events & Events.FAIL and core.fail_code == 1007
    bomb = reader(passthrough=True, max_bytes=MIB)
    feed(bomb, frame(BINARY, compress(b"\x00" * (64 * MIB)), rsv=RSV1))
    assert bomb.events & Events.FAIL and bomb.fail_code == 1009


def test_agreements_pass_only_what_the_receiver_can_inflate() -> None:
    browser = accept_client_offer(["permessage-deflate; client_max_window_bits"])
    assert browser is not None
    plain_upstream = read_upstream_answer("permessage-deflate")
    small_window = read_upstream_answer("permessage-deflate; client_max_window_bits=10")
    no_context = read_upstream_answer("permessage-deflate; client_no_context_takeover")
    assert plain_upstream is not None and small_window is not None and no_context is not None
    assert browser.passes_to(plain_upstream)
    assert not browser.passes_to(small_window)  # the client compresses with 2**13, the upstream allows 2**10
    assert not browser.passes_to(no_context)  # the client keeps its context, the upstream refuses it
    assert plain_upstream.passes_to(browser)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=1, max_value=700),
    st.sampled_from(["transcode", "passthrough", "plain-out"]),
)
def test_any_messages_in_any_fragments_and_reads_arrive_whole(
    bodies: list[bytes], fragments: int, chunk: int, mode: str
) -> None:
    """Compressed with context takeover, cut into fragments and reads anywhere: the receiver gets the same
    messages, compressed or not as its hop agreed."""
    peer = zlib.compressobj(6, zlib.DEFLATED, -15)
    wire = b""
    for body in bodies:
        data = compress(body, stream=peer)
        step = max(1, len(data) // fragments)
        parts = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        for index, part in enumerate(parts):
            first, last = index == 0, index == len(parts) - 1
            wire += frame(BINARY if first else CONT, part, fin=last, rsv=RSV1 if first else 0)
    core = reader(deflate=mode == "transcode", passthrough=mode == "passthrough")
    out = feed(core, *(wire[i : i + chunk] for i in range(0, len(wire), chunk)))
    assert core.events == Events.NONE
    wbits = 12 if mode == "transcode" else 15
    assert [body for _, body, _ in inflate_messages(out, wbits=wbits)] == bodies
