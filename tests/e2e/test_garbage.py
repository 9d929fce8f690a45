"""Bad input of every kind gets a clear answer and hurts nothing else: random bytes as a handshake, random
frames after the 101, protocol violations. A healthy session relays throughout, and nothing is logged as an
internal error."""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
from wsraw import CLOSE, PING, TEXT, RawClient

SEED = 20261125


def route(upstream_url: str) -> str:
    return f"""
    limits: {{close_timeout: 500ms, handshake_timeout: 300ms, max_message_size: 64KiB}}
    routes:
      - path: /echo
        upstream: {upstream_url}
        auth: none
    """


def no_internal_errors(log_events) -> None:
    assert not [e for e in log_events.events if e["level"] in ("error", "critical")], log_events.events
    assert not log_events.named("handshake.error")


async def answered_or_closed(reader: asyncio.StreamReader) -> bytes:
    """Whatever the gateway sends before it closes the connection (it must close it)."""
    data = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def test_random_bytes_instead_of_a_handshake(gateway, upstream, client, log_events):
    gw = await gateway(route(upstream.url()))
    rng = random.Random(SEED)
    async with client.ws_connect(gw.url()) as healthy:
        for index in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            size = rng.choice([1, 10, 100, 1000, 5000])
            blob = bytes(rng.getrandbits(8) for _ in range(size))
            if index % 3 == 0:
                blob = b"GET /echo HTTP/1.1\r\n" + blob + b"\r\n\r\n"
            writer.write(blob)
            if index % 2:
                writer.write_eof()  # half the clients say they are done; the others just stop
            answer = await answered_or_closed(reader)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:80]
            writer.close()
            await healthy.send_str(f"still here {index}")
            assert (await healthy.receive(timeout=5)).data == f"still here {index}"
    assert upstream.records and len(upstream.records) == 1  # only the healthy session got through
    no_internal_errors(log_events)


def _frame(rng: random.Random) -> bytes:
    """A frame header with random bits (reserved bits, opcodes, lengths, mask bit) and a random payload."""
    b0 = rng.getrandbits(8)
    length = rng.choice([0, 5, 125, 126, 200, 70000])
    masked = rng.random() < 0.8
    head = bytearray([b0])
    if length < 126:
        head.append((0x80 if masked else 0) | length)
    elif length < 65536:
        head.append((0x80 if masked else 0) | 126)
        head += struct.pack("!H", length)
    else:
        head.append((0x80 if masked else 0) | 127)
        head += struct.pack("!Q", length)
    if masked:
        head += bytes(rng.getrandbits(8) for _ in range(4))
    return bytes(head) + bytes(rng.getrandbits(8) for _ in range(min(length, 300))) * (
        length // 300 + 1 if length > 300 else 1
    )


async def test_random_frames_after_the_handshake(gateway, upstream, client, log_events):
    gw = await gateway(route(upstream.url()))
    rng = random.Random(SEED + 1)
    codes = set()
    async with client.ws_connect(gw.url()) as healthy:
        for index in range(80):
            ws, response = await RawClient.connect(gw.port, "/echo")
            assert response.status == 101
            ws.writer.write(b"".join(_frame(rng) for _ in range(rng.randint(1, 4))))
            try:
                while True:
                    frame = await ws.recv_frame(timeout=3)
                    if frame.opcode == CLOSE:
                        codes.add(frame.close_code)
                        ws.send_close(frame.close_code or 1000)
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # closed without a frame: acceptable for garbage that is not even a frame header
            except TimeoutError:
                ws.send_close(1000)  # the garbage happened to be valid: end it ourselves
            ws.abort()
            await healthy.send_str(f"still here {index}")
            assert (await healthy.receive(timeout=5)).data == f"still here {index}"
    assert codes <= {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1014}, codes
    assert 1002 in codes  # random bits mostly break the protocol, and that is what the client is told
    await asyncio.sleep(0.6)
    deadline = asyncio.get_running_loop().time() + 5
    while len(gw.gateway.sessions) > 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert len(gw.gateway.sessions) == 0
    no_internal_errors(log_events)


@pytest.mark.parametrize(
    ("frames", "expected_code"),
    [
        ([(0x80 | TEXT, False, b"x")], 1002),  # unmasked client frame
        ([(0x80 | 0x40 | TEXT, True, b"x")], 1002),  # RSV1 without an extension
        ([(0x80 | 0x3, True, b"x")], 1002),  # reserved data opcode
        ([(0x80 | 0xB, True, b"")], 1002),  # reserved control opcode
        ([(0x00 | PING, True, b"x")], 1002),  # fragmented control frame
        ([(0x80 | PING, True, b"x" * 126)], 1002),  # control frame payload over 125
        ([(0x80 | 0x0, True, b"x")], 1002),  # continuation without a start
        ([(0x00 | TEXT, True, b"a"), (0x80 | TEXT, True, b"b")], 1002),  # new message inside a message
        ([(0x80 | CLOSE, True, b"\x03")], 1002),  # one-byte close payload
        ([(0x80 | CLOSE, True, struct.pack("!H", 1005))], 1002),  # reserved close code on the wire
        ([(0x80 | CLOSE, True, struct.pack("!H", 999))], 1002),
        ([(0x80 | CLOSE, True, struct.pack("!H", 1000) + b"\xff")], 1007),  # reason not UTF-8
    ],
)
async def test_protocol_violations_get_their_close_code(gateway, upstream, log_events, frames, expected_code):
    gw = await gateway(route(upstream.url()))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    for b0, masked, payload in frames:
        if b0 & 0x70:  # reserved bits: wsraw's encoder cannot set them
            _send_raw(ws, b0, payload)
        else:
            ws.send_frame(b0 & 0x0F, payload, fin=bool(b0 & 0x80), mask=masked)
    frame = await ws.recv_close()
    assert frame.close_code == expected_code
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert record.close_code in (1001, 1014)  # the upstream is told the client is gone, not the garbage
    no_internal_errors(log_events)


def _send_raw(ws: RawClient, b0: int, payload: bytes) -> None:
    key = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    ws.writer.write(bytes([b0, 0x80 | len(payload)]) + key + masked)
