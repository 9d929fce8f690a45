"""Handshake guards that do not need a token: firewall, client IP through trusted proxies, PROXY protocol,
Origin, handshake rate and connection caps. Every refusal happens before anything reaches the upstream."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from wsraw import RawClient


async def status_for(gw, ip: str) -> int:
    """The status a handshake gets when a trusted proxy says it comes from ``ip``."""
    _, response = await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": ip})
    return response.status


def reason_of(response) -> str:
    return json.loads(response.body)["error"]


async def test_firewall_first_match_wins_then_default(gateway, upstream, log_events):
    gw = await gateway(
        f"""
    trusted_proxies: [127.0.0.1/32]
    firewall:
      default: deny
      rules:
        - deny: 10.1.0.0/16
        - allow: [10.0.0.0/8, "2001:db8::/32"]
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )

    assert await status_for(gw, "10.2.3.4") == 101
    assert await status_for(gw, "2001:db8::1") == 101
    assert await status_for(gw, "10.1.2.3") == 403  # the deny rule comes first
    assert await status_for(gw, "192.0.2.1") == 403  # no rule: default deny
    assert await status_for(gw, "2001:db9::1") == 403
    rejected = await log_events.wait_for("handshake.rejected", client_ip="10.1.2.3")
    assert (rejected["status"], rejected["reason"]) == (403, "firewall")
    assert len(upstream.records) == 2


async def test_route_firewall_applies_after_the_policy_firewall(gateway, upstream):
    gw = await gateway(
        f"""
    trusted_proxies: [127.0.0.1/32]
    routes:
      - path: /admin
        upstream: {upstream.url()}
        auth: none
        firewall: {{default: deny, rules: [{{allow: 10.9.0.0/16}}]}}
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    _, response = await RawClient.connect(gw.port, "/admin", {"X-Forwarded-For": "10.8.0.1"})
    assert (response.status, reason_of(response)) == (403, "firewall")
    _, response = await RawClient.connect(gw.port, "/admin", {"X-Forwarded-For": "10.9.0.1"})
    assert response.status == 101
    _, response = await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": "10.8.0.1"})
    assert response.status == 101


async def test_firewall_is_decided_before_the_token_is_looked_at(gateway, upstream, log_events, monkeypatch):
    monkeypatch.setenv("WSGATE_TEST_SECRET", "s" * 40)
    gw = await gateway(
        f"""
    firewall: {{default: deny, rules: []}}
    auth:
      main: {{algorithms: [HS256], secret_env: WSGATE_TEST_SECRET}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: main
    """
    )
    _, response = await RawClient.connect(gw.port, "/echo", {"Authorization": "Bearer not.a.token"})
    assert (response.status, reason_of(response)) == (403, "firewall")  # not 401


async def test_spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored(gateway, upstream, log_events):
    gw = await gateway(
        f"""
    firewall: {{default: allow, rules: [{{deny: 127.0.0.0/8}}]}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    # the peer (127.0.0.1) is not a trusted proxy: claiming another address changes nothing
    _, response = await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": "8.8.8.8"})
    assert (response.status, reason_of(response)) == (403, "firewall")
    rejected = await log_events.wait_for("handshake.rejected")
    assert rejected["client_ip"] == "127.0.0.1"


async def test_x_forwarded_for_read_right_to_left_skipping_trusted_hops(gateway, upstream):
    gw = await gateway(
        f"""
    trusted_proxies: [127.0.0.1/32, 10.0.0.0/8]
    firewall: {{default: allow, rules: [{{deny: 203.0.113.7/32}}]}}
    routes:
      - path: /echo
        upstream: {upstream.url("/headers")}
        auth: none
    """
    )
    # client -> 10.0.0.5 (trusted LB) -> 127.0.0.1 (trusted) -> gateway; the left part is client-controlled
    chain = "6.6.6.6, 203.0.113.7, 10.0.0.5"
    _, response = await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": chain})
    assert (response.status, reason_of(response)) == (403, "firewall")  # 203.0.113.7 is the client
    chain = "203.0.113.7, 198.51.100.2, 10.0.0.5"  # the spoofed entry sits left of the real client
    ws, response = await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": chain})
    assert response.status == 101
    _, message = await ws.recv_message()
    forwarded = {name.lower(): value for name, value in json.loads(message)["headers"].items()}
    assert forwarded["x-forwarded-for"].endswith("198.51.100.2, 10.0.0.5, 127.0.0.1")
    ws.abort()


@pytest.mark.parametrize(
    ("header", "expected_ip"),
    [
        (b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 8080\r\n", "198.51.100.9"),
        (
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
            + bytes([192, 0, 2, 44, 127, 0, 0, 1])
            + b"\x9c\x40\x1f\x90",
            "192.0.2.44",
        ),
    ],
    ids=["v1", "v2"],
)
async def test_proxy_protocol_sets_the_client_ip(upstream, gateway, log_events, header, expected_ip):
    gw = await gateway(
        f"""
    listen: {{address: "127.0.0.1:0", proxy_protocol: true}}
    firewall: {{default: allow, rules: [{{deny: 192.0.2.0/24}}]}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    _, response = await RawClient.connect(gw.port, "/echo", prefix=header)
    if expected_ip.startswith("192.0.2."):
        assert (response.status, reason_of(response)) == (403, "firewall")
        rejected = await log_events.wait_for("handshake.rejected")
        assert rejected["client_ip"] == expected_ip
    else:
        assert response.status == 101
        opened = await log_events.wait_for("session.open")
        assert opened["client_ip"] == expected_ip


async def test_proxy_protocol_listener_refuses_a_connection_without_the_header(upstream, gateway):
    gw = await gateway(
        f"""
    listen: {{address: "127.0.0.1:0", proxy_protocol: true}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    _, response = await RawClient.connect(gw.port, "/echo")
    assert response.status == 400
    assert upstream.records == []


ORIGIN_ROUTES = """
    routes:
      - path: /browser
        upstream: {url}
        auth: none
        origins: ["https://app.example.com", "https://*.example.org"]
        allow_missing_origin: false
      - path: /mixed
        upstream: {url}
        auth: none
        origins: ["https://app.example.com"]
"""


@pytest.mark.parametrize(
    ("path", "origin", "expected"),
    [
        ("/browser", "https://app.example.com", 101),
        ("/browser", "https://chat.example.org", 101),
        ("/browser", "https://evil.com", 403),  # cross-site WebSocket hijacking
        ("/browser", "https://example.org.evil.com", 403),
        ("/browser", "https://evilexample.org", 403),
        ("/browser", "http://app.example.com", 403),  # scheme matters
        ("/browser", "null", 403),
        ("/browser", None, 403),  # allow_missing_origin: false
        ("/mixed", None, 101),  # non-browser clients allowed on this route
        ("/mixed", "https://evil.com", 403),
    ],
)
async def test_origin_allowlist(gateway, upstream, path, origin, expected):
    gw = await gateway(ORIGIN_ROUTES.format(url=upstream.url()))
    _, response = await RawClient.connect(gw.port, path, {"Origin": origin} if origin else {})
    assert response.status == expected
    if expected == 403:
        assert reason_of(response) == "origin"


async def test_handshake_flood_gets_429_with_retry_after_after_the_burst(gateway, upstream, log_events):
    gw = await gateway(
        f"""
    limits: {{handshakes_per_ip: 2/s, handshake_burst: 5}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    statuses, retry_after = [], None
    for _ in range(12):
        client, response = await RawClient.connect(gw.port, "/echo")
        statuses.append(response.status)
        if response.status == 429:
            retry_after = retry_after or response.headers.get("retry-after")
            assert reason_of(response) == "rate_limited"
        client.abort()
    assert statuses[:5] == [101] * 5
    assert statuses[5:].count(429) >= 6
    assert retry_after is not None and 1 <= int(retry_after) <= 2
    # the limiter refills: after half a second one more is allowed
    await asyncio.sleep(0.6)
    _, response = await RawClient.connect(gw.port, "/echo")
    assert response.status == 101
    assert len(log_events.named("handshake.rejected")) >= 6


async def test_handshake_rate_is_per_client_ip(gateway, upstream):
    gw = await gateway(
        f"""
    trusted_proxies: [127.0.0.1/32]
    limits: {{handshakes_per_ip: 1/m, handshake_burst: 1}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        _, response = await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": ip})
        assert response.status == 101
    _, response = await RawClient.connect(gw.port, "/echo", {"X-Forwarded-For": "10.0.0.1"})
    assert response.status == 429


async def test_connections_per_ip_cap_is_429_and_frees_on_close(gateway, upstream, client):
    gw = await gateway(
        f"""
    limits: {{connections_per_ip: 2}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    first = await client.ws_connect(gw.url())
    second = await client.ws_connect(gw.url())
    _, response = await RawClient.connect(gw.port, "/echo")
    assert (response.status, reason_of(response)) == (429, "conn_limit")
    await first.close()
    deadline = time.monotonic() + 3
    while True:
        _, response = await RawClient.connect(gw.port, "/echo")
        if response.status == 101 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert response.status == 101
    await second.close()


async def test_refused_handshakes_do_not_disturb_live_sessions(gateway, upstream, client):
    gw = await gateway(
        f"""
    limits: {{handshakes_per_ip: 1/s, handshake_burst: 1}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    async with client.ws_connect(gw.url()) as ws:
        for _ in range(20):
            _, response = await RawClient.connect(gw.port, "/echo")
            assert response.status == 429
        await ws.send_str("still fine")
        assert (await ws.receive(timeout=5)).data == "still fine"


async def test_proxy_header_sent_in_its_own_packet(upstream, gateway, log_events):
    """Balancers often send the PROXY header alone, right after connecting, before the client's bytes."""
    gw = await gateway(
        f"""
    listen: {{address: "127.0.0.1:0", proxy_protocol: true}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"PROXY TCP4 198.51.100.77 127.0.0.1 40000 8080\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert b" 101 " in status_line
    opened = await log_events.wait_for("session.open")
    assert opened["client_ip"] == "198.51.100.77"
    writer.close()


@pytest.mark.parametrize(("prefix", "same_64_refused"), [(None, True), (128, False)])
async def test_ipv6_clients_are_limited_per_prefix(gateway, upstream, prefix, same_64_refused):
    """By default one /64 is one client for the per-IP limits; ipv6_prefix: 128 counts each address."""
    setting = f", ipv6_prefix: {prefix}" if prefix else ""
    gw = await gateway(
        f"""
    trusted_proxies: [127.0.0.1/32]
    limits: {{handshakes_per_ip: 1/m, handshake_burst: 1{setting}}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )

    assert await status_for(gw, "2001:db8:1:2::1") == 101
    assert await status_for(gw, "2001:db8:1:2::ffff:1") == (429 if same_64_refused else 101)
    assert await status_for(gw, "2001:db8:1:3::1") == 101  # another /64
    assert await status_for(gw, "192.0.2.1") == 101
    assert await status_for(gw, "192.0.2.2") == 101  # IPv4 is always per address
