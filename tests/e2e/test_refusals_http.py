"""Every refusal the gateway writes is one well-formed HTTP/1.1 response, as a strict client parser (h11)
reads it: one ``Connection`` header, a ``Content-Length`` that is the body's length, and the JSON body."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import pytest
from conftest import free_port

SECRET = "s" * 32


def upgrade(path: str = "/echo", extra: str = "", version: str = "13") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: gateway.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n"
    ).encode()


async def answer(
    port: int, request: bytes, before_reading: Callable[[], Awaitable[None]] | None = None
) -> bytes:
    """Everything the gateway sends on one connection until it closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    if before_reading is not None:
        await before_reading()
    data = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    return data


async def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


@dataclass
class Case:
    status: int
    error: str
    #: YAML lines under ``limits`` and the route's own lines.
    limits: str = ""
    route: str = ""
    #: (gateway, port) -> the raw answer, for refusals one request alone does not provoke
    provoke: Callable[..., Awaitable[bytes]] | None = None
    request: bytes = b""
    upstream_url: str | None = None


async def rate_limited(gw, port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade())
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    writer.close()
    return await answer(port, upgrade())


async def draining(gw, port):
    async def stop() -> None:
        await wait_until(lambda: gw.connection_count == 1)
        asyncio.get_running_loop().create_task(gw.stop())

    return await answer(port, b"GET /echo HTTP/1.1\r\n", stop)


async def overloaded(gw, port):
    _, idle = await asyncio.open_connection("127.0.0.1", port)
    await wait_until(lambda: gw.connection_count == 1)
    try:
        return await answer(port, upgrade())
    finally:
        idle.close()


async def timed_out(gw, port):
    return await answer(port, b"GET /echo HTTP/1.1\r\nHost: x\r\n")


CASES = {
    "400-malformed": Case(400, "bad_request", request=b"GET /echo HTTP/1.1\r\nno colon here\r\n\r\n"),
    "400-body": Case(400, "bad_request", request=upgrade(extra="Content-Length: 5\r\n") + b"hello"),
    "404": Case(404, "no_route", request=upgrade("/nowhere")),
    "408": Case(408, "bad_request", provoke=timed_out),
    "426-plain-get": Case(426, "bad_request", request=b"GET /echo HTTP/1.1\r\nHost: gateway.test\r\n\r\n"),
    "426-version": Case(426, "bad_request", request=upgrade(version="8")),
    "431": Case(431, "bad_request", request=upgrade(extra=f"Cookie: {'c' * 5000}\r\n")),
    "401": Case(401, "auth_missing", route="auth: main", request=upgrade()),
    "403": Case(
        403, "firewall", route="auth: none\n        firewall: {rules: [deny: 127.0.0.0/8]}", request=upgrade()
    ),
    "429": Case(429, "rate_limited", limits=", handshakes_per_ip: 1/m", provoke=rate_limited),
    "502": Case(502, "upstream_unavailable", request=upgrade(), upstream_url="closed"),
    "503-draining": Case(503, "draining", provoke=draining),
    "503-overloaded": Case(503, "overloaded", limits=", max_connections: 1", provoke=overloaded),
}


@pytest.mark.parametrize("name", CASES)
async def test_every_refusal_is_one_well_formed_response(name, gateway, upstream, monkeypatch):
    case = CASES[name]
    monkeypatch.setenv("WSGATE_TEST_SECRET", SECRET)
    upstream_url = upstream.url() if case.upstream_url is None else f"ws://127.0.0.1:{free_port()}/"
    gw = await gateway(
        f"""
    limits: {{handshake_timeout: 300ms, max_header_bytes: 4KiB{case.limits}}}
    auth:
      main: {{algorithms: [HS256], secret_env: WSGATE_TEST_SECRET}}
    routes:
      - path: /echo
        upstream: {upstream_url}
        {case.route or "auth: none"}
    """
    )
    if case.provoke is not None:
        raw = await case.provoke(gw.gateway, gw.port)
    else:
        raw = await answer(gw.port, case.request)

    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/echo", headers=[("Host", "gateway.test")]))
    client.receive_data(raw)
    client.receive_data(b"")
    events = []
    while type(event := client.next_event()) is not h11.ConnectionClosed:
        assert event is not h11.NEED_DATA, f"incomplete response: {raw!r}"
        events.append(event)
    response, *data, end = events
    assert isinstance(response, h11.Response) and isinstance(end, h11.EndOfMessage)
    assert response.status_code == case.status
    headers = [(name.decode(), value.decode()) for name, value in response.headers]
    connection = [value for name, value in headers if name == "connection"]
    assert len(connection) == 1, headers
    assert connection[0].split(",")[-1].strip() == "close"
    body = b"".join(bytes(chunk.data) for chunk in data)
    assert [value for name, value in headers if name == "content-length"] == [str(len(body))]
    decoded = json.loads(body)
    assert decoded["error"] == case.error
    assert dict(headers)["x-request-id"] == decoded["request_id"]
    if case.status == 426 and name == "426-plain-get":
        assert dict(headers)["upgrade"] == "websocket"
        assert connection == ["Upgrade, close"]
    if case.status in (429, 503):
        assert int(dict(headers)["retry-after"]) >= 1
    if case.status == 401:
        assert dict(headers)["www-authenticate"].startswith("Bearer")


async def test_the_101_has_one_connection_header(gateway, upstream):
    gw = await gateway(f"routes:\n  - path: /echo\n    upstream: {upstream.url()}\n    auth: none\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(upgrade())
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(
            method="GET",
            target="/echo",
            headers=[("Host", "gateway.test"), ("Upgrade", "websocket"), ("Connection", "Upgrade")],
        )
    )
    client.receive_data(head)
    response = client.next_event()
    assert isinstance(response, h11.InformationalResponse) and response.status_code == 101
    assert [value for name, value in response.headers if name == b"connection"] == [b"Upgrade"]
