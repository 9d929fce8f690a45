"""A client that keeps sending past a limit, with a real client library, in a process of its own.

    python tests/offender.py aiohttp|websockets URL rate|size|utf8 RUNS
    python tests/offender.py flood HOST:PORT/PATH empty SECONDS

Opens RUNS sessions one after another; on each it sends, as fast as the library lets it, what breaks the
route's rule (``rate``: small messages past the message rate; ``size``: 2 MiB messages on a 1 MiB route;
``utf8``: text that is not UTF-8), while it reads. Prints the close codes it read, as a JSON list (null
where it read none, as a reset gives). ``flood`` sends whole empty binary messages (6 bytes each on the
wire, the most frames per byte) for SECONDS without reading, as fast as the gateway takes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time

import aiohttp
import websockets
from aiohttp import WSMsgType

PAYLOADS = {
    "rate": (b"x" * 64, False),
    "size": (b"x" * (2 * 1024 * 1024), False),
    "utf8": (b"\xff\xfe invalid", True),
}


async def with_aiohttp(url: str, payload: bytes, text: bool) -> int | None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url, autoclose=True) as ws:

        async def keep_sending() -> None:
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                while not ws.closed:
                    await ws.send_frame(payload, WSMsgType.TEXT if text else WSMsgType.BINARY)
                    await asyncio.sleep(0)

        sender = asyncio.ensure_future(keep_sending())
        try:
            message = await ws.receive(timeout=10)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        if message.type == WSMsgType.CLOSE:
            return int(message.data)
        return None


async def with_websockets(url: str, payload: bytes, text: bool) -> int | None:
    async with websockets.connect(url, max_size=None, open_timeout=5, close_timeout=5) as ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.send(payload, text=text)
                    await asyncio.sleep(0)
        await ws.wait_closed()
        received = ws.protocol.close_rcvd
        return None if received is None else int(received.code)


def flood(address: str, seconds: float) -> None:
    host_port, _, path = address.partition("/")
    host, _, port = host_port.rpartition(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        chunk = b"\x82\x80\0\0\0\0" * 40_000
        deadline = time.monotonic() + seconds
        sent = 0
        sock.settimeout(1.0)
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                sent += sock.send(chunk)
    print(json.dumps({"sent": sent}))


async def main(library: str, url: str, case: str, runs: int) -> None:
    offend = with_aiohttp if library == "aiohttp" else with_websockets
    payload, text = PAYLOADS[case]
    codes = []
    for _ in range(runs):
        try:
            codes.append(await offend(url, payload, text))
        except (OSError, aiohttp.ClientError, websockets.WebSocketException, TimeoutError):
            codes.append(None)
    print(json.dumps(codes))


if __name__ == "__main__":
    if sys.argv[1] == "flood":
        flood(sys.argv[2], float(sys.argv[4]))
    else:
        asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
