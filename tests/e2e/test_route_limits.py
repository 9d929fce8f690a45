"""Per-route handshake limits: a route's own handshake rate and connection cap count that route only, keyed
by route and client, and the policy-wide limits still apply on top."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
from wsraw import RawClient


def reason_of(response) -> str:
    return json.loads(response.body)["error"]


async def statuses(port: int, path: str, count: int, headers: dict[str, str] | None = None) -> list[int]:
    """The statuses of ``count`` handshakes in a row on ``path``, each closed right away."""
    found = []
    for _ in range(count):
        client, response = await RawClient.connect(port, path, headers)
        found.append(response.status)
        client.abort()
    return found


async def test_a_routes_own_handshake_rate_limits_that_route_only(gateway, upstream):
    gw = await gateway(
        f"""
    trusted_proxies: [127.0.0.1/32]
    routes:
      - path: /tight
        upstream: {upstream.url()}
        auth: none
        limits: {{handshakes_per_ip: 1/m, handshake_burst: 2}}
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    assert await statuses(gw.port, "/tight", 2) == [101, 101]
    client, response = await RawClient.connect(gw.port, "/tight")
    assert (response.status, reason_of(response)) == (429, "rate_limited")
    assert int(response.headers["retry-after"]) >= 1
    client.abort()
    # the same client on another route, and another client on this route, are not affected
    assert await statuses(gw.port, "/echo", 5) == [101] * 5
    assert await statuses(gw.port, "/tight", 1, {"X-Forwarded-For": "10.0.0.2"}) == [101]


async def test_the_policy_wide_handshake_rate_applies_on_top_of_a_routes_own(gateway, upstream, log_events):
    gw = await gateway(
        f"""
    limits: {{handshakes_per_ip: 1/m, handshake_burst: 3}}
    routes:
      - path: /tight
        upstream: {upstream.url()}
        auth: none
        limits: {{handshakes_per_ip: 1/m, handshake_burst: 1}}
      - path: /loose
        upstream: {upstream.url()}
        auth: none
        limits: {{handshakes_per_ip: 100/s, handshake_burst: 100}}
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    # /tight: its own burst of 1 first; the refused handshake costs nothing of the policy-wide 3
    assert await statuses(gw.port, "/tight", 2) == [101, 429]
    # the policy-wide budget of 3 is shared: 1 spent on /tight, 1 on /loose (whose own is generous), 1 here
    assert await statuses(gw.port, "/loose", 1) == [101]
    assert await statuses(gw.port, "/echo", 2) == [101, 429]
    assert await statuses(gw.port, "/loose", 1) == [429]
    details = [entry["detail"] for entry in log_events.named("handshake.rejected")]
    assert details == [
        "too many handshakes from this address on this route",
        "too many handshakes from this address",
        "too many handshakes from this address",
    ]


async def test_a_routes_own_connections_per_ip_cap(gateway, upstream, client):
    gw = await gateway(
        f"""
    limits: {{connections_per_ip: 3}}
    routes:
      - path: /capped
        upstream: {upstream.url()}
        auth: none
        limits: {{connections_per_ip: 1}}
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    capped = await client.ws_connect(gw.url("/capped"))
    _, response = await RawClient.connect(gw.port, "/capped")
    assert (response.status, reason_of(response)) == (429, "conn_limit")
    assert json.loads(response.body)["detail"] == "at most 1 connections per address on this route"
    # other routes are held to the policy-wide cap of 3, which the /capped session counts towards
    others = [await client.ws_connect(gw.url("/echo")) for _ in range(2)]
    _, response = await RawClient.connect(gw.port, "/echo")
    assert (response.status, reason_of(response)) == (429, "conn_limit")
    assert json.loads(response.body)["detail"] == "at most 3 connections per address"
    # closing the /capped session gives back both of its slots: the route's and the policy-wide one
    await capped.close()
    deadline = time.monotonic() + 3
    while True:
        _, response = await RawClient.connect(gw.port, "/capped")
        if response.status == 101 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert response.status == 101
    for ws in others:
        await ws.close()


async def test_connections_per_subject_per_route_and_policy_wide(gateway, upstream, monkeypatch):
    secret = "route-limits-secret-0123456789-abcdefghij"
    monkeypatch.setenv("WSGATE_ROUTE_LIMITS_SECRET", secret)
    gw = await gateway(
        f"""
    auth:
      main: {{algorithms: [HS256], secret_env: WSGATE_ROUTE_LIMITS_SECRET}}
    limits: {{connections_per_subject: 3}}
    routes:
      - path: /chat
        upstream: {upstream.url()}
        auth: main
        limits: {{connections_per_subject: 1}}
      - path: /echo
        upstream: {upstream.url()}
        auth: main
    """
    )

    def bearer(subject: str) -> dict[str, str]:
        token = jwt.encode({"sub": subject, "exp": int(time.time()) + 600}, secret, algorithm="HS256")
        return {"Authorization": f"Bearer {token}"}

    held = []

    async def status(path: str, subject: str) -> tuple[int, str | None]:
        client, response = await RawClient.connect(gw.port, path, bearer(subject))
        if response.status == 101:
            held.append(client)
            return 101, None
        client.abort()
        return response.status, json.loads(response.body)["detail"]

    assert await status("/chat", "alice") == (101, None)
    assert await status("/chat", "alice") == (429, "at most 1 connections per user on this route")
    assert await status("/chat", "bob") == (101, None)  # another subject has its own count
    assert await status("/echo", "alice") == (101, None)
    assert await status("/echo", "alice") == (101, None)
    assert await status("/echo", "alice") == (429, "at most 3 connections per user")
    for client in held:
        client.abort()
