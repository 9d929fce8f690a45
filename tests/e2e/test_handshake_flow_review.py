"""A handshake that fails after its session was registered must not leave that session behind: it would be
counted against max_connections for ever, shown as live, and make every drain wait its full timeout."""

from __future__ import annotations

import asyncio

from wsraw import RawClient

from proxy import handshake_flow


def broken_relay(*args, **kwargs):
    raise RuntimeError("a bug while starting the relay")


async def test_a_bug_after_the_101_leaves_no_session_behind(gateway, upstream, log_events, monkeypatch):
    gw = await gateway(
        f"""
    limits: {{connections_per_ip: 1}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
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
