"""Every handshake failure is an HTTP answer with a status, a JSON body naming the error, and a request id."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import free_port
from wsraw import RawClient


def body(response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    decoded = json.loads(response.body)
    assert len(decoded["request_id"]) >= 8
    assert response.headers["x-request-id"] == decoded["request_id"]
    return decoded


def route(upstream_url: str, limits: str = "") -> str:
    return f"""
    limits: {{upstream_connect_timeout: 500ms, handshake_timeout: 500ms, max_header_bytes: 4KiB{limits}}}
    routes:
      - path: /echo
        upstream: {upstream_url}
        auth: none
    """


async def test_no_route_is_404(gateway, upstream, log_events):
    gw = await gateway(route(upstream.url()))
    _, response = await RawClient.connect(gw.port, "/elsewhere")
    assert response.status == 404
    assert body(response)["error"] == "no_route"
    rejected = await log_events.wait_for("handshake.rejected")
    assert (rejected["status"], rejected["reason"], rejected["path"]) == (404, "no_route", "/elsewhere")


async def test_plain_http_request_to_a_route_is_426(gateway, upstream, client):
    gw = await gateway(route(upstream.url()))
    async with client.get(gw.http("/echo")) as response:
        assert response.status == 426
        assert response.headers["Upgrade"].lower() == "websocket"
        assert (await response.json())["error"] == "bad_request"


@pytest.mark.parametrize(
    ("headers", "expected_status"),
    [
        ({"Sec-WebSocket-Key": "not-base64-of-16-bytes"}, 400),
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Sec-WebSocket-Key": ""}, 400),
    ],
)
async def test_malformed_upgrade_is_refused(gateway, upstream, headers, expected_status):
    gw = await gateway(route(upstream.url()))
    _, response = await RawClient.connect(gw.port, "/echo", headers)
    assert response.status == expected_status
    assert body(response)["error"] == "bad_request"
    assert upstream.records == []  # nothing reached the upstream


async def test_post_upgrade_is_refused(gateway, upstream):
    gw = await gateway(route(upstream.url()))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status_line = await reader.readline()
    assert int(status_line.split()[1]) in (400, 405, 426)
    writer.close()


async def test_garbage_instead_of_http_is_400_and_harms_nobody(gateway, upstream, client):
    gw = await gateway(route(upstream.url()))
    async with client.ws_connect(gw.url()) as healthy:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n")
        status_line = await reader.readline()
        assert b"400" in status_line
        writer.close()
        await healthy.send_str("still here")
        assert (await healthy.receive(timeout=5)).data == "still here"


async def test_oversized_request_headers_are_431(gateway, upstream):
    """4 KiB limit: an 8 KB cookie in one read is refused."""
    gw = await gateway(route(upstream.url()))
    _, response = await RawClient.connect(gw.port, "/echo", {"Cookie": "a=" + "x" * 8000})
    assert response.status == 431
    assert body(response)["error"] == "bad_request"
    assert upstream.records == []


async def test_oversized_request_headers_trickled_in_are_431(gateway, upstream):
    """The same limit when the headers arrive in many small reads."""
    gw = await gateway(route(upstream.url()))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
    for index in range(40):
        writer.write(f"X-Filler-{index}: {'y' * 200}\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.005)
    status_line = await asyncio.wait_for(reader.readline(), 3)
    assert b"431" in status_line
    writer.close()


async def test_slow_handshake_is_408(gateway, upstream):
    gw = await gateway(route(upstream.url()))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    started = time.monotonic()
    status_line = await asyncio.wait_for(reader.readline(), 3)
    assert b"408" in status_line
    assert 0.4 < time.monotonic() - started < 2
    assert await asyncio.wait_for(reader.read(), 3) is not None
    writer.close()


async def test_idle_tcp_connection_without_a_byte_is_closed(gateway, upstream):
    gw = await gateway(route(upstream.url()))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    data = await asyncio.wait_for(reader.read(), 3)  # gateway closes the socket after handshake_timeout
    assert data == b"" or b"408" in data
    writer.close()


async def test_upstream_refusing_connections_is_502(gateway, upstream, log_events):
    gw = await gateway(route(f"ws://127.0.0.1:{free_port()}/"))
    _, response = await RawClient.connect(gw.port, "/echo")
    assert response.status == 502
    decoded = body(response)
    assert decoded["error"] == "upstream_unavailable"
    assert "refused" in decoded["detail"]
    rejected = await log_events.wait_for("handshake.rejected")
    assert rejected["status"] == 502


async def test_upstream_accepting_but_never_answering_is_502_after_the_connect_timeout(gateway, upstream):
    held: list[asyncio.StreamWriter] = []

    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await gateway(route(f"ws://127.0.0.1:{port}/"))
    started = time.monotonic()
    _, response = await RawClient.connect(gw.port, "/echo")
    elapsed = time.monotonic() - started
    assert response.status == 502
    assert "within 0.5s" in body(response)["detail"]
    assert 0.4 < elapsed < 2
    for writer in held:
        writer.close()
    server.close()


async def test_upstream_answering_http_instead_of_websocket_is_502(gateway, upstream):
    async def not_websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_websocket, "127.0.0.1", 0)
    gw = await gateway(route(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"))
    _, response = await RawClient.connect(gw.port, "/echo")
    assert response.status == 502
    assert "200" in body(response)["detail"]
    server.close()


async def test_a_request_announcing_a_body_it_never_sends_is_400_at_once(gateway, upstream):
    gw = await gateway(route(upstream.url()))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")  # and no body
    started = time.monotonic()
    status_line = await asyncio.wait_for(reader.readline(), 3)
    assert b"400" in status_line
    assert time.monotonic() - started < 0.3  # not held until handshake_timeout (500ms) for a 408
    writer.close()


@pytest.mark.parametrize("trickled", [False, True], ids=["one-read", "trickled"])
async def test_the_header_limit_counts_the_bytes_sent_however_they_arrive(gateway, upstream, trickled):
    """4 KiB limit: a request whose header values are short but padded with 5000 spaces is refused in one
    read as in many (the spaces h11 strips still arrived)."""
    gw = await gateway(route(upstream.url()))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    request = b"GET /echo HTTP/1.1\r\nHost:" + b" " * 5000 + b"x\r\n\r\n"
    for start in range(0, len(request), 500 if trickled else len(request)):
        writer.write(request[start : start + (500 if trickled else len(request))])
        await writer.drain()
        await asyncio.sleep(0.005 if trickled else 0)
    status_line = await asyncio.wait_for(reader.readline(), 3)
    assert b"431" in status_line
    writer.close()


async def test_a_request_caught_by_the_stop_is_503_draining_logged_with_retry_after(
    gateway, upstream, log_events
):
    gw = await gateway(route(upstream.url()))  # handshake_timeout 500ms: the stop comes first
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /echo HTTP/1.1\r\n")  # the rest never comes
    while gw.gateway.connection_count == 0:
        await asyncio.sleep(0.01)
    stopping = asyncio.get_running_loop().create_task(gw.gateway.stop())
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 1\r\n" in answer and b'"error":"draining"' in answer
    rejected = await log_events.wait_for("handshake.rejected", reason="draining")
    assert rejected["status"] == 503
    await stopping
    writer.close()
