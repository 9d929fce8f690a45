"""permessage-deflate benchmark: CPU per message and per MiB in the frame core, with and without
pass-through, for JSON-like text of 1 KiB and 64 KiB.

Not collected by pytest. Run:  .venv/bin/python tests/bench/deflate_bench.py [--quick]

A client sends compressed text (context takeover, as browsers do) and the upstream hop negotiated the
extension too. Rows, per message size:

- ``plain``: neither hop compressed: the frame core re-masks and forwards (the figure to compare with);
- ``transcode``: what wsgate ships: each message inflated (bounded), UTF-8 checked, compressed again for
  the upstream hop with the gateway's own deflater;
- ``pass-through``: what an implementation passing compressed frames untouched would cost at best: the
  frame core forwarding the compressed bytes, plus a shadow inflater keeping the size count and its
  context (measured as the two parts, summed);
- ``inflate only``: the shadow inflater alone (part of pass-through), and ``deflate only``: the gateway's
  deflater alone (what pass-through would save over transcode).

CPU is this process's (``time.process_time``), per message and per MiB of inflated text.

``--memory N`` instead opens N sessions through a ``wsgate serve`` subprocess to a compressing aiohttp
echo upstream, each with one message each way (so every zlib object a session keeps exists), and prints
the gateway's RSS growth per session: plain, compressed with pass-through, and compressed with a JSON rule
on the client's messages (that direction inflated and compressed again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from proxy.deflate import Deflater, Inflater
from proxy.protocol import FrameReader

MIB = 1 << 20


def json_text(size: int, seed: int) -> bytes:
    """A JSON document of about ``size`` bytes: repeated keys, varying numbers and words."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
    items, total = [], 0
    while total < size:
        item = {
            "id": rng.randrange(10**9),
            "symbol": rng.choice(words).upper(),
            "price": round(rng.uniform(1, 1000), 2),
            "tags": rng.sample(words, 3),
        }
        items.append(item)
        total += len(json.dumps(item)) + 2
        if total > size - 200:
            break
    text = json.dumps({"kind": "quotes", "items": items})
    return json.dumps({"kind": "quotes", "items": items, "pad": "-" * max(0, size - len(text) - 11)}).encode()


def client_frame(first_byte: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        head = bytes([first_byte, 0x80 | length])
    elif length < 65536:
        head = bytes([first_byte, 0xFE]) + struct.pack("!H", length)
    else:
        head = bytes([first_byte, 0xFF]) + struct.pack("!Q", length)
    key = os.urandom(4)
    repeated = (key * (length // 4 + 1))[:length]
    return (
        head
        + key
        + (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    )


def cpu(work: Callable[[], None]) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


def measure(size: int, count: int) -> list[tuple[str, float]]:
    texts = [json_text(size, seed) for seed in range(count)]
    peer = zlib.compressobj(6, zlib.DEFLATED, -15, 8)  # a browser's compressor
    compressed = []
    for text in texts:
        out = peer.compress(text) + peer.flush(zlib.Z_SYNC_FLUSH)
        compressed.append(out[:-4])
    plain_wire = [client_frame(0x81, text) for text in texts]
    compressed_wire = [client_frame(0xC1, data) for data in compressed]
    # the compressed bytes as a plain reader would pass them through (RSV1 cleared: the reader knows no RSV)
    through_wire = [client_frame(0x82, data) for data in compressed]
    limit = 16 * MIB

    def plain() -> None:
        reader = FrameReader(True, limit, 1024)
        for wire in plain_wire:
            reader.receive_data(wire, 0.0)

    def transcode() -> None:
        reader = FrameReader(True, limit, 1024, None, Inflater(15, False), Deflater(12, False))
        for wire in compressed_wire:
            reader.receive_data(wire, 0.0)
        assert reader.messages == count and not reader.events

    def forward_compressed() -> None:
        reader = FrameReader(True, limit, 1024)
        for wire in through_wire:
            reader.receive_data(wire, 0.0)

    def inflate_only() -> None:
        inflater = Inflater(15, False)
        for data in compressed:
            inflater.inflate(data, True, limit)

    def deflate_only() -> None:
        deflater = Deflater(12, False)
        for text in texts:
            deflater.deflate(text, True)

    rows = [
        ("plain", cpu(plain)),
        ("transcode", cpu(transcode)),
        ("pass-through", cpu(forward_compressed) + cpu(inflate_only)),
        ("inflate only", cpu(inflate_only)),
        ("deflate only", cpu(deflate_only)),
    ]
    ratio = sum(map(len, compressed)) / sum(map(len, texts))
    print(f"\n{size // 1024} KiB JSON-like text, {count} messages, compressed to {ratio:.0%} by the client")
    print(f"{'':<14}{'µs/message':>12}{'ms/MiB':>10}")
    mib = count * size / MIB
    for name, seconds in rows:
        print(f"{name:<14}{seconds / count * 1e6:>12.1f}{seconds / mib * 1e3:>10.1f}")
    return rows


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _sessions_rss(sessions: int, compression: bool, rules: str) -> float:
    """KiB of gateway RSS per open session, with one message each way."""
    import websockets
    from aiohttp import WSMsgType, web

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=True)
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/echo", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream_port = runner.addresses[0][1]
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(
            f'version: 1\nlisten: {{address: "127.0.0.1:{port}"}}\nadmin: {{address: "127.0.0.1:0"}}\n'
            f"routes:\n  - path: /echo\n    upstream: ws://127.0.0.1:{upstream_port}/echo\n    auth: none\n"
            f"    compression: {{client: {str(compression).lower()}, upstream: {str(compression).lower()}}}\n"
            + rules
        )
        # its log goes nowhere: a pipe nobody reads would stop it once full
        command = [sys.executable, "-m", "proxy", "serve", "-c", str(policy), "--log-level", "error"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            message = json_text(1024, 1).decode()
            clients = []
            baseline = 0
            for index in range(sessions + 20):
                if index == 20:  # the first sessions warm the process up
                    await asyncio.sleep(0.5)
                    baseline = _rss(process.pid)
                ws = await websockets.connect(f"ws://127.0.0.1:{port}/echo", compression="deflate")
                await ws.send(message)
                await ws.recv()
                clients.append(ws)
            await asyncio.sleep(0.5)
            grown = _rss(process.pid) - baseline
            for ws in clients:
                await ws.close()
            return grown / sessions / 1024
        finally:
            process.terminate()
            process.wait(10)
            await runner.cleanup()


def memory(sessions: int) -> None:
    print(f"\ngateway RSS per idle session after one 1 KiB message each way ({sessions} sessions)")
    for name, compression, rules in (
        ("plain", False, ""),
        ("compressed, passed through", True, ""),
        ("compressed, client JSON rule", True, "    messages: {client: {json: true}}\n"),
    ):
        print(f"{name:<32}{asyncio.run(_sessions_rss(sessions, compression, rules)):>8.1f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the work")
    parser.add_argument("--memory", type=int, metavar="N", help="measure RSS per session over N sessions")
    args = parser.parse_args()
    if args.memory:
        memory(args.memory)
        return
    scale = 10 if args.quick else 1
    measure(1024, 20000 // scale)
    measure(65536, 1000 // scale)


if __name__ == "__main__":
    main()
