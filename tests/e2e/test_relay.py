"""Frames flow both ways unchanged: text and binary byte-for-byte, fragments joined, pings answered,
subprotocols negotiated with the upstream, request headers forwarded, backpressure instead of buffering."""

from __future__ import annotations

import asyncio
import json
import os
import resource

import aiohttp
import pytest
from aiohttp import WSMsgType
from wsraw import BINARY, CONT, PING, PONG, TEXT, RawClient


def route(upstream_url: str, extra: str = "") -> str:
    return f"""
    routes:
      - path: /echo
        match: prefix
        upstream: {upstream_url}
        auth: none
{extra}"""


async def test_text_and_binary_round_trip_byte_for_byte(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/echo")))
    texts = ["", "plain", "héllo wörld ✓ 𝄞", "x" * 70000]
    blobs = [b"", bytes(range(256)), os.urandom(200_000)]
    async with client.ws_connect(gw.url()) as ws:
        for text in texts:
            await ws.send_str(text)
            message = await ws.receive(timeout=5)
            assert (message.type, message.data) == (WSMsgType.TEXT, text)
        for blob in blobs:
            await ws.send_bytes(blob)
            message = await ws.receive(timeout=5)
            assert (message.type, message.data) == (WSMsgType.BINARY, blob)
    assert upstream.records[0].messages == texts + blobs


async def test_fragmented_messages_arrive_whole(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo")))
    ws, response = await RawClient.connect(gw.port, "/echo")
    assert response.status == 101
    ws.send_frame(TEXT, b"frag", fin=False)
    ws.send_frame(PING, b"in-between")  # a control frame may sit between fragments
    ws.send_frame(CONT, b"ment", fin=False)
    ws.send_frame(CONT, "ed ✓".encode(), fin=True)
    ws.send_frame(BINARY, b"\x00\x01", fin=False)
    ws.send_frame(CONT, b"\x02", fin=True)
    assert await ws.recv_message() == (TEXT, "fragmented ✓".encode())
    assert await ws.recv_message() == (BINARY, b"\x00\x01\x02")
    assert upstream.records[0].messages == ["fragmented ✓", b"\x00\x01\x02"]
    ws.abort()


async def test_ping_is_answered_with_its_payload(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo")))
    ws, _ = await RawClient.connect(gw.port, "/echo")
    ws.send_frame(PING, b"are you there")
    frame = await ws.recv_frame()
    assert (frame.opcode, frame.payload) == (PONG, b"are you there")
    ws.abort()


async def test_subprotocol_offered_upstream_and_its_choice_returned(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/echo")))
    async with client.ws_connect(gw.url(), protocols=("v2.unknown", "echo")) as ws:
        assert ws.protocol == "echo"
    assert upstream.records[-1].headers["Sec-WebSocket-Protocol"] == "v2.unknown, echo"
    async with client.ws_connect(gw.url(), protocols=("nothing-known",)) as ws:
        assert ws.protocol is None


async def test_request_headers_forwarded_and_hop_by_hop_removed(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/headers")))
    headers = {
        "Cookie": "session=abc; theme=dark",
        "User-Agent": "wsgate-test/1.0",
        "X-Forwarded-For": "6.6.6.6",  # from an untrusted peer: replaced, never trusted
        "X-Request-Id": "spoofed",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Custom": "kept",
    }
    async with client.ws_connect(gw.url("/echo/room/7?lang=en&x=1"), headers=headers) as ws:
        seen = json.loads((await ws.receive(timeout=5)).data)
    forwarded = {name.lower(): value for name, value in seen["headers"].items()}
    assert seen["path"] == "/headers/room/7"
    assert seen["query"] == "lang=en&x=1"
    assert forwarded["cookie"] == "session=abc; theme=dark"
    assert forwarded["user-agent"] == "wsgate-test/1.0"
    assert forwarded["x-custom"] == "kept"
    assert forwarded["x-forwarded-for"] == "127.0.0.1"
    assert forwarded["x-forwarded-proto"] == "http"
    assert forwarded["x-request-id"] not in ("", "spoofed")
    assert "keep-alive" not in forwarded and "te" not in forwarded


async def test_request_id_returned_to_client_matches_upstream(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/headers")))
    async with client.ws_connect(gw.url()) as ws:
        seen = json.loads((await ws.receive(timeout=5)).data)
        request_id = ws._response.headers["X-Request-Id"]
    forwarded = {name.lower(): value for name, value in seen["headers"].items()}
    assert forwarded["x-request-id"] == request_id


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed-upstream"])
async def test_slow_client_slows_upstream_instead_of_growing_memory(
    upstream, wsgate_process, tmp_path, compressed
):
    """The upstream floods 256 MiB at a client that reads nothing: wsgate must push back on the upstream
    (its sends block) and its own memory must stay far below what it was offered.

    Compressed on the upstream's hop, the 256 MiB of one byte repeated are about 256 KiB on the wire and
    fit in the sockets' buffers: the upstream is not held back, but what wsgate inflates for the client
    (which did not offer compression) must still wait for the client to read it."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0"}\nadmin: {address: "127.0.0.1:0"}\n'
        f"routes:\n  - path: /flood\n    upstream: {upstream.url('/flood')}\n    auth: none\n"
        f"    compression: {{upstream: {'true' if compressed else 'false'}}}\n"
        "limits: {max_message_size: 2MiB}\n"
    )
    process = wsgate_process("serve", "-c", str(policy), "--log-format", "json")
    port = await process.listening_port()
    baseline = _rss_bytes(process.process.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /flood?count=256&size=1048576 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(2.0)  # the client reads nothing while the upstream pushes
    grown = _rss_bytes(process.process.pid) - baseline
    sent_while_stalled = upstream.records[0].sent
    # Now drain everything and check it all arrives: backpressure delayed, never dropped.
    received = 0
    async with asyncio.timeout(60):
        while received < 256 * (1048576 + 10):
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    writer.close()
    assert received >= 256 * 1048576, received
    if not compressed:
        assert sent_while_stalled < 64, (
            f"the upstream sent {sent_while_stalled} MiB to a client reading nothing"
        )
    assert grown < 48 * 1024 * 1024, f"wsgate grew {grown / 2**20:.1f} MiB while a client was not reading"


async def test_many_sessions_do_not_interfere(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo")))
    async with aiohttp.ClientSession() as session:

        async def one(index: int) -> None:
            async with session.ws_connect(gw.url()) as ws:
                for round_ in range(20):
                    payload = f"{index}:{round_}"
                    await ws.send_str(payload)
                    assert (await ws.receive(timeout=5)).data == payload

        await asyncio.gather(*(one(index) for index in range(50)))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 0


async def test_non_ascii_header_bytes_reach_the_upstream_unchanged(gateway, upstream):
    gw = await gateway(route(upstream.url("/headers")))
    ws, response = await RawClient.connect(gw.port, "/echo", {"X-Name": "José ✓", "Cookie": "n=Zoë"})
    assert response.status == 101
    _, message = await ws.recv_message()
    forwarded = {name.lower(): value for name, value in json.loads(message)["headers"].items()}
    assert forwarded["x-name"] == "José ✓"  # the client's UTF-8 bytes, passed through as bytes
    assert forwarded["cookie"] == "n=Zoë"
    ws.abort()
