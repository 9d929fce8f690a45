"""permessage-deflate (RFC 7692) through wsgate, on real sockets: each hop negotiated on its own, what
the route turns off, rules on inflated messages, a bomb, a corrupt stream, RSV1 where nothing was agreed,
and a browser.

Each test reads as: policy, action, what the client (or the upstream) sees -- the negotiated headers, the
frames on the wire (their RSV1 bit) and ``wsgate_compressed_messages_total``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import struct
import zlib
from typing import Any

import aiohttp
import pytest
import websockets
from test_admin_metrics import scrape, value
from test_relay import _rss_bytes
from wsraw import RawClient

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8
RSV1 = 0x40
MIB = 1 << 20
OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}


def route(target: str, extra: str = "", limits: str = "") -> str:
    return f"""
    limits: {{close_timeout: 2s{limits}}}
    routes:
      - path: /echo
        upstream: {target}
        auth: none
{extra}"""


def compress(data: bytes, stream: Any = None) -> bytes:
    stream = stream or zlib.compressobj(6, zlib.DEFLATED, -15)
    out = stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4]


def client_frame(first_byte: int, payload: bytes) -> bytes:
    """A masked client frame with ``first_byte`` as given (FIN, RSV, opcode)."""
    length = len(payload)
    if length < 126:
        head = bytes([first_byte, 0x80 | length])
    elif length < 65536:
        head = bytes([first_byte, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([first_byte, 0x80 | 127]) + struct.pack("!Q", length)
    key = os.urandom(4)
    repeated = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return head + key + masked


async def read_raw_frame(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[int, bytes]:
    """The next frame from the gateway: its first byte (RSV bits included) and payload."""
    async with asyncio.timeout(timeout):
        b0, b1 = await reader.readexactly(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        return b0, await reader.readexactly(length)


async def close_code_of(raw: RawClient) -> int:
    while True:
        b0, payload = await read_raw_frame(raw.reader)
        if b0 & 0x0F == CLOSE:
            return struct.unpack("!H", payload[:2])[0]


# -- both hops compressed ----------------------------------------------------------------------------------


async def test_a_websockets_client_and_a_compressing_upstream_both_use_compression(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo")))
    message = json.dumps({"kind": "quote", "symbols": ["ABC"] * 200})
    async with websockets.connect(gw.url(), compression="deflate") as ws:
        # the client's hop: wsgate's own answer to the client's offer
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
        for _ in range(3):
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 10) == message
        samples = await scrape(gw)
    # the upstream's hop: wsgate offered it, and the aiohttp upstream compressed its answers
    assert (
        upstream.records[0].headers["Sec-WebSocket-Extensions"]
        == "permessage-deflate; client_max_window_bits"
    )
    # no rule reads either direction and the parameters fit: compressed frames pass as they came
    metric = "wsgate_compressed_messages_total"
    for direction in ("client_to_upstream", "upstream_to_client"):
        for hop, expected in (("received", 3), ("passed", 3), ("sent", 0)):
            got = value(samples, metric, route="/echo", direction=direction, hop=hop)
            assert got == expected, (direction, hop)
    # sizes and byte counts are those of the inflated messages
    assert value(samples, "wsgate_bytes_total", route="/echo", direction="client_to_upstream") == 3 * len(
        message
    )


async def test_a_direction_with_rules_is_inflated_and_compressed_again(gateway, upstream):
    """A rule that reads whole messages (JSON) on the client's: that direction is inflated, checked and
    compressed again by wsgate; the other direction still passes as it came."""
    gw = await gateway(route(upstream.url("/echo"), "        messages: {client: {json: true}}"))
    message = json.dumps({"prix": "12,50 €"} | {f"k{index}": index for index in range(100)})
    async with websockets.connect(gw.url(), compression="deflate") as ws:
        for _ in range(3):
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 10) == message
        samples = await scrape(gw)
    metric = "wsgate_compressed_messages_total"
    assert value(samples, metric, route="/echo", direction="client_to_upstream", hop="sent") == 3
    assert value(samples, metric, route="/echo", direction="client_to_upstream", hop="passed") == 0
    assert value(samples, metric, route="/echo", direction="upstream_to_client", hop="passed") == 3
    assert upstream.records[0].messages == [message] * 3


async def test_the_client_hop_carries_compressed_frames_on_the_wire(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo")))
    raw, response = await RawClient.connect(gw.port, headers=OFFER)
    assert response.status == 101
    assert response.headers["sec-websocket-extensions"] == "permessage-deflate; client_max_window_bits=13"
    text = b"the same words, over and over " * 100
    peer = zlib.compressobj(6, zlib.DEFLATED, -13)
    decoder = zlib.decompressobj(wbits=-15)
    for _ in range(2):  # the second message uses both sides' context
        raw.writer.write(client_frame(0x80 | RSV1 | TEXT, compress(text, peer)))
        b0, payload = await read_raw_frame(raw.reader)
        assert b0 & RSV1 and b0 & 0x0F == TEXT and b0 & 0x80
        assert len(payload) < len(text) // 10
        assert decoder.decompress(payload + b"\x00\x00\xff\xff") == text
    assert upstream.records[0].messages == [text.decode()] * 2
    raw.close()


async def test_an_aiohttp_client_gets_compressed_binary_back(gateway, upstream, client):
    gw = await gateway(route(upstream.url("/echo")))
    async with client.ws_connect(gw.url(), compress=15) as ws:
        assert ws.compress == 13  # the window wsgate asked it to compress with
        await ws.send_bytes(b"\x01\x02" * 5000)
        reply = await ws.receive(timeout=10)
        assert reply.data == b"\x01\x02" * 5000


# -- each hop off by policy ----------------------------------------------------------------------------------


async def test_compression_off_for_clients_leaves_the_upstream_hop_compressed(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo"), "        compression: {client: false}"))
    raw, response = await RawClient.connect(gw.port, headers=OFFER)
    assert "sec-websocket-extensions" not in response.headers
    raw.writer.write(client_frame(0x80 | TEXT, b"plain " * 100))
    b0, payload = await read_raw_frame(raw.reader)
    assert not b0 & RSV1 and payload == b"plain " * 100
    samples = await scrape(gw)
    assert (
        value(
            samples,
            "wsgate_compressed_messages_total",
            route="/echo",
            direction="client_to_upstream",
            hop="sent",
        )
        == 1
    )
    assert (
        value(
            samples,
            "wsgate_compressed_messages_total",
            route="/echo",
            direction="upstream_to_client",
            hop="received",
        )
        == 1
    )
    raw.close()


async def test_compression_off_upstream_is_not_offered_there(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo"), "        compression: {upstream: false}"))
    raw, response = await RawClient.connect(gw.port, headers=OFFER)
    assert response.headers["sec-websocket-extensions"].startswith("permessage-deflate")
    raw.writer.write(client_frame(0x80 | RSV1 | TEXT, compress(b"hello " * 50)))
    b0, _payload = await read_raw_frame(raw.reader)
    assert b0 & RSV1
    assert "Sec-WebSocket-Extensions" not in upstream.records[0].headers
    samples = await scrape(gw)
    assert (
        value(
            samples,
            "wsgate_compressed_messages_total",
            route="/echo",
            direction="client_to_upstream",
            hop="received",
        )
        == 1
    )
    assert (
        value(
            samples,
            "wsgate_compressed_messages_total",
            route="/echo",
            direction="client_to_upstream",
            hop="sent",
        )
        == 0
    )
    raw.close()


# -- rules, limits, broken streams ---------------------------------------------------------------------------


async def test_json_rules_read_the_inflated_message(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo"), "        messages: {client: {json: true}}"))
    raw, _ = await RawClient.connect(gw.port, headers=OFFER)
    raw.writer.write(client_frame(0x80 | RSV1 | TEXT, compress(b'{"ok": true}')))
    _b0, payload = await read_raw_frame(raw.reader)
    assert zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff") == b'{"ok": true}'
    raw.writer.write(client_frame(0x80 | RSV1 | TEXT, compress(b"{not json")))
    assert await close_code_of(raw) == 1007
    raw.close()


async def test_a_corrupt_deflate_stream_is_closed_1007(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo")))
    raw, _ = await RawClient.connect(gw.port, headers=OFFER)
    raw.writer.write(client_frame(0x80 | RSV1 | BINARY, b"\xff\xfe\xfd\xfc\xfb"))
    assert await close_code_of(raw) == 1007
    raw.close()


async def test_rsv1_on_a_hop_without_the_extension_is_closed_1002(gateway, upstream):
    gw = await gateway(route(upstream.url("/echo")))
    raw, response = await RawClient.connect(gw.port)  # no offer
    assert "sec-websocket-extensions" not in response.headers
    raw.writer.write(client_frame(0x80 | RSV1 | TEXT, compress(b"hello")))
    assert await close_code_of(raw) == 1002
    raw.close()


async def test_a_bomb_is_closed_1009_and_wsgate_barely_grows(upstream, wsgate_process, tmp_path):
    """64 MiB of zeros, about 64 KiB compressed, on a 1 MiB route: closed 1009 after at most 1 MiB was
    inflated; the wsgate process grows by less than 16 MiB."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0"}\nadmin: {address: "127.0.0.1:0"}\n'
        f"routes:\n  - path: /echo\n    upstream: {upstream.url('/silent')}\n    auth: none\n"
        "limits: {max_message_size: 1MiB, close_timeout: 2s}\n"
    )
    process = wsgate_process("serve", "-c", str(policy), "--log-format", "json")
    port = await process.listening_port()
    # one compressed session first, so that what a session costs anyway is in the baseline
    warm, _ = await RawClient.connect(port, headers=OFFER)
    warm.writer.write(client_frame(0x80 | RSV1 | TEXT, compress(b"warm up")))
    await asyncio.sleep(0.5)
    baseline = _rss_bytes(process.process.pid)
    bomb = compress(b"\x00" * (64 * MIB))
    assert len(bomb) < 128 * 1024
    raw, response = await RawClient.connect(port, headers=OFFER)
    assert response.status == 101
    raw.writer.write(client_frame(0x80 | RSV1 | BINARY, bomb))
    assert await close_code_of(raw) == 1009
    grown = _rss_bytes(process.process.pid) - baseline
    assert grown < 16 * MIB, f"wsgate grew {grown / MIB:.1f} MiB inflating a bomb"
    closed = await process.wait_for("session.close", code=1009)
    assert closed["initiator"] == "gateway"
    raw.close()
    warm.close()


# -- the upstream's answer ---------------------------------------------------------------------------------


async def _raw_upstream(extension: str | None) -> tuple[asyncio.Server, int]:
    """An upstream that answers the handshake with ``extension`` as its Sec-WebSocket-Extensions."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        key = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("sec-websocket-key")
        )
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        )
        extra = f"Sec-WebSocket-Extensions: {extension}\r\n".encode() if extension else b""
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extra + b"\r\n"
        )
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("extension", "policy"),
    [
        ("permessage-deflate; server_max_window_bits=10; x_unknown", ""),
        ("x-webkit-deflate-frame", ""),
        ("permessage-deflate", "        compression: {upstream: false}"),
    ],
    ids=["unknown-param", "other-extension", "not-offered"],
)
async def test_an_upstream_answer_the_offer_does_not_allow_is_a_502(gateway, extension, policy):
    server, port = await _raw_upstream(extension)
    try:
        gw = await gateway(route(f"ws://127.0.0.1:{port}/", policy))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await session.ws_connect(gw.url())
        assert caught.value.status == 502
    finally:
        server.close()


# -- a browser ----------------------------------------------------------------------------------------------


CHROMIUM = shutil.which("chromium")


async def test_chromium_negotiates_compression_through_wsgate_and_gets_its_echo(gateway, upstream):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    gw = await gateway(route(upstream.url("/echo")))
    script = """async (url) => {
        const ws = new WebSocket(url);
        await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
        const reply = new Promise((ok) => { ws.onmessage = (event) => ok(event.data); });
        ws.send("hello from the browser ".repeat(50));
        const data = await reply;
        const extensions = ws.extensions;
        ws.close();
        return {data, extensions};
    }"""
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            result = await page.evaluate(script, gw.url())
        finally:
            await browser.close()
    assert result["data"] == "hello from the browser " * 50
    assert result["extensions"].startswith("permessage-deflate")
    samples = await scrape(gw)
    assert (
        value(
            samples,
            "wsgate_compressed_messages_total",
            route="/echo",
            direction="client_to_upstream",
            hop="received",
        )
        == 1
    )
