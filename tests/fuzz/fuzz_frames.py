"""Coverage-guided fuzzing of the frame core with atheris (libFuzzer), outside pytest.

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_frames.py -max_total_time=300 [corpus_dir]

Each input is split in two: its first bytes choose the reader (client or upstream side, the rules, the limits)
and where the rest is cut into reads; the rest is the bytes a peer sends. For every input the frame core must
raise nothing, hold no more than its stated bound between reads, and hand the other side only whole, valid
frames, and the same input unsplit must give the same messages, events and counters. A failure stops the run
with the input that caused it (libFuzzer writes it to crash-*); replay one with
``.venv/bin/python tests/fuzz/fuzz_frames.py crash-FILE``.
"""

from __future__ import annotations

import itertools
import sys

import atheris

with atheris.instrument_imports():
    from proxy.policy.model import MessageRate, MessageRules
    from proxy.protocol import FrameReader
    from proxy.rules import MessageChecker

LIMIT = 4096


def parse_frames(stream: bytes) -> list[tuple[int, int, bytes]]:
    """(fin, opcode, payload) of each frame; raises AssertionError unless ``stream`` is whole frames."""
    frames, pos = [], 0
    while pos < len(stream):
        assert len(stream) - pos >= 2, "half a header forwarded"
        b0, b1 = stream[pos], stream[pos + 1]
        assert not b0 & 0x70, "reserved bits forwarded"
        length, pos = b1 & 0x7F, pos + 2
        if length == 126:
            length, pos = int.from_bytes(stream[pos : pos + 2], "big"), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(stream[pos : pos + 8], "big"), pos + 8
        key = stream[pos : pos + 4] if b1 & 0x80 else b""
        pos += len(key)
        payload = stream[pos : pos + length]
        assert len(payload) == length, "a frame forwarded without all of its payload"
        if key:
            payload = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
        frames.append((b0 >> 7, b0 & 0x0F, payload))
        pos += length
    return frames


def messages(frames: list[tuple[int, int, bytes]]) -> list[tuple[int, bytes]]:
    out, current = [], None
    for fin, opcode, payload in frames:
        if opcode & 0x8:
            out.append((opcode, payload))
            continue
        if opcode:
            assert current is None, "a message forwarded inside another"
            current = [opcode, payload]
        else:
            assert current is not None, "a continuation forwarded outside a message"
            current[1] += payload
        if fin:
            out.append((current[0], current[1]))
            current = None
    return out


def reader_for(choice: int) -> FrameReader:
    masked = bool(choice & 1)
    rules = MessageRules(
        max_message_bytes=LIMIT,
        types=frozenset({1, 2}) if choice & 2 else frozenset({1}),
        utf8=bool(choice & 4),
        json=bool(choice & 8),
        on_violation="drop" if choice & 16 else "close",
    )
    rate = MessageRate(messages_per_second=100, message_burst=20) if choice & 32 else None
    checker = MessageChecker(rules, rate, 0.0) if choice & 64 else None
    return FrameReader(masked, LIMIT, 8 if choice & 128 else 1024, checker)


def run(choice: int, chunks: list[bytes]) -> tuple[object, ...]:
    reader = reader_for(choice)
    out = b""
    events = 0
    for chunk in chunks:
        out += b"".join(reader.receive_data(chunk, 0.0))
        events |= int(reader.events)
        assert reader.buffered_bytes() <= 14 + 125 + 3 + LIMIT, "over the memory bound"
    return (
        messages(parse_frames(out)),
        events,
        reader.fail_code,
        reader.close_code,
        reader.messages,
        reader.bytes,
    )


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    choice, cuts, body = data[0], data[1], data[2:]
    points = sorted({0, len(body), *((cuts * (i + 1) * 7) % (len(body) + 1) for i in range(cuts & 15))})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    assert run(choice, chunks) == run(choice, [body]), "a split input gave another result"


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
