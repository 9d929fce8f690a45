"""``limits.max_connections``: client connections, pending handshakes and live sessions counted together;
a client above it gets 503 ``overloaded`` with ``Retry-After``, counted and logged like every refusal."""

from __future__ import annotations

import asyncio
import json
import re
import time

from wsraw import RawClient


def route(upstream_url: str, limits: str) -> str:
    return f"""
    limits: {{{limits}}}
    routes:
      - path: /echo
        upstream: {upstream_url}
        auth: none
    """


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def overload_rejections(client, gw) -> float:
    admin = gw.gateway.admin_address
    async with client.get(f"http://127.0.0.1:{admin.port}/metrics") as response:
        text = await response.text()
    metric = r'^wsgate_handshake_rejections_total\{reason="overloaded",route=""\} (\S+)$'
    found = re.search(metric, text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_sessions_and_pending_handshakes_count_together(gateway, upstream, client, log_events):
    gw = await gateway(route(upstream.url(), "max_connections: 3, handshake_timeout: 30s"))
    async with client.ws_connect(gw.url()) as session:
        idle = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]  # send nothing
        await wait_until(lambda: gw.gateway.connection_count == 3)
        refused, response = await RawClient.connect(gw.port, "/echo")
        assert response.status == 503
        assert response.headers["retry-after"] == "1"
        decoded = json.loads(response.body)
        assert decoded["error"] == "overloaded"
        assert response.headers["x-request-id"] == decoded["request_id"]
        refused.close()
        rejected = await log_events.wait_for("handshake.rejected", reason="overloaded")
        assert (rejected["status"], rejected["level"], rejected["client_ip"]) == (503, "warning", "127.0.0.1")
        assert await overload_rejections(client, gw) == 1
        await session.send_str("the live session is untouched")
        assert (await session.receive(timeout=5)).data == "the live session is untouched"
        _, first_idle = idle.pop()
        first_idle.close()
        await wait_until(lambda: gw.gateway.connection_count == 2)
        async with client.ws_connect(gw.url()) as second:  # a slot is free again
            await second.send_str("admitted")
            assert (await second.receive(timeout=5)).data == "admitted"
        for _, writer in idle:
            writer.close()
    await wait_until(lambda: gw.gateway.connection_count == 0)
    assert len(log_events.named("handshake.rejected")) == 1


async def test_the_default_is_ten_thousand(gateway, upstream):
    gw = await gateway(route(upstream.url(), ""))
    assert gw.gateway.policy.limits.max_connections == 10_000
