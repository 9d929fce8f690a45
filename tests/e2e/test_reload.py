"""Live policy reload through the real ``wsgate serve`` process: file edits are picked up within 2 s (and at
once on SIGHUP), valid policies apply without dropping allowed sessions, sessions the new policy refuses are
closed 1008 "policy changed", and a broken file changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from conftest import policy_text

from proxy.policy.load import parse_policy

SECRET = "reload-test-secret-0123456789-abcdefghij"


def write_policy(path: Path, upstream_url: str, extra: str = "", routes: str = "") -> None:
    path.write_text(
        "version: 1\n"
        'listen: {address: "127.0.0.1:0"}\n'
        'admin: {address: "127.0.0.1:0"}\n'
        "trusted_proxies: [127.0.0.1/32]\n"
        "auth:\n  main: {algorithms: [HS256], secret_env: WSGATE_RELOAD_SECRET}\n"
        f"{extra}"
        "routes:\n"
        f"  - path: /echo\n    upstream: {upstream_url}\n    auth: none\n"
        f"  - path: /secure\n    upstream: {upstream_url}\n    auth: main\n"
        f"{routes}"
    )


async def start(wsgate_process, policy: Path):
    process = wsgate_process(
        "serve", "-c", str(policy), "--log-format", "json", env={"WSGATE_RELOAD_SECRET": SECRET}
    )
    listening = await process.wait_for("gateway.listening")
    port = int(listening["address"].rsplit(":", 1)[1])
    admin_port = int(listening["admin"].rsplit(":", 1)[1])
    return process, port, admin_port


async def admin_get(admin_port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{admin_port}{path}") as r:
        return r.status, await r.text()


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def echo_ok(ws) -> bool:
    await ws.send_str("ping?")
    message = await ws.receive(timeout=5)
    return message.type == WSMsgType.TEXT and message.data == "ping?"


async def test_valid_edit_applies_without_dropping_allowed_sessions(upstream, wsgate_process, tmp_path):
    policy = tmp_path / "policy.yaml"
    write_policy(policy, upstream.url())
    process, port, admin_port = await start(wsgate_process, policy)
    async with aiohttp.ClientSession() as session:
        live = await session.ws_connect(
            f"ws://127.0.0.1:{port}/echo", headers={"X-Forwarded-For": "10.1.1.1"}
        )
        assert await echo_ok(live)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"ws://127.0.0.1:{port}/new")
        assert refused.value.status == 404
        _, before = await admin_get(admin_port, "/policy")
        edited = time.monotonic()
        write_policy(
            policy, upstream.url(), routes=f"  - path: /new\n    upstream: {upstream.url()}\n    auth: none\n"
        )
        reloaded = await process.wait_for("policy.reloaded", timeout=5)
        assert time.monotonic() - edited < 2.5
        assert reloaded["trigger"] == "file changed"
        assert reloaded["sessions_closed"] == 0
        async with session.ws_connect(f"ws://127.0.0.1:{port}/new") as new:
            assert await echo_ok(new)
        assert await echo_ok(live)  # the old session kept its relay
        await live.close()
    _, after = await admin_get(admin_port, "/policy")
    assert json.loads(after)["sha256"] != json.loads(before)["sha256"]
    assert "/new" in json.loads(after)["routes"]
    _, metrics = await admin_get(admin_port, "/metrics")
    assert metric(metrics, 'wsgate_policy_reloads_total{result="success"}') == 1


async def test_newly_denied_ip_has_its_live_session_closed_1008(upstream, wsgate_process, tmp_path):
    policy = tmp_path / "policy.yaml"
    write_policy(policy, upstream.url())
    process, port, _ = await start(wsgate_process, policy)
    async with aiohttp.ClientSession() as session:
        doomed = await session.ws_connect(
            f"ws://127.0.0.1:{port}/echo", headers={"X-Forwarded-For": "10.6.6.6"}
        )
        spared = await session.ws_connect(
            f"ws://127.0.0.1:{port}/echo", headers={"X-Forwarded-For": "10.7.7.7"}
        )
        assert await echo_ok(doomed) and await echo_ok(spared)
        write_policy(
            policy, upstream.url(), extra="firewall: {default: allow, rules: [{deny: 10.6.0.0/16}]}\n"
        )
        message = await doomed.receive(timeout=5)
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1008, "policy changed")
        assert await echo_ok(spared)
        refused = await process.wait_for("session.policy_refused")
        assert (refused["client_ip"], refused["why"]) == ("10.6.6.6", "firewall")
        with pytest.raises(aiohttp.WSServerHandshakeError) as denied:
            await session.ws_connect(f"ws://127.0.0.1:{port}/echo", headers={"X-Forwarded-For": "10.6.6.7"})
        assert denied.value.status == 403
        await spared.close()
    closed_upstream = [record for record in upstream.records if record.close_code == 1008]
    assert len(closed_upstream) == 1


async def test_route_removed_and_revoked_subject_close_their_sessions(upstream, wsgate_process, tmp_path):
    policy = tmp_path / "policy.yaml"
    write_policy(
        policy, upstream.url(), routes=f"  - path: /old\n    upstream: {upstream.url()}\n    auth: none\n"
    )
    process, port, _ = await start(wsgate_process, policy)
    token = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    async with aiohttp.ClientSession() as session:
        old = await session.ws_connect(f"ws://127.0.0.1:{port}/old")
        mallory = await session.ws_connect(
            f"ws://127.0.0.1:{port}/secure", headers={"Authorization": f"Bearer {token}"}
        )
        alice = await session.ws_connect(
            f"ws://127.0.0.1:{port}/secure", headers={"Authorization": f"Bearer {good}"}
        )
        write_policy(policy, upstream.url(), extra="revoked: {subjects: [mallory]}\n")
        for ws in (old, mallory):
            message = await ws.receive(timeout=5)
            assert (message.data, message.extra) == (1008, "policy changed")
        assert await echo_ok(alice)
        await process.wait_for("session.policy_refused", why="revoked")  # log lines arrive on their own
        await process.wait_for("session.policy_refused", why="route removed")
        assert len(process.events("session.policy_refused")) == 2
        await alice.close()


async def test_broken_file_is_refused_and_the_running_policy_stays(upstream, wsgate_process, tmp_path):
    policy = tmp_path / "policy.yaml"
    write_policy(policy, upstream.url())
    process, port, admin_port = await start(wsgate_process, policy)
    _, before = await admin_get(admin_port, "/policy")
    async with aiohttp.ClientSession() as session:
        live = await session.ws_connect(f"ws://127.0.0.1:{port}/echo")
        policy.write_text(policy.read_text().replace("upstream: ws://", "upstream: http://", 1))
        failed = await process.wait_for("policy.reload_failed", timeout=5)
        assert failed["error"].startswith(f"{policy}:")
        assert "routes[0].upstream" in failed["error"] and "ws://" in failed["error"]
        assert failed["level"] == "error"
        policy.write_text("version: 1\nroutes: [unclosed\n")
        await asyncio.sleep(0.1)
        deadline = time.monotonic() + 5
        while len(process.events("policy.reload_failed")) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "invalid YAML" in process.events("policy.reload_failed")[-1]["error"]
        assert await echo_ok(live)  # nothing changed for live sessions
        async with session.ws_connect(f"ws://127.0.0.1:{port}/echo") as fresh:  # nor for new ones
            assert await echo_ok(fresh)
        await live.close()
    _, after = await admin_get(admin_port, "/policy")
    assert json.loads(after)["sha256"] == json.loads(before)["sha256"]
    _, metrics = await admin_get(admin_port, "/metrics")
    assert metric(metrics, 'wsgate_policy_reloads_total{result="error"}') == 2
    assert metric(metrics, 'wsgate_policy_reloads_total{result="success"}') == 0
    assert process.process.poll() is None


async def test_listener_change_needs_a_restart_and_is_not_half_applied(upstream, wsgate_process, tmp_path):
    policy = tmp_path / "policy.yaml"
    write_policy(policy, upstream.url())
    process, port, _ = await start(wsgate_process, policy)
    text = policy.read_text().replace('listen: {address: "127.0.0.1:0"}', 'listen: {address: "127.0.0.1:1"}')
    policy.write_text(text.replace("    auth: none\n", "    auth: none\n    origins: [https://x.test]\n", 1))
    failed = await process.wait_for("policy.reload_failed", timeout=5)
    assert failed["restart_required"] is True
    assert "restart" in failed["error"]
    # the origin rule that came with the listener change was not applied either
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://127.0.0.1:{port}/echo", headers={"Origin": "https://evil.test"}) as ws,
    ):
        assert await echo_ok(ws)


async def test_sighup_reloads_at_once(upstream, wsgate_process, tmp_path):
    policy = tmp_path / "policy.yaml"
    write_policy(
        policy, upstream.url(), routes=f"  - path: /aaa\n    upstream: {upstream.url()}\n    auth: none\n"
    )
    process, port, _ = await start(wsgate_process, policy)
    stat = policy.stat()
    # same size, same mtime: the file watcher cannot see this edit; only SIGHUP can
    policy.write_text(policy.read_text().replace("/aaa", "/bbb"))
    os.utime(policy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    await asyncio.sleep(1.5)
    assert process.events("policy.reloaded") == []
    process.signal(signal.SIGHUP)
    reloaded = await process.wait_for("policy.reloaded", timeout=3)
    assert reloaded["trigger"] == "SIGHUP"
    async with aiohttp.ClientSession() as session, session.ws_connect(f"ws://127.0.0.1:{port}/bbb") as ws:
        assert await echo_ok(ws)
    process.signal(signal.SIGHUP)  # nothing changed: no reload, no error
    await process.wait_for("policy.unchanged", timeout=3)
    assert len(process.events("policy.reloaded")) == 1


async def test_referenced_file_change_is_a_policy_change(upstream, wsgate_process, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object"}))
    policy = tmp_path / "policy.yaml"
    write_policy(
        policy,
        upstream.url(),
        routes=f"  - path: /json\n    upstream: {upstream.url()}\n    auth: none\n"
        f"    messages: {{client: {{schema_file: {schema.name}}}}}\n",
    )
    process, port, _ = await start(wsgate_process, policy)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{port}/json") as ws:
            await ws.send_str("[1]")  # not an object: refused by the first schema
            assert (await ws.receive(timeout=5)).data == 1008
        schema.write_text(json.dumps({"type": "array"}))  # only the schema file changes
        reloaded = await process.wait_for("policy.reloaded", timeout=5)
        assert reloaded["trigger"] == "file changed"
        async with session.ws_connect(f"ws://127.0.0.1:{port}/json") as ws:
            await ws.send_str("[1]")
            assert (await ws.receive(timeout=5)).data == "[1]"


async def test_a_file_the_loader_chokes_on_does_not_stop_the_watcher(upstream, wsgate_process, tmp_path):
    policy = tmp_path / "policy.yaml"
    write_policy(policy, upstream.url())
    process, port, _ = await start(wsgate_process, policy)
    good = policy.read_text()
    policy.write_text("version: !!binary x\nroutes: []\n")
    failed = await process.wait_for("policy.reload_failed", timeout=5)
    assert failed["error"].startswith(f"{policy}:1: invalid YAML value")
    policy.write_text("version: 1\nroutes: " + "[" * 3000 + "]" * 3000 + "\n")
    deadline = time.monotonic() + 5
    while len(process.events("policy.reload_failed")) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "nested too deeply" in process.events("policy.reload_failed")[-1]["error"]
    policy.write_text(good + f"  - path: /later\n    upstream: {upstream.url()}\n    auth: none\n")
    await process.wait_for("policy.reloaded", timeout=5)  # still watching
    async with aiohttp.ClientSession() as session, session.ws_connect(f"ws://127.0.0.1:{port}/later") as ws:
        assert await echo_ok(ws)


async def test_reload_keeps_sessions_the_handshake_allowed(gateway, upstream, client):
    """A route without an origins list never checks Origin, at the handshake or at a reload."""
    body = f"""
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
        allow_missing_origin: false
    """
    gw = await gateway(body)
    async with client.ws_connect(gw.url()) as ws:  # no Origin header
        assert await echo_ok(ws)
        added = f"      - path: /other\n        upstream: {upstream.url()}\n        auth: none\n"
        new = parse_policy(policy_text(body.rstrip(" ") + added))
        assert gw.gateway.apply_policy(new) == 0
        assert await echo_ok(ws)
