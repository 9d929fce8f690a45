"""Offenders read their close code: real client libraries that keep sending past a message rate, a size
limit and a UTF-8 rule read 1008, 1009 and 1007 every time, not a reset (1006). Control frames count
against the message rate."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from wsraw import CLOSE, PING, RawClient

RUNS = 20
OFFENDER = Path(__file__).resolve().parent.parent / "offender.py"

POLICY = """
routes:
  - path: /rate
    upstream: {upstream}
    auth: none
    limits: {{messages_per_connection: 10/s, message_burst: 10}}
  - path: /size
    upstream: {upstream}
    auth: none
    limits: {{max_message_size: 1MiB}}
  - path: /utf8
    upstream: {upstream}
    auth: none
"""

#: The close code a client that keeps sending on each route must read.
EXPECTED = {"rate": 1008, "size": 1009, "utf8": 1007}


@pytest.mark.parametrize("library", ["aiohttp", "websockets"])
@pytest.mark.parametrize("case", sorted(EXPECTED))
async def test_a_client_that_keeps_sending_reads_its_close_code_every_time(gateway, upstream, library, case):
    gw = await gateway(POLICY.format(upstream=upstream.url("/silent")))
    # The offender runs in a process of its own, as a real client does: on one event loop with the
    # gateway, the two would take turns and hide the race between its sending and the gateway's close.
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(OFFENDER), library, gw.url(f"/{case}"), case, str(RUNS),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(process.communicate(), 120)
    assert json.loads(stdout) == [EXPECTED[case]] * RUNS


async def test_an_offender_that_never_answers_the_close_is_cut_after_close_timeout(gateway, upstream):
    gw = await gateway(
        f"""
        limits: {{close_timeout: 500ms}}
        routes: [{{path: /utf8, upstream: "{upstream.url("/echo")}", auth: none}}]
        """
    )
    ws, _ = await RawClient.connect(gw.port, "/utf8")
    ws.send_frame(1, b"\xff")
    assert (await ws.recv_close()).close_code == 1007
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(50):  # still sending: read and discarded, not answered with a reset
        ws.send_frame(2, b"ignored" * 100)
        await asyncio.sleep(0.005)
    assert await ws.at_eof(timeout=3)
    assert 0.4 <= loop.time() - started <= 2.0


async def test_three_hundred_pings_on_a_route_limited_to_ten_per_second(gateway, upstream, log_events):
    gw = await gateway(
        f"""
        routes:
          - path: /rate
            upstream: {upstream.url("/echo")}
            auth: none
            limits: {{messages_per_connection: 10/s, message_burst: 10}}
        """
    )
    ws, _ = await RawClient.connect(gw.port, "/rate")
    for i in range(300):
        ws.send_frame(PING, str(i).encode())
    frame = await ws.recv_close()
    assert (frame.opcode, frame.close_code, frame.close_reason) == (CLOSE, 1008, "rate limit exceeded")
    ws.send_close(1008)
    closed = await log_events.wait_for("session.close")
    assert (closed["code"], closed["reason"]) == (1008, "rate limit exceeded")


async def test_answers_to_earlier_messages_reach_the_offender_before_its_close(gateway, upstream):
    gw = await gateway(f"""routes: [{{path: /echo, upstream: "{upstream.url("/echo")}", auth: none}}]""")
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(1, b"first")
    ws.send_frame(0x3, b"reserved opcode")  # in the same write: the echo of "first" is still on its way
    assert await ws.recv_message() == (1, b"first")
    assert (await ws.recv_close()).close_code == 1002


async def test_a_broken_close_frame_is_answered_1002_and_the_socket_closed_at_once(gateway, upstream):
    gw = await gateway(
        f"""
        limits: {{close_timeout: 5s}}
        routes: [{{path: /echo, upstream: "{upstream.url("/echo")}", auth: none}}]
        """
    )
    ws, _ = await RawClient.connect(gw.port, "/echo")
    loop = asyncio.get_running_loop()
    started = loop.time()
    ws.send_frame(CLOSE, b"\x03\xe8" + b"r" * 124)  # 126 bytes: longer than a control frame may be
    assert (await ws.recv_close()).close_code == 1002
    assert await ws.at_eof(timeout=3)
    assert loop.time() - started < 2  # not held for the close_timeout: no other close frame will come
