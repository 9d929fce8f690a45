"""The handshake flow's promises: a failed handshake gives back every limiter slot it took, whatever step it
failed at, and a bug costs one handshake a 500, never the gateway."""

from __future__ import annotations

import asyncio
import json

from conftest import free_port
from wsraw import RawClient

from proxy import handshake, handshake_flow
from proxy.errors import Rejection
from proxy.guards.base import OfflineGuard
from proxy.guards.context import HandshakeContext
from proxy.guards.registry import GUARDS


def reason_of(response) -> str:
    return json.loads(response.body)["error"]


class Broken(OfflineGuard):
    """A guard with a bug, placed after the connection caps took their slots."""

    name = "broken"
    not_rejudged = "test guard"

    def check(self, context: HandshakeContext) -> Rejection | None:
        raise RuntimeError("a bug in a guard")

    def passed(self, context: HandshakeContext) -> str:
        return ""


def capped(upstream) -> str:
    """One open route, one session per client IP: a slot not given back shows as a 429."""
    return f"""
    limits: {{connections_per_ip: 1}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """


async def test_a_bug_in_a_guard_is_a_500_and_gives_its_slots_back(gateway, upstream, log_events, monkeypatch):
    gw = await gateway(capped(upstream))
    monkeypatch.setattr(handshake, "GUARDS", (*GUARDS, Broken()))
    for _ in range(3):
        client, response = await RawClient.connect(gw.port)
        assert (response.status, reason_of(response)) == (500, "internal_error")
        client.abort()
    errors = log_events.named("handshake.error")
    assert len(errors) == 3 and all(entry["level"] == "error" for entry in errors)
    rejected = log_events.named("handshake.rejected")
    assert [(entry["status"], entry["reason"]) for entry in rejected] == [(500, "internal_error")] * 3
    monkeypatch.setattr(handshake, "GUARDS", GUARDS)
    client, response = await RawClient.connect(gw.port)
    assert response.status == 101  # the cap of 1 is free: the failed handshakes gave their slot back
    client.abort()
    assert upstream.records and len(upstream.records) == 1


async def test_an_unreachable_upstream_is_502_and_gives_its_slots_back(gateway, upstream):
    gw = await gateway(
        f"""
    limits: {{connections_per_ip: 1}}
    routes:
      - path: /down
        upstream: ws://127.0.0.1:{free_port()}/
        auth: none
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    for _ in range(3):
        _, response = await RawClient.connect(gw.port, "/down")
        assert (response.status, reason_of(response)) == (502, "upstream_unavailable")
    client, response = await RawClient.connect(gw.port, "/echo")
    assert response.status == 101
    _, response = await RawClient.connect(gw.port, "/echo")
    assert (response.status, reason_of(response)) == (429, "conn_limit")
    client.abort()


def broken_relay(*args, **kwargs):
    raise RuntimeError("a bug while starting the relay")


async def test_a_bug_after_the_101_leaves_no_session_behind(gateway, upstream, log_events, monkeypatch):
    """A session registered but never relayed would count against max_connections for ever, show as live,
    and hold every drain to its full timeout."""
    gw = await gateway(capped(upstream))
    monkeypatch.setattr(handshake_flow, "start_relay", broken_relay)
    client, response = await RawClient.connect(gw.port)
    assert response.status == 101
    assert await client.at_eof()
    assert len(log_events.named("handshake.error")) == 1
    for _ in range(50):
        if gw.gateway.connection_count == 0:
            break
        await asyncio.sleep(0.02)
    assert len(gw.gateway.sessions) == 0
    assert gw.gateway.connection_count == 0
    monkeypatch.undo()
    client, response = await RawClient.connect(gw.port)
    assert response.status == 101  # the slot was given back
    client.abort()
