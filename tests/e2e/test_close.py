"""Close codes cross the gateway unchanged both ways; a side that vanishes is reported to the other side
promptly; nothing (tasks, sockets, sessions) is left behind."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import time

from aiohttp import WSMsgType
from conftest import open_fds
from wsraw import TEXT, RawClient


def route(upstream_url: str) -> str:
    return f"""
    limits: {{close_timeout: 2s}}
    routes:
      - path: /
        match: prefix
        upstream: {upstream_url}
        auth: none
    """


async def test_upstream_close_code_and_reason_reach_client(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/")))
    async with client.ws_connect(gw.url("/echo")) as ws:
        await ws.send_str("close:4000")
        message = await ws.receive(timeout=5)
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4000, "bye")


async def test_upstream_close_right_after_open(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/")))
    async with client.ws_connect(gw.url("/close-on-open")) as ws:
        message = await ws.receive(timeout=5)
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4001, "go away")


async def test_client_close_code_and_reason_reach_upstream(gateway, upstream, log_events):
    gw = await gateway(route(upstream.url("/")))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(TEXT, b"hello")
    assert await ws.recv_message() == (TEXT, b"hello")
    ws.send_close(4321, "client says bye ✓")
    answer = await ws.recv_close()
    assert answer.close_code == 1000  # aiohttp answers every close with 1000; relayed as it was sent
    assert await ws.at_eof()
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert (record.close_code, record.close_reason) == (4321, "client says bye ✓")
    closed = await log_events.wait_for("session.close")
    assert (closed["initiator"], closed["code"], closed["reason"]) == ("client", 4321, "client says bye ✓")


async def test_close_without_code_is_relayed_as_no_status(gateway, upstream):
    gw = await gateway(route(upstream.url("/")))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(0x8, b"")
    frame = await ws.recv_close()
    assert frame.close_code == 1000
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert record.close_code in (0, 1005), record  # "no status" reached the upstream as no status


async def test_upstream_dies_mid_session_client_gets_1011_promptly(gateway, upstream, log_events):
    gw = await gateway(route(upstream.url("/")))
    ws, _ = await RawClient.connect(gw.port, "/die")
    started = time.monotonic()
    ws.send_frame(0x2, b"kill")
    frame = await ws.recv_close(timeout=3)
    assert frame.close_code in (1011, 1014), frame
    assert time.monotonic() - started < 1.0
    ws.send_close(frame.close_code or 1000)
    closed = await log_events.wait_for("session.close")
    assert closed["initiator"] == "upstream"


async def test_upstream_process_gone_client_gets_1011(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/")))
    async with client.ws_connect(gw.url("/silent")) as ws:
        await ws.send_str("x")
        await asyncio.sleep(0.05)
        for sock in list(upstream._sockets):  # the upstream host vanishes: TCP reset, no close frame
            transport = sock._req.transport if sock._req else None
            assert transport is not None
            transport.abort()
        message = await ws.receive(timeout=3)
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1011)


async def test_client_vanishes_upstream_gets_1001_promptly(gateway, upstream, log_events):
    gw = await gateway(route(upstream.url("/")))
    ws, _ = await RawClient.connect(gw.port, "/silent")
    ws.send_frame(TEXT, b"x")
    await asyncio.sleep(0.05)
    started = time.monotonic()
    ws.abort()
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 3)
    assert record.close_code == 1001
    assert time.monotonic() - started < 1.0
    closed = await log_events.wait_for("session.close")
    assert (closed["initiator"], closed["code"]) == ("client", 1006)


async def test_client_that_never_answers_a_close_is_cut_after_close_timeout(gateway, upstream):
    gw = await gateway(route(upstream.url("/")))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(TEXT, b"close:4002")
    frame = await ws.recv_close()
    assert frame.close_code == 4002
    started = time.monotonic()
    assert await ws.at_eof(timeout=5)  # we never answer; the gateway cuts us after close_timeout (2 s)
    assert 1.5 < time.monotonic() - started < 4


def _live_tasks() -> int:
    return len([task for task in asyncio.all_tasks() if not task.done()])


async def test_no_task_socket_or_session_leaks_across_every_ending(gateway, upstream, client):
    """Run every kind of ending many times; afterwards the gateway holds no session and the process has the
    same number of tasks and file descriptors as before."""
    gw = await gateway(route(upstream.url("/")))
    # warm up: first connections allocate lazily (resolver, SSL contexts, caches)
    async with client.ws_connect(gw.url("/echo")) as ws:
        await ws.send_str("warm")
        await ws.receive(timeout=5)
    await asyncio.sleep(0.2)
    gc.collect()
    fds_before, tasks_before = open_fds(), _live_tasks()

    for _ in range(10):
        # normal close from the client
        async with client.ws_connect(gw.url("/echo")) as ws:
            await ws.send_str("a")
            await ws.receive(timeout=5)
        # close from the upstream
        async with client.ws_connect(gw.url("/echo")) as ws:
            await ws.send_str("close:4000")
            await ws.receive(timeout=5)
        # upstream dies
        raw, _ = await RawClient.connect(gw.port, "/die")
        raw.send_frame(0x2, b"x")
        await raw.recv_close()
        raw.abort()
        # client vanishes
        raw, _ = await RawClient.connect(gw.port, "/silent")
        raw.send_frame(TEXT, b"x")
        await asyncio.sleep(0.01)
        raw.abort()
        # rejected handshakes
        async with client.get(gw.http("/echo")) as response:
            assert response.status == 426
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (len(gw.gateway.sessions) or upstream.sessions_open):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    gc.collect()
    assert len(gw.gateway.sessions) == 0
    assert upstream.sessions_open == 0
    assert _live_tasks() <= tasks_before, asyncio.all_tasks()
    assert open_fds() <= fds_before + 2, f"fds {fds_before} -> {open_fds()}"


async def test_client_that_stops_reading_cannot_hold_its_session_after_closing(gateway, upstream):
    """The upstream floods a client that reads nothing; the client then sends a close. The answer cannot
    be delivered into its full buffer, so the gateway cuts the socket after close_timeout (2 s here)."""
    gw = await gateway(route(upstream.url("/")))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        b"GET /flood?count=300&size=65536 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(0.5)  # the upstream fills every buffer on the way to us
    writer.write(bytes([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2]))  # close 1000, masked
    await writer.drain()
    started = time.monotonic()
    while len(gw.gateway.sessions) and time.monotonic() - started < 8:
        await asyncio.sleep(0.1)
    assert len(gw.gateway.sessions) == 0
    assert time.monotonic() - started < 5
    writer.transport.abort()


async def test_a_client_lost_while_the_upstream_was_held_back_lets_the_upstream_close_cleanly(
    gateway, upstream, log_events
):
    gw = await gateway(
        f"""
        limits: {{close_timeout: 5s}}
        routes:
          # uncompressed: the flood's repeated bytes, compressed, would fit in the buffers on the way
          - path: /flood
            upstream: "{upstream.url("/flood")}"
            auth: none
            compression: {{upstream: false}}
        """
    )
    # a client that reads nothing, with a small receive buffer: the upstream's stream fills the buffers on
    # the way and the upstream is held back
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    await loop.sock_sendall(
        sock,
        b"GET /flood?count=2000&size=65536 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    )
    assert (await loop.sock_recv(sock, 12)).startswith(b"HTTP/1.1 101")
    await asyncio.sleep(1.0)
    record = upstream.records[0]
    assert record.sent < 2000  # held back
    lost_at = loop.time()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset: the client is gone
    await asyncio.wait_for(record.closed.wait(), 5)
    # the upstream is read again, so its close handshake completes: 1001, not a cut after close_timeout
    assert record.close_code == 1001
    closed = await log_events.wait_for("session.close", timeout=5)
    assert loop.time() - lost_at < 3.0
    assert (closed["initiator"], closed["code"]) == ("client", 1006)
