"""Flood benchmark: what fragment floods cost the gateway's memory, and what the client reads.

Not collected by pytest. Run:  .venv/bin/python tests/bench/flood_bench.py [--repo DIR]

Starts an aiohttp echo upstream in this process and ``wsgate serve`` (from ``--repo``, default this checkout)
as a subprocess on an open route with a 1 MiB message limit, then, one flood at a time on a fresh gateway:

- ``empty``: one client opens a binary message and sends ``--frames`` empty continuation frames;
- ``one-byte``: one client sends a 600 KB text message as one-byte fragments;
- ``sessions``: 20 clients each send 200k one-byte fragments of a text message at once.

It prints, per flood, the gateway's peak RSS growth over its idle RSS (sampled every 20 ms from
``/proc/PID/status``), the close code the client read (``-`` for none) and how long the flood lasted.
``--max-fragments`` sets ``limits.max_fragments`` where the gateway knows the key (0: its default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from aiohttp import WSMsgType, web

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO / "tests")]

from relay_bench import free_port, wait_port  # noqa: E402 - siblings, found through the line above
from wsraw import read_frame  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def masked_frame(first: int, payload: bytes) -> bytes:
    """A client frame with an all-zero mask (legal, and the payload travels as it is)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + b"\0\0\0\0" + payload


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    async for message in ws:
        if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            pass  # a sink: the flood's cost to the gateway is what is measured
    return ws


async def open_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /flood HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode("latin-1"))
    return reader, writer


async def read_close_code(reader: asyncio.StreamReader) -> int | None:
    """Frames until a close frame; its code, or None if the connection ended without one."""
    try:
        while True:
            frame = await read_frame(reader)
            if frame.opcode == 0x8:
                return frame.close_code
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def send_flood(writer: asyncio.StreamWriter, chunks: list[bytes]) -> None:
    with contextlib.suppress(ConnectionError):
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        writer.write(masked_frame(0x88, struct.pack("!H", 1000)))
        await writer.drain()


def fragments(first_opcode: int, count: int, piece: bytes) -> list[bytes]:
    """A message opened with ``first_opcode`` and ``count`` continuation frames of ``piece``, then a FIN,
    in chunks of about 1 MB."""
    frame = masked_frame(0x00, piece)
    per_chunk = max(1, 1_000_000 // len(frame))
    chunks = [masked_frame(first_opcode, piece)]
    left = count
    while left > 0:
        n = min(per_chunk, left)
        chunks.append(frame * n)
        left -= n
    chunks.append(masked_frame(0x80, piece))
    return chunks


async def flood(name: str, port: int, pid: int, args: argparse.Namespace) -> tuple[int, str, float]:
    if name == "empty":
        plans = [fragments(0x02, args.frames, b"")]
    elif name == "one-byte":
        plans = [fragments(0x01, 600_000, b"a")]
    else:
        plans = [fragments(0x01, 200_000, b"a") for _ in range(20)]
    clients = [await open_client(port) for _ in plans]
    await asyncio.sleep(0.3)
    base = rss_kib(pid)
    peak = base
    started = time.monotonic()
    readers = [asyncio.ensure_future(read_close_code(reader)) for reader, _ in clients]
    senders = [
        asyncio.ensure_future(send_flood(writer, plan))
        for (_, writer), plan in zip(clients, plans, strict=True)
    ]
    while not all(task.done() for task in readers) and time.monotonic() - started < args.timeout:
        peak = max(peak, rss_kib(pid))
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - started
    for task in senders + readers:
        task.cancel()
    codes = []
    for task in readers:
        codes.append(str(task.result()) if task.done() and not task.cancelled() else "-")
    for _, writer in clients:
        writer.transport.abort()
    return (peak - base), ",".join(sorted(set(codes))), elapsed


def start_gateway(
    repo: Path, upstream_port: int, workdir: Path, max_fragments: int
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    extra = f", max_fragments: {max_fragments}" if max_fragments else ""
    policy = workdir / "flood.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            listen: {{address: "127.0.0.1:{port}"}}
            admin: {{address: "127.0.0.1:0"}}
            limits: {{max_message_size: 1MiB{extra}}}
            routes:
              - {{path: /flood, upstream: "ws://127.0.0.1:{upstream_port}/", auth: none}}
            """
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "-c", str(policy), "--log-level", "warning"],
        cwd=repo,
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
    except RuntimeError:
        process.kill()
        raise
    return process, port


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose wsgate is measured")
    parser.add_argument("--frames", type=int, default=5_000_000, help="empty continuation frames")
    parser.add_argument("--max-fragments", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per flood at most")
    parser.add_argument("floods", nargs="*", default=["empty", "one-byte", "sessions"])
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    print(f"flood benchmark: wsgate from {args.repo.name}, 1 MiB messages, {os.cpu_count()} CPUs")
    print(f"{'flood':<10} {'RSS growth MiB':>15} {'close code':>11} {'seconds':>8}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.floods:
                process, port = start_gateway(
                    args.repo.resolve(), upstream_port, Path(tmp), args.max_fragments
                )
                try:
                    growth, codes, elapsed = await flood(name, port, process.pid, args)
                finally:
                    process.kill()
                    process.wait(10)
                print(f"{name:<10} {growth / 1024:>15.1f} {codes:>11} {elapsed:>8.1f}")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
