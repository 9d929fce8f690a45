"""Core limits: message size (1009 to the offender, 1001 to the other side) and idle timeout."""

from __future__ import annotations

import asyncio
import time

from aiohttp import WSMsgType
from wsraw import BINARY, CONT, TEXT, RawClient


def route(upstream_url: str, limits: str) -> str:
    return f"""
    limits: {{{limits}}}
    routes:
      - path: /
        match: prefix
        upstream: {upstream_url}
        auth: none
    """


async def test_client_message_over_the_limit_gets_1009_and_upstream_1001(gateway, upstream, log_events):
    gw = await gateway(route(upstream.url("/"), "max_message_size: 1KiB"))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(BINARY, b"a" * 1024)  # exactly at the limit: fine
    assert await ws.recv_message() == (BINARY, b"a" * 1024)
    ws.send_frame(BINARY, b"b" * 1025)
    frame = await ws.recv_close()
    assert frame.close_code == 1009
    ws.send_close(1009)  # a client answers the close; the gateway reads the offender until it does
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert record.close_code == 1001
    assert record.messages == [b"a" * 1024]  # the oversized message never reached the upstream
    closed = await log_events.wait_for("session.close")
    assert (closed["initiator"], closed["code"]) == ("gateway", 1009)


async def test_fragmented_message_over_the_limit_is_caught_before_it_is_whole(gateway, upstream):
    gw = await gateway(route(upstream.url("/"), "max_message_size: 1KiB"))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    for _ in range(3):
        ws.send_frame(CONT if _ else TEXT, b"c" * 500, fin=False)
    frame = await ws.recv_close()
    assert frame.close_code == 1009
    assert upstream.records[0].messages == []


async def test_frame_header_announcing_a_huge_length_is_refused_without_buffering(gateway, upstream):
    gw = await gateway(route(upstream.url("/"), "max_message_size: 1MiB"))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    # a frame header claiming 8 GiB followed by nothing: refused from the header alone
    ws.writer.write(bytes([0x82, 0x80 | 127]) + (8 << 30).to_bytes(8, "big") + b"\x00\x00\x00\x00")
    frame = await ws.recv_close()
    assert frame.close_code == 1009


async def test_upstream_message_over_the_limit_gets_1009_and_client_1001(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/"), "max_message_size: 64KiB"))
    async with client.ws_connect(gw.url("/flood?count=1&size=70000")) as ws:
        message = await ws.receive(timeout=5)
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1001)
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert record.close_code == 1009


async def test_idle_session_is_closed_1001_both_ways(gateway, upstream, client, log_events):
    gw = await gateway(route(upstream.url("/"), "idle_timeout: 600ms"))
    async with client.ws_connect(gw.url("/echo")) as ws:
        for _ in range(4):  # activity keeps it open past the timeout
            await asyncio.sleep(0.3)
            await ws.send_str("tick")
            assert (await ws.receive(timeout=5)).data == "tick"
        started = time.monotonic()
        message = await ws.receive(timeout=5)
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")
        assert 0.4 < time.monotonic() - started < 1.5
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert record.close_code == 1001
    closed = await log_events.wait_for("session.close")
    assert (closed["initiator"], closed["reason"]) == ("gateway", "idle timeout")


async def test_route_limits_override_policy_limits(gateway, upstream):
    gw = await gateway(
        f"""
    limits: {{max_message_size: 1MiB}}
    routes:
      - path: /small
        upstream: {upstream.url("/echo")}
        auth: none
        limits: {{max_message_size: 100B}}
      - path: /big
        upstream: {upstream.url("/echo")}
        auth: none
    """
    )
    ws, _ = await RawClient.connect(gw.port, "/big")
    ws.send_frame(BINARY, b"x" * 5000)
    assert await ws.recv_message() == (BINARY, b"x" * 5000)
    ws.abort()
    ws, _ = await RawClient.connect(gw.port, "/small")
    ws.send_frame(BINARY, b"x" * 101)
    assert (await ws.recv_close()).close_code == 1009
