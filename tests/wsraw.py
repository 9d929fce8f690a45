"""A deliberately small raw WebSocket client for tests that need exact control of the bytes on the wire:
fragments, pings, invalid UTF-8, oversized or malformed frames, raw handshakes.

Written independently of ``proxy.frames`` so the gateway is not tested against its own encoder.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from dataclasses import dataclass

TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/echo",
        headers: dict[str, str] | None = None,
        *,
        websocket: bool = True,
        host: str = "127.0.0.1",
        ssl: object = None,
        prefix: bytes = b"",
    ) -> tuple[RawClient, Response]:
        """Open a TCP connection, send an upgrade request (or a plain GET), return the parsed response."""
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl, limit=2**24)  # type: ignore[arg-type]
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
        all_headers: dict[str, str] = {}
        if websocket:
            all_headers.update(
                {
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
                    "Sec-WebSocket-Version": "13",
                }
            )
        all_headers.update(headers or {})
        lines += [f"{name}: {value}" for name, value in all_headers.items() if value is not None]
        writer.write(prefix + ("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        client = cls(reader, writer)
        return client, await client.read_response()

    async def read_response(self) -> Response:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        return Response(int(status_line.split()[1]), headers, body)

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> None:
        head = bytearray([(0x80 if fin else 0) | opcode])
        length = len(payload)
        mask_bit = 0x80 if mask else 0
        if length < 126:
            head.append(mask_bit | length)
        elif length < 65536:
            head.append(mask_bit | 126)
            head += struct.pack("!H", length)
        else:
            head.append(mask_bit | 127)
            head += struct.pack("!Q", length)
        if mask:
            key = os.urandom(4)
            head += key
            payload = (
                bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if length < 4096 else _mask(payload, key)
            )
        self.writer.write(bytes(head) + payload)

    def send_close(self, code: int, reason: str = "") -> None:
        self.send_frame(CLOSE, struct.pack("!H", code) + reason.encode())

    async def recv_frame(self, timeout: float = 5.0) -> Frame:
        async with asyncio.timeout(timeout):
            return await read_frame(self.reader)

    async def recv_message(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next data message (fragments joined), skipping control frames other than close."""
        opcode, parts = None, []
        while True:
            frame = await self.recv_frame(timeout)
            if frame.opcode == CLOSE:
                return CLOSE, frame.payload
            if frame.opcode in (PING, PONG):
                continue
            if opcode is None:
                opcode = frame.opcode
            parts.append(frame.payload)
            if frame.fin:
                return opcode, b"".join(parts)

    async def recv_close(self, timeout: float = 5.0) -> Frame:
        """Skip data until the close frame arrives."""
        while True:
            frame = await self.recv_frame(timeout)
            if frame.opcode == CLOSE:
                return frame

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the gateway closed the TCP connection (all further bytes discarded)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except (ConnectionError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """The next frame on ``reader``, unmasked if it was masked."""
    b0, b1 = await reader.readexactly(2)
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    key = await reader.readexactly(4) if b1 & 0x80 else None
    payload = await reader.readexactly(length)
    if key:
        payload = _mask(payload, key)
    return Frame(bool(b0 & 0x80), b0 & 0x0F, payload)


def _mask(payload: bytes, key: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


async def accept_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """The server side of a handshake: read the upgrade request, answer 101; returns the request head."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    key = next(
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.lower().startswith("sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    return head
