"""The admin listener: /metrics moves as traffic, rejections and closes happen; /healthz, /readyz, /policy;
and none of it is reachable on the client listener."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from wsraw import TEXT, RawClient

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(gw, accept: str | None = None) -> Samples:
    headers = {"Accept": accept} if accept else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(admin_url(gw, "/metrics"), headers=headers) as response,
    ):
        assert response.status == 200
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def admin_url(gw, path: str) -> str:
    address = gw.gateway.admin_address
    return f"http://127.0.0.1:{address.port}{path}"


def route(upstream, extra: str = "", limits: str = "") -> str:
    return f"""
    limits: {{close_timeout: 1s{limits}}}
    routes:
      - path: /echo
        match: prefix
        upstream: {upstream.url("/")}
        auth: none
{extra}"""


async def test_session_metrics_move_with_traffic_and_closes(gateway, upstream, client):
    gw = await gateway(route(upstream))
    before = await scrape(gw)
    assert value(before, "wsgate_connections_active", route="/echo") == 0
    assert value(before, "wsgate_connections_total", route="/echo") == 0
    async with client.ws_connect(gw.url("/echo/echo")) as ws:
        for payload in ("one", "two", "three"):
            await ws.send_str(payload)
            await ws.receive(timeout=5)
        await ws.send_bytes(b"\x00" * 1000)
        await ws.receive(timeout=5)
        live = await scrape(gw)
        assert value(live, "wsgate_connections_active", route="/echo") == 1
        assert value(live, "wsgate_connections_total", route="/echo") == 1
        # live sessions' counts are visible before they end
        assert value(live, "wsgate_messages_total", route="/echo", direction="client_to_upstream") == 4
        assert value(live, "wsgate_messages_total", route="/echo", direction="upstream_to_client") == 4
        assert value(live, "wsgate_bytes_total", route="/echo", direction="client_to_upstream") == 1011
        await ws.send_str("close:4000")
        await ws.receive(timeout=5)
    deadline = time.monotonic() + 3
    while len(gw.gateway.sessions) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    after = await scrape(gw)
    assert value(after, "wsgate_connections_active", route="/echo") == 0
    assert value(after, "wsgate_messages_total", route="/echo", direction="client_to_upstream") == 5
    assert value(after, "wsgate_messages_total", route="/echo", direction="upstream_to_client") == 4
    assert value(after, "wsgate_closes_total", route="/echo", code="4000", initiator="upstream") == 1
    assert value(after, "wsgate_session_duration_seconds_count", route="/echo") == 1
    assert value(after, "wsgate_handshake_duration_seconds_count", route="/echo") == 1
    assert value(after, "wsgate_upstream_connect_duration_seconds_count", route="/echo") == 1
    assert value(after, "wsgate_handshake_duration_seconds_bucket", route="/echo", le="+Inf") == 1


async def test_rejections_are_counted_by_route_and_reason(gateway, upstream, client):
    gw = await gateway(
        f"""
    trusted_proxies: [127.0.0.1/32]
    firewall: {{default: allow, rules: [{{deny: 192.0.2.0/24}}]}}
    limits: {{handshakes_per_ip: 1/m, handshake_burst: 1}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
      - path: /down
        upstream: ws://127.0.0.1:9/
        auth: none
    """
    )
    await RawClient.connect(gw.port, "/nowhere")
    await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": "192.0.2.1"})
    await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": "10.0.0.1"})
    await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": "10.0.0.1"})
    await RawClient.connect(gw.port, "/down", {"X-Forwarded-For": "10.0.0.2"})
    async with client.get(gw.http("/echo"), headers={"X-Forwarded-For": "10.0.0.3"}) as response:
        assert response.status == 426
    samples = await scrape(gw)
    rejections = "wsgate_handshake_rejections_total"
    assert value(samples, rejections, route="", reason="no_route") == 1
    assert value(samples, rejections, route="/echo", reason="firewall") == 1
    assert value(samples, rejections, route="/echo", reason="rate_limited") == 1
    assert value(samples, rejections, route="/echo", reason="bad_request") == 1
    assert value(samples, rejections, route="/down", reason="upstream_unavailable") == 1
    assert value(samples, "wsgate_connections_total", route="/echo") == 1


async def test_message_violations_counted_closed_and_dropped(gateway, upstream, client):
    extra = "        messages: {client: {json: true, on_violation: drop}}"
    gw = await gateway(route(upstream, extra))
    ws, _ = await RawClient.connect(gw.port, "/echo/echo")
    ws.send_frame(TEXT, b"not json")
    ws.send_frame(TEXT, b"{}")
    assert await ws.recv_message() == (TEXT, b"{}")
    live = await scrape(gw)
    assert value(live, "wsgate_message_violations_total", route="/echo", rule="json") == 1
    ws.send_frame(TEXT, b"\xff")  # invalid UTF-8 is dropped too on this route
    ws.send_frame(TEXT, b"[]")
    assert await ws.recv_message() == (TEXT, b"[]")
    ws.send_close(1000)
    await ws.recv_close()
    await asyncio.sleep(0.1)
    after = await scrape(gw)
    assert value(after, "wsgate_message_violations_total", route="/echo", rule="json") == 1
    assert value(after, "wsgate_message_violations_total", route="/echo", rule="utf8") == 1


async def test_oversized_message_counts_as_a_size_violation(gateway, upstream):
    gw = await gateway(route(upstream, limits=", max_message_size: 10B"))
    ws, _ = await RawClient.connect(gw.port, "/echo/echo")
    ws.send_frame(TEXT, b"x" * 11)
    assert (await ws.recv_close()).close_code == 1009
    ws.send_close(1009)
    await asyncio.sleep(0.2)
    samples = await scrape(gw)
    assert value(samples, "wsgate_message_violations_total", route="/echo", rule="size") == 1
    assert value(samples, "wsgate_closes_total", route="/echo", code="1009", initiator="gateway") == 1


async def test_openmetrics_when_asked(gateway, upstream):
    gw = await gateway(route(upstream))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            admin_url(gw, "/metrics"), headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        ) as response,
    ):
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        body = await response.text()
    assert body.rstrip().endswith("# EOF")
    assert "wsgate_connections_active" in body


async def test_policy_info_process_metrics_and_no_high_cardinality_labels(gateway, upstream, client):
    gw = await gateway(route(upstream))
    async with client.ws_connect(gw.url("/echo/echo")) as ws:
        await ws.send_str("x")
        await ws.receive(timeout=5)
        async with client.get(admin_url(gw, "/metrics")) as response:
            body = await response.text()
    samples = await scrape(gw)
    policy = gw.gateway.policy
    assert value(samples, "wsgate_policy_info", version="1", hash=policy.sha256[:12]) == 1
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "wsgate_policy_reloads_total", result="error") == 0
    # no client IPs (nor users, nor tokens) in labels; an upstream endpoint is named by its URL, which
    # here holds the same loopback address as the client's
    labels = [line for line in body.splitlines() if 'endpoint="' not in line]
    assert "127.0.0.1" not in "\n".join(labels)
    request_id = gw.gateway  # no request ids either
    assert request_id is not None and "request_id" not in body


async def test_health_ready_and_policy_endpoints(gateway, upstream, client, monkeypatch):
    monkeypatch.setenv("WSGATE_TEST_SECRET", "super-secret-value-that-must-not-leak-0123456789")
    gw = await gateway(
        f"""
    auth:
      main: {{algorithms: [HS256], secret_env: WSGATE_TEST_SECRET}}
    limits: {{drain_timeout: 5s, close_timeout: 5s}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    async with client.get(admin_url(gw, "/healthz")) as response:
        assert (response.status, (await response.json())["status"]) == (200, "ok")
    async with client.get(admin_url(gw, "/readyz")) as response:
        assert (response.status, (await response.json())["status"]) == (200, "ready")
    async with client.get(admin_url(gw, "/policy")) as response:
        assert response.status == 200
        text = await response.text()
        info = await response.json()
    assert info["sha256"] == gw.gateway.policy.sha256
    assert info["version"] == 1
    assert info["routes"] == ["/echo"]
    assert "super-secret-value" not in text and "WSGATE_TEST_SECRET" not in text
    # draining: a session that never answers the close keeps the gateway draining
    raw, _ = await RawClient.connect(gw.port, "/echo")
    stopping = asyncio.create_task(gw.gateway.stop())
    await raw.recv_close()
    async with client.get(admin_url(gw, "/readyz")) as response:
        assert (response.status, (await response.json())["status"]) == (503, "draining")
    samples = await scrape(gw)
    assert value(samples, "wsgate_draining") == 1
    raw.send_close(1001)
    await asyncio.wait_for(stopping, 5)


async def test_admin_paths_are_not_served_on_the_client_listener(gateway, upstream, client):
    gw = await gateway(route(upstream))
    for path in ("/metrics", "/healthz", "/readyz", "/policy"):
        async with client.get(gw.http(path)) as response:
            assert response.status == 404, path
            assert (await response.json())["error"] == "no_route"


async def test_jwks_refreshes_are_counted(gateway, upstream):
    hits = {"n": 0}

    async def jwks(request: web.Request) -> web.Response:
        hits["n"] += 1
        if hits["n"] > 1:
            return web.Response(status=500)
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        gw = await gateway(
            f"""
        auth:
          idp: {{algorithms: [RS256], jwks_url: "http://127.0.0.1:{port}/jwks", jwks_min_refresh: 0s}}
        routes:
          - path: /echo
            upstream: {upstream.url()}
            auth: idp
        """
        )
        token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhIn0.c2ln"  # unknown kid k1
        for _ in range(2):
            _, response = await RawClient.connect(gw.port, "/echo", {"Authorization": f"Bearer {token}"})
            assert response.status == 401
        samples = await scrape(gw)
        assert value(samples, "wsgate_jwks_refresh_total", provider="idp", result="success") >= 1
        assert value(samples, "wsgate_jwks_refresh_total", provider="idp", result="error") >= 1
    finally:
        await runner.cleanup()


async def test_jwks_is_fetched_at_start_before_any_handshake(gateway, upstream):
    hits = {"n": 0}

    async def jwks(request: web.Request) -> web.Response:
        hits["n"] += 1
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        gw = await gateway(
            f"""
        auth:
          idp: {{algorithms: [RS256], jwks_url: "http://127.0.0.1:{port}/jwks"}}
        routes:
          - path: /echo
            upstream: {upstream.url()}
            auth: idp
        """
        )
        deadline = time.monotonic() + 3
        while hits["n"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert hits["n"] == 1
        samples = await scrape(gw)
        assert value(samples, "wsgate_jwks_refresh_total", provider="idp", result="success") == 1
    finally:
        await runner.cleanup()


async def test_an_admin_slowloris_is_capped_and_cut_and_clients_are_still_served(
    gateway, upstream, log_events, monkeypatch
):
    """Connections trickling request headers to the admin listener: at most ADMIN_MAX_CONNECTIONS are
    held, each for at most ADMIN_CONNECTION_SECONDS (1 s here), and WebSocket clients and scrapes are
    served meanwhile."""
    import socket

    from proxy import admin_listener as admin

    monkeypatch.setattr(admin, "ADMIN_CONNECTION_SECONDS", 1.0)
    gw = await gateway(f"routes:\n  - {{path: /echo, upstream: '{upstream.url()}', auth: none}}\n")
    port = gw.gateway.admin_address.port
    loop = asyncio.get_running_loop()
    trickling = []
    for _ in range(admin.ADMIN_MAX_CONNECTIONS + 20):
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        trickling.append(sock)
    try:
        await log_events.wait_for("admin.connections_full", timeout=3.0)
        assert len(log_events.named("admin.connections_full")) == 1  # once per episode

        async def closed(sock: socket.socket) -> bool:
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 1), 3.0) == b""
            except ConnectionError:  # cut with a reset
                return True
            except TimeoutError:  # still held
                return False

        # beyond the cap at once, the rest within their lifetime (and the sweep's period)
        started = time.monotonic()
        assert all(await asyncio.gather(*(closed(sock) for sock in trickling)))
        assert time.monotonic() - started < 1.0 + 1.0
        ws, _ = await RawClient.connect(gw.port, "/echo")
        ws.send_frame(TEXT, b"still served")
        assert await ws.recv_message() == (TEXT, b"still served")
        samples = await scrape(gw)
        assert samples
    finally:
        for sock in trickling:
            sock.close()
