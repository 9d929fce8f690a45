"""Fragment floods against the real ``wsgate serve`` process: its RSS growth stays within the bound README
states ("Limits and memory"), and the flooder reads 1009 when it crosses ``max_fragments``.

The bound per session: each direction holds at most one partial frame header or control frame (139 B),
an incomplete UTF-8 character, 4 KiB of a frame's payload held while the rest arrives, the message a rule
gathers (at most ``max_message_size``), and a write buffer of at most its high-water mark (64 KiB) plus one
read of the other side (256 KiB: its output, or the part of it waiting for its turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port
from wsraw import accept_upgrade, read_frame

KIB = 1024
MIB = 1024 * KIB
#: One session's transports and frame cores at their worst, without a gathered message (both directions).
SESSION_BOUND = 2 * (64 * KIB + 256 * KIB + 4 * KIB + 142)
#: What the interpreter's allocator and first use of code paths may add to any measurement.
SLACK = 4 * MIB
OFFENDER = Path(__file__).resolve().parent.parent / "offender.py"

pytestmark = pytest.mark.serve_process


def masked(first: int, payload: bytes) -> bytes:
    """A client frame with an all-zero masking key (legal: the payload travels as it is)."""
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", first, 0x80 | length) + b"\0\0\0\0" + payload
    return struct.pack("!BBH", first, 0x80 | 126, length) + b"\0\0\0\0" + payload


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS")


async def serve(wsgate_process, tmp_path: Path, body: str) -> tuple[object, int]:
    """``wsgate serve`` with ``body`` (YAML: limits and routes) on a free port, once it accepts."""
    port = free_port()
    policy = tmp_path / "flood.yaml"
    head = f'version: 1\nlisten: {{address: "127.0.0.1:{port}"}}\nadmin: {{address: "127.0.0.1:0"}}\n'
    policy.write_text(head + textwrap.dedent(body))
    process = wsgate_process("serve", "-c", str(policy), "--log-level", "warning")
    for _ in range(200):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        await asyncio.sleep(0.05)
    return process, port


async def start(wsgate_process, tmp_path: Path, upstream_url: str) -> tuple[object, int]:
    """The flood policy: an open route, and one whose JSON rule gathers messages whole."""
    return await serve(
        wsgate_process,
        tmp_path,
        f"""\
        limits: {{max_message_size: 1MiB, close_timeout: 2s}}
        routes:
          - {{path: /flood, upstream: "{upstream_url}", auth: none}}
          - path: /json
            upstream: "{upstream_url}"
            auth: none
            limits: {{max_fragments: 1000000}}
            messages: {{client: {{json: true}}}}
        """,
    )


async def connect(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MIB)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


async def first_message_or_close(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The first data message (fragments joined) or close frame the gateway sends; (0, b"") on a reset."""
    parts: list[bytes] = []
    opcode = 0
    try:
        while True:
            frame = await read_frame(reader)
            fin, frame_opcode, payload = frame.fin, frame.opcode, frame.payload
            if frame_opcode == 0x8:
                return 0x8, payload
            if frame_opcode in (0x9, 0xA):
                continue
            opcode = opcode or frame_opcode
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0, b""


async def send_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        for start in range(0, len(data), MIB):
            writer.write(data[start : start + MIB])
            await writer.drain()


async def peak_growth(pid: int, work: asyncio.Future[object], timeout: float = 60) -> int:
    """The highest RSS seen while ``work`` runs, above the RSS before it."""
    base = peak = rss(pid)
    async with asyncio.timeout(timeout):
        while not work.done():
            peak = max(peak, rss(pid))
            await asyncio.sleep(0.01)
    work.result()
    return peak - base


async def warm_up(port: int) -> None:
    """One session through every path the floods take, so first use of code is not counted as growth."""
    reader, writer = await connect(port, "/flood")
    writer.write(masked(0x02, b"") + masked(0x00, b"") * 5000)
    assert (await first_message_or_close(reader))[0] == 0x8
    writer.transport.abort()
    reader, writer = await connect(port, "/json")
    writer.write(masked(0x01, b'"') + masked(0x00, b"a") * 1000 + masked(0x80, b'"'))
    assert (await first_message_or_close(reader))[0] == 0x1
    writer.transport.abort()
    await asyncio.sleep(0.3)


async def test_five_million_empty_fragments_are_closed_1009_within_the_bound(
    wsgate_process, tmp_path, upstream
):
    process, port = await start(wsgate_process, tmp_path, upstream.url("/echo"))
    await warm_up(port)
    reader, writer = await connect(port, "/flood")
    flood = masked(0x02, b"") + masked(0x00, b"") * 5_000_000  # 30 MB on the wire

    async def attack() -> tuple[int, bytes]:
        sending = asyncio.ensure_future(send_all(writer, flood))
        answer = await first_message_or_close(reader)
        await sending  # the attacker goes on sending after the close; the gateway discards it, then cuts
        return answer

    work = asyncio.ensure_future(attack())
    growth = await peak_growth(process.process.pid, work)
    opcode, payload = work.result()
    assert (opcode, payload[:2]) == (0x8, struct.pack("!H", 1009))
    assert payload[2:] == b"message in more than 4096 fragments"
    assert growth <= SESSION_BOUND + SLACK, f"RSS grew {growth / MIB:.1f} MiB"


async def test_a_600_kb_message_in_one_byte_fragments_is_gathered_in_one_buffer(
    wsgate_process, tmp_path, upstream
):
    process, port = await start(wsgate_process, tmp_path, upstream.url("/echo"))
    await warm_up(port)
    reader, writer = await connect(port, "/json")
    document = b'"' + b"a" * 599_998 + b'"'
    flood = masked(0x01, document[:1]) + b"".join(
        masked(0x00, document[i : i + 1]) for i in range(1, 599_999)
    )
    flood += masked(0x80, document[-1:])

    async def send_and_read_echo() -> tuple[int, bytes]:
        await send_all(writer, flood)
        return await first_message_or_close(reader)

    work = asyncio.ensure_future(send_and_read_echo())
    growth = await peak_growth(process.process.pid, work)
    assert work.result() == (0x1, document)  # the message reached the upstream whole, and came back
    assert growth <= len(document) + SESSION_BOUND + SLACK, f"RSS grew {growth / MIB:.1f} MiB"


async def test_twenty_sessions_of_200k_fragments_each_stay_within_the_bound(
    wsgate_process, tmp_path, upstream
):
    process, port = await start(wsgate_process, tmp_path, upstream.url("/echo"))
    await warm_up(port)
    document = b'"' + b"b" * 199_998 + b'"'
    flood = masked(0x01, b'"') + masked(0x00, b"b") * 199_998 + masked(0x80, b'"')
    clients = [await connect(port, "/json") for _ in range(20)]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes]:
        await send_all(writer, flood)
        return await first_message_or_close(reader)

    work = asyncio.ensure_future(asyncio.gather(*(one(reader, writer) for reader, writer in clients)))
    growth = await peak_growth(process.process.pid, work)
    assert work.result() == [(0x1, document)] * 20
    assert growth <= 20 * (len(document) + SESSION_BOUND) + SLACK, f"RSS grew {growth / MIB:.1f} MiB"


async def discarding_upstream() -> tuple[asyncio.Server, int]:
    """A service that accepts the WebSocket and drops what it gets unread: the floods' cost stays in the
    gateway, not in this process."""

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 20):
                pass

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_client_flooding_tiny_frames_does_not_stall_other_sessions(
    wsgate_process, tmp_path, upstream
):
    sink, sink_port = await discarding_upstream()
    _, port = await serve(
        wsgate_process,
        tmp_path,
        f"""\
        routes:
          - {{path: /flood, upstream: "ws://127.0.0.1:{sink_port}/", auth: none}}
          - {{path: /probe, upstream: "{upstream.url("/echo")}", auth: none}}
        """,
    )
    reader, writer = await connect(port, "/probe")  # one echo at a time, its round trips timed
    flood = [sys.executable, str(OFFENDER), "flood", f"127.0.0.1:{port}/flood", "empty", "3"]
    flooders = [
        await asyncio.create_subprocess_exec(*flood, stdout=asyncio.subprocess.PIPE) for _ in range(2)
    ]
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.5)  # the floods are under way
    worst = 0.0
    rounds = 0
    started = loop.time()
    while loop.time() - started < 2.0:
        sent_at = loop.time()
        writer.write(masked(0x82, b"probe"))
        assert (await asyncio.wait_for(first_message_or_close(reader), 10)) == (0x2, b"probe")
        worst = max(worst, loop.time() - sent_at)
        rounds += 1
    for flooder in flooders:
        stdout, _ = await asyncio.wait_for(flooder.communicate(), 10)
        assert json.loads(stdout)["sent"] > 1_000_000  # it did flood
    sink.close()
    # Before turns were taken, one flooder held the loop for up to 3 s at a time and two for longer.
    assert worst < 0.5, f"worst round trip {worst:.3f} s over {rounds} rounds"
    assert rounds >= 20
