"""Keepalive: a side that stops answering is found within ``ping_interval + ping_timeout`` and cut, the
other side told 1001; a quiet healthy session stays open; the gateway's pongs are consumed while the peers'
own pings and pongs cross; ``idle_timeout`` counts data, not pings."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import WSMsgType
from wsraw import CLOSE, PING, PONG, TEXT, Frame, RawClient, accept_upgrade, read_frame


class RawUpstream:
    """A WebSocket service written with raw frames, to control what a client library would hide: it
    records every frame the gateway sends it, answers pings only when told to, and can send a text frame
    every ``tick`` seconds."""

    def __init__(self, answer_pings: bool = False, tick: float = 0.0) -> None:
        self.answer_pings = answer_pings
        self.tick = tick
        self.frames: list[Frame] = []
        self.eof = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for writer in self.writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/raw"

    def send(self, opcode: int, payload: bytes) -> None:
        for writer in self.writers:
            writer.write(bytes([0x80 | opcode, len(payload)]) + payload)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        self.writers.append(writer)
        if self.tick:
            task = asyncio.ensure_future(self._ticker(writer))
            self._tasks.add(task)
        try:
            while True:
                frame = await read_frame(reader)
                self.frames.append(frame)
                payload = frame.payload
                if frame.opcode == PING and self.answer_pings:
                    writer.write(bytes([0x80 | PONG, len(payload)]) + payload)
                if frame.opcode == CLOSE:
                    writer.write(bytes([0x80 | CLOSE, len(payload)]) + payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()

    async def _ticker(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                writer.write(bytes([0x80 | TEXT, 4]) + b"tick")
                await asyncio.sleep(self.tick)

    def opcodes(self, opcode: int) -> list[bytes]:
        return [frame.payload for frame in self.frames if frame.opcode == opcode]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    server = await RawUpstream().start()
    yield server
    await server.stop()


def policy(url: str, limits: str) -> str:
    return f"""
    limits: {{{limits}}}
    routes:
      - {{path: /, match: prefix, upstream: "{url}", auth: none}}
    """


async def test_a_client_that_stopped_answering_is_cut_within_interval_plus_timeout(
    gateway, upstream, log_events
):
    gw = await gateway(policy(upstream.url("/echo"), "ping_interval: 300ms, ping_timeout: 300ms"))
    loop = asyncio.get_running_loop()
    ws, _ = await RawClient.connect(gw.port, "/echo")  # connects, then neither sends nor answers
    opened = loop.time()
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    found_after = loop.time() - opened
    assert 0.5 <= found_after <= 0.6 + 0.4, found_after
    assert record.close_code == 1001
    closed = await log_events.wait_for("session.close")
    assert (closed["initiator"], closed["code"], closed["reason"]) == ("gateway", 1011, "keepalive timeout")
    # what the client would have read, had it been there: the ping, then 1011, then the socket cut
    ping = await ws.recv_frame()
    assert ping.opcode == PING
    assert (await ws.recv_close()).close_code == 1011
    assert await ws.at_eof()


async def test_a_dead_client_is_found_although_the_upstream_keeps_sending(gateway, log_events):
    ticking = await RawUpstream(tick=0.05).start()
    try:
        gw = await gateway(
            policy(ticking.url(), "ping_interval: 300ms, ping_timeout: 300ms, idle_timeout: 1h")
        )
        loop = asyncio.get_running_loop()
        silent, _ = await RawClient.connect(gw.port, "/")  # held open, but never read nor answered
        opened = loop.time()
        closed = await log_events.wait_for("session.close", timeout=5)
        assert (closed["code"], closed["reason"]) == (1011, "keepalive timeout")
        assert loop.time() - opened <= 0.6 + 0.4
        assert ticking.opcodes(CLOSE)[0][:2] == struct.pack("!H", 1001)
        silent.abort()
    finally:
        await ticking.stop()


async def test_an_upstream_that_does_not_answer_pings_is_cut_and_the_client_gets_1001(
    gateway, client, raw_upstream, log_events
):
    gw = await gateway(policy(raw_upstream.url(), "ping_interval: 300ms, ping_timeout: 300ms"))
    loop = asyncio.get_running_loop()
    async with client.ws_connect(gw.url("/"), autoping=True) as ws:
        opened = loop.time()
        message = await ws.receive(timeout=5)
        assert (message.type, message.data, message.extra) == (
            WSMsgType.CLOSE,
            1001,
            "upstream did not answer a ping",
        )
        assert loop.time() - opened <= 0.6 + 0.4
    await asyncio.wait_for(raw_upstream.eof.wait(), 2)  # its socket was cut, no close handshake
    assert len(raw_upstream.opcodes(PING)) == 1
    closed = await log_events.wait_for("session.close")
    assert (closed["code"], closed["reason"]) == (1011, "keepalive timeout")


async def test_a_quiet_healthy_session_is_not_cut(gateway, upstream, client, log_events):
    gw = await gateway(policy(upstream.url("/echo"), "ping_interval: 200ms, ping_timeout: 200ms"))
    async with client.ws_connect(gw.url("/echo"), autoping=True) as ws:
        received: asyncio.Queue[object] = asyncio.Queue()

        async def read() -> None:  # aiohttp answers pings while the application reads, as apps do
            async for message in ws:
                await received.put(message)

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(1.5)  # several keepalive rounds, not one data message
        await ws.send_str("still here")
        message = await asyncio.wait_for(received.get(), 2)
        assert (message.type, message.data) == (WSMsgType.TEXT, "still here")  # type: ignore[attr-defined]
        reader.cancel()
    assert not [entry for entry in log_events.named("session.close") if entry["code"] == 1011]


async def test_the_gateways_pongs_are_consumed_and_the_peers_own_pings_and_pongs_cross(gateway, raw_upstream):
    raw_upstream.answer_pings = True
    gw = await gateway(policy(raw_upstream.url(), "ping_interval: 200ms, ping_timeout: 1s"))
    ws, _ = await RawClient.connect(gw.port, "/")
    ping = await ws.recv_frame(timeout=2)
    assert ping.opcode == PING and len(ping.payload) == 4
    ws.send_frame(PONG, ping.payload)  # the answer to the gateway's ping
    ws.send_frame(PING, b"client ping")
    ws.send_frame(PONG, b"client pong")
    await asyncio.sleep(0.3)
    raw_upstream.send(PONG, b"upstream pong")
    raw_upstream.send(PING, b"upstream ping")
    seen = []
    while len(seen) < 3:
        frame = await ws.recv_frame(timeout=2)
        if frame.opcode in (PING, PONG) and frame.payload != ping.payload and len(frame.payload) != 4:
            seen.append((frame.opcode, frame.payload))
    # the client sees the upstream's answer to its ping, and the upstream's own ping and pong
    assert sorted(seen) == sorted(
        [(PONG, b"client ping"), (PONG, b"upstream pong"), (PING, b"upstream ping")]
    )
    assert raw_upstream.opcodes(PING)[:1] != [ping.payload]
    assert b"client ping" in raw_upstream.opcodes(PING)
    assert raw_upstream.opcodes(PONG) == [b"client pong"]  # not the client's answer to the gateway
    ws.send_close(1000)
    assert (await ws.recv_close()).close_code == 1000


async def test_idle_timeout_counts_data_not_pings(gateway, upstream, client, log_events):
    gw = await gateway(
        policy(upstream.url("/echo"), "ping_interval: 100ms, ping_timeout: 1s, idle_timeout: 800ms")
    )
    loop = asyncio.get_running_loop()
    async with client.ws_connect(gw.url("/echo"), autoping=True) as ws:
        opened = loop.time()
        await ws.ping(b"mine")
        message = await ws.receive(timeout=3)
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
        assert 0.7 <= loop.time() - opened <= 1.5


async def test_ping_interval_zero_sends_no_pings(gateway, upstream):
    gw = await gateway(policy(upstream.url("/echo"), "ping_interval: 0s"))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    with pytest.raises(TimeoutError):
        await ws.recv_frame(timeout=1.0)
    ws.send_frame(TEXT, b"alive")
    assert await ws.recv_message() == (TEXT, b"alive")


def test_default_keepalive_finds_a_dead_peer_within_a_minute_and_cuts_no_quiet_session() -> None:
    from proxy.policy.model import Limits

    limits = Limits()
    assert 0 < limits.ping_interval + limits.ping_timeout <= 60
    assert limits.ping_interval <= 30  # below the NAT timeouts of many mobile networks
    assert limits.idle_timeout == 0


def read_slowly(port: int, path: str, seconds: float, rate: int) -> tuple[int, int]:
    """A client on a plain socket with a small receive buffer that reads ``rate`` bytes a second and answers
    each ping when it gets to it; returns the bytes and the pings it read."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(4096)
        del buffer[: buffer.index(b"\r\n\r\n") + 4]
        received = pings = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            chunk = sock.recv(16 * 1024)
            assert chunk, "the gateway closed the connection"
            received += len(chunk)
            buffer += chunk
            while len(buffer) >= 2:
                length, head = buffer[1] & 0x7F, 2
                if length == 126:
                    length, head = int.from_bytes(buffer[2:4], "big"), 4
                elif length == 127:
                    length, head = int.from_bytes(buffer[2:10], "big"), 10
                if len(buffer) < head + length:
                    break
                opcode, payload = buffer[0] & 0x0F, bytes(buffer[head : head + length])
                del buffer[: head + length]
                if opcode == CLOSE:
                    raise AssertionError(f"closed: {payload!r}")
                if opcode == PING:
                    pings += 1
                    sock.sendall(bytes([0x80 | PONG, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            time.sleep(len(chunk) / rate)
        return received, pings


async def test_a_slow_reader_is_not_taken_for_dead_while_its_ping_waits_behind_data(
    gateway, upstream, log_events
):
    gw = await gateway(policy(upstream.url("/"), "ping_interval: 300ms, ping_timeout: 300ms"))
    # 26 MB towards a client that reads 400 KB/s: the gateway's pings wait behind megabytes of data
    received, _pings = await asyncio.to_thread(
        read_slowly, gw.port, "/flood?count=400&size=65536", 4.0, 400_000
    )
    assert received > 1_000_000  # (pings: the gateway's first one may not even have reached it yet)
    closes = [(entry["code"], entry["reason"]) for entry in log_events.named("session.close")]
    assert not closes, closes
