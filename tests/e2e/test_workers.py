"""``wsgate serve --workers 2`` as users run it: two worker processes behind one address and one admin
listener. Sessions land on both, one scrape counts them all, reloads and signals reach both, a killed
worker comes back, and limits that would be counted per worker are refused without a shared limiter."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from conftest import REPO

from proxy.admin_parent import SupervisorAdmin, SupervisorView, WorkerEndpoint
from proxy.policy.load import load_policy
from proxy.policy.model import Address

pytestmark = pytest.mark.serve_process

WSGATE = str(Path(sys.executable).with_name("wsgate"))


def write_policy(path: Path, upstream_url: str, extra: str = "", routes: str = "") -> Path:
    path.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0"}\nadmin: {address: "127.0.0.1:0"}\n'
        f"{extra}"
        f"routes:\n  - path: /echo\n    upstream: {upstream_url}\n    auth: none\n{routes}"
    )
    return path


class Workers:
    """A running ``wsgate serve --workers 2``: its process, client port and admin port."""

    def __init__(self, process: Any, port: int, admin: int) -> None:
        self.process = process
        self.port = port
        self.admin = admin

    def url(self, path: str = "/echo") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def get(self, path: str, **headers: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.admin}{path}", headers=headers) as response,
        ):
            return response.status, await response.text()

    def opened_by(self, path: str = "/echo") -> set[int]:
        """Indexes of the workers that logged a session on ``path``."""
        return {entry["worker"] for entry in self.process.events("session.open") if entry["route"] == path}


async def start_workers(
    wsgate_process, policy: Path, *extra: str, env: dict[str, str] | None = None
) -> Workers:
    command = ("serve", "-c", str(policy), "--workers", "2", "--log-format", "json", *extra)
    process = wsgate_process(*command, env=env)
    listening = await process.wait_for("supervisor.listening", timeout=20)
    port = int(listening["address"].rsplit(":", 1)[1])
    admin = int(listening["admin"].rsplit(":", 1)[1])
    return Workers(process, port, admin)


async def sessions_on_both(
    session: aiohttp.ClientSession, workers: Workers, path: str = "/echo", attempts: int = 200
) -> list[aiohttp.ClientWebSocketResponse]:
    """Open sessions (each answering one echo) until both workers logged one on ``path``; all stay open."""
    opened = []
    for _ in range(attempts):
        ws = await session.ws_connect(workers.url(path))
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).data == "ping"
        opened.append(ws)
        await asyncio.sleep(0.01)  # the session.open line reaches the log
        if workers.opened_by(path) == {0, 1}:
            return opened
    raise AssertionError(f"{attempts} sessions never reached both workers: {workers.opened_by(path)}")


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of every sample called ``name`` in a text exposition."""
    found = {}
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            series, value = line.rsplit(" ", 1)
            found[series[len(name) :]] = float(value)
    return found


async def until(condition, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await condition()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_serve_help_documents_workers():
    result = subprocess.run([WSGATE, "serve", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "--workers N" in result.stdout
    assert "--worker-index" not in result.stdout  # the supervisor's own arguments stay hidden


async def test_sessions_land_on_both_workers_and_one_scrape_counts_them_all(
    upstream, wsgate_process, tmp_path
):
    workers = await start_workers(wsgate_process, write_policy(tmp_path / "p.yaml", upstream.url("/")))
    async with aiohttp.ClientSession() as session:
        opened = await sessions_on_both(session, workers)
        pids = {entry["pid"] for entry in workers.process.events("worker.started")}
        assert len(pids) == 2
        status, text = await workers.get("/metrics")
        assert status == 200
        assert samples(text, "wsgate_connections_active") == {'{route="/echo"}': len(opened)}
        assert samples(text, "wsgate_connections_total") == {'{route="/echo"}': len(opened)}
        assert samples(text, "wsgate_workers") == {"": 2.0}
        assert samples(text, "wsgate_worker_restarts_total") == {"": 0.0}
        policy = load_policy(tmp_path / "p.yaml")
        assert samples(text, "wsgate_policy_info") == {f'{{hash="{policy.sha256[:12]}",version="1"}}': 1.0}
        count = samples(text, "wsgate_handshake_duration_seconds_count")
        assert count == {'{route="/echo"}': len(opened)}
        status, body = await workers.get("/status.json")  # the admin page counts every worker's sessions
        document = json.loads(body)
        assert status == 200 and document["routes"] == [{"path": "/echo", "live_sessions": len(opened)}]
        assert document["policy"]["sha256"] == policy.sha256
        async with session.get(
            f"http://127.0.0.1:{workers.admin}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        ) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await response.text()).endswith("# EOF\n")
        for ws in opened:
            await ws.close()
        status, body = await workers.get("/readyz")
        assert (status, body) == (200, '{"status": "ready", "workers": 2}')
        status, body = await workers.get("/policy")
        assert status == 200 and policy.sha256 in body
        status, _ = await workers.get("/sessions")  # no admin.token_env: the workers answer 404, passed on
        assert status == 404
        async with session.post(f"http://127.0.0.1:{workers.admin}/sessions/close", json={}) as response:
            assert response.status == 404
        status, body = await workers.get("/status.json")
        assert status == 200 and json.loads(body)["routes"] == [{"path": "/echo", "live_sessions": 0}]
        status, _ = await workers.get("/no/such/page")
        assert status == 404
    workers.process.signal(signal.SIGTERM)
    assert await workers.process.wait_exit() == 0


async def test_a_file_edit_reloads_both_workers_and_sighup_reaches_both(upstream, wsgate_process, tmp_path):
    path = write_policy(tmp_path / "p.yaml", upstream.url("/"))
    workers = await start_workers(wsgate_process, path)
    routes = f"  - path: /added\n    upstream: {upstream.url('/')}\n    auth: none\n"
    write_policy(path, upstream.url("/"), routes=routes)
    new_hash = load_policy(path).sha256[:12]
    for index in (0, 1):
        await workers.process.wait_for("policy.reloaded", worker=index, policy_sha256=new_hash)
    _, text = await workers.get("/metrics")
    assert samples(text, "wsgate_policy_info") == {f'{{hash="{new_hash}",version="1"}}': 1.0}
    assert samples(text, "wsgate_policy_reloads_total")['{result="success"}'] == 2.0
    async with aiohttp.ClientSession() as session:
        opened = await sessions_on_both(session, workers, "/added")  # the new route, from every worker
        for ws in opened:
            await ws.close()
    workers.process.signal(signal.SIGHUP)
    for index in (0, 1):
        await workers.process.wait_for("policy.unchanged", worker=index, trigger="SIGHUP")
    workers.process.signal(signal.SIGTERM)
    assert await workers.process.wait_exit() == 0


async def test_sigterm_drains_both_workers_with_1001_and_exits_0(upstream, wsgate_process, tmp_path):
    workers = await start_workers(
        wsgate_process, write_policy(tmp_path / "p.yaml", upstream.url("/"), "limits: {drain_timeout: 10s}\n")
    )
    async with aiohttp.ClientSession() as session:
        opened = await sessions_on_both(session, workers)
        workers.process.signal(signal.SIGTERM)

        async def draining() -> bool:  # the supervisor still answers while its workers drain
            status, body = await workers.get("/readyz")
            return status == 503 and "draining" in body

        await until(draining, what="readyz 503 during the drain")
        for ws in opened:
            message = await ws.receive(timeout=5)
            assert (message.type, message.data, message.extra) == (
                WSMsgType.CLOSE,
                1001,
                "server shutting down",
            )
    assert await workers.process.wait_exit() == 0
    assert {entry["worker"] for entry in workers.process.events("gateway.stopped")} == {0, 1}
    assert workers.process.events("supervisor.stopped")[0]["exit_codes"] == [0, 0]


async def test_a_killed_worker_is_logged_and_started_again(upstream, wsgate_process, tmp_path):
    workers = await start_workers(wsgate_process, write_policy(tmp_path / "p.yaml", upstream.url("/")))
    async with aiohttp.ClientSession() as session:
        before = await sessions_on_both(session, workers)
        for ws in before:
            await ws.close()
        _, text = await workers.get("/metrics")
        assert samples(text, "wsgate_connections_total") == {'{route="/echo"}': len(before)}
        victim = next(entry for entry in workers.process.events("worker.started") if entry["index"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        exited = await workers.process.wait_for("worker.exited", index=1)
        assert (exited["pid"], exited["signal"]) == (victim["pid"], "SIGKILL")
        _, text = await workers.get("/metrics")  # while it is away, what it counted still counts
        assert samples(text, "wsgate_connections_total") == {'{route="/echo"}': len(before)}
        restarted = await until(lambda: _restarted(workers, victim["pid"]), what="worker 1 started again")
        assert restarted["index"] == 1

        async def ready() -> bool:
            status, _ = await workers.get("/readyz")
            return status == 200

        await until(ready, what="readyz 200 again")
        after = await sessions_on_both(session, workers)  # the new worker 1 serves too
        for ws in after:
            await ws.close()
        _, text = await workers.get("/metrics")
        assert samples(text, "wsgate_worker_restarts_total") == {"": 1.0}
        assert samples(text, "wsgate_workers") == {"": 2.0}
        assert samples(text, "wsgate_connections_active") == {'{route="/echo"}': 0.0}
        total = samples(text, "wsgate_connections_total")  # monotonic across the restart
        assert total == {'{route="/echo"}': len(before) + len(after)}
    workers.process.signal(signal.SIGTERM)
    assert await workers.process.wait_exit() == 0


async def test_a_worker_that_keeps_dying_is_restarted_with_a_doubling_backoff(
    upstream, wsgate_process, tmp_path
):
    workers = await start_workers(wsgate_process, write_policy(tmp_path / "p.yaml", upstream.url("/")))
    delays = []
    pid = next(entry["pid"] for entry in workers.process.events("worker.started") if entry["index"] == 0)
    for _ in range(3):
        os.kill(pid, signal.SIGKILL)
        exited = await workers.process.wait_for("worker.exited", index=0, pid=pid)
        delays.append(exited["restart_in_s"])
        pid = (await until(lambda old=pid: _restarted(workers, old, index=0), what="worker 0 again"))["pid"]
    assert delays == [0.5, 1.0, 2.0]
    workers.process.signal(signal.SIGTERM)
    assert await workers.process.wait_exit() == 0


async def test_a_second_signal_cuts_every_worker_at_once_and_exits_1(upstream, wsgate_process, tmp_path):
    limits = "limits: {drain_timeout: 30s, close_timeout: 30s}\n"
    workers = await start_workers(
        wsgate_process, write_policy(tmp_path / "p.yaml", upstream.url("/"), limits)
    )
    async with aiohttp.ClientSession() as session:
        opened = await sessions_on_both(session, workers)  # never read again: the 1001s stay unanswered
        workers.process.signal(signal.SIGTERM)
        for index in (0, 1):
            await workers.process.wait_for("gateway.draining", worker=index)
        started = time.monotonic()
        workers.process.signal(signal.SIGTERM)
        assert await workers.process.wait_exit() == 1
        assert time.monotonic() - started < 3
        assert workers.process.events("supervisor.stopped")[0]["exit_codes"] == [1, 1]
        for ws in opened:
            await ws.close()


async def test_a_stopped_worker_is_killed_after_the_second_signal(upstream, wsgate_process, tmp_path):
    """A worker that cannot act on signals (stopped, wedged) does not hold the supervisor's exit."""
    workers = await start_workers(wsgate_process, write_policy(tmp_path / "p.yaml", upstream.url("/")))
    stuck = workers.process.events("worker.started")[0]["pid"]
    os.kill(stuck, signal.SIGSTOP)
    try:
        workers.process.signal(signal.SIGTERM)
        await workers.process.wait_for("supervisor.signal", action="drain")
        workers.process.signal(signal.SIGTERM)
        started = time.monotonic()
        assert await workers.process.wait_exit(timeout=15) == 1
        assert time.monotonic() - started < 5 + 3
        killed = workers.process.events("worker.killed")
        assert [entry["pid"] for entry in killed] == [stuck]
        assert killed[0]["why"] == "no exit after the second signal"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGKILL)


async def test_workers_drain_when_the_supervisor_is_killed(upstream, wsgate_process, tmp_path):
    workers = await start_workers(wsgate_process, write_policy(tmp_path / "p.yaml", upstream.url("/")))
    pids = [entry["pid"] for entry in workers.process.events("worker.started")]
    workers.process.process.kill()
    workers.process.process.wait(5)

    async def all_gone() -> bool:
        return not any(_running(pid) for pid in pids)

    await until(all_gone, what="workers without a supervisor to exit")
    for index in (0, 1):
        await workers.process.wait_for("worker.orphaned", index=index)
        await workers.process.wait_for("gateway.stopped", worker=index, drained=True)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _restarted(workers: Workers, old_pid: int, index: int = 1) -> dict[str, Any] | None:
    """The ``worker.started`` line of worker ``index`` after ``old_pid``, if it was logged."""
    started = [entry for entry in workers.process.events("worker.started") if entry["index"] == index]
    pids = [entry["pid"] for entry in started]
    if old_pid not in pids or pids[-1] == old_pid:
        return None
    return started[-1]


@pytest.mark.parametrize(
    ("extra", "routes", "key"),
    [
        ("limits: {connections_per_ip: 5}\n", "", "limits.connections_per_ip"),
        ("limits: {handshakes_per_ip: 10/s}\n", "", "limits.handshakes_per_ip"),
        ("", "    limits: {connections_per_subject: 3}\n", "routes[0].limits.connections_per_subject"),
    ],
    ids=["per-ip", "rate", "route-subject"],
)
def test_per_client_limits_without_a_shared_limiter_are_refused(tmp_path, extra, routes, key):
    policy = write_policy(tmp_path / "policy.yaml", "ws://127.0.0.1:9/", extra, routes)
    result = subprocess.run(
        [WSGATE, "serve", "-c", str(policy), "--workers", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {policy}: {key}: with --workers 2 each worker counts on its own, so the limit would be 2x "
        "looser; configure limiter.redis\n"
    )


async def test_a_worker_refuses_a_reload_into_unshared_limits(upstream, wsgate_process, tmp_path):
    path = write_policy(tmp_path / "p.yaml", upstream.url("/"))
    workers = await start_workers(wsgate_process, path)
    running = load_policy(path).sha256[:12]
    write_policy(path, upstream.url("/"), "limits: {connections_per_ip: 5}\n")
    for index in (0, 1):
        failed = await workers.process.wait_for("policy.reload_failed", worker=index)
        assert "limits.connections_per_ip: with --workers 2 each worker counts on its own" in failed["error"]
        assert failed["running_sha256"] == running
    _, text = await workers.get("/metrics")
    assert samples(text, "wsgate_policy_info") == {f'{{hash="{running}",version="1"}}': 1.0}
    workers.process.signal(signal.SIGTERM)
    assert await workers.process.wait_exit() == 0


#: The admin token of the tests that list and close sessions through the supervisor.
ADMIN_ENV = {"WSGATE_TEST_ADMIN_TOKEN": "admin-token-0123456789"}


async def test_sessions_of_every_worker_are_listed_and_closed_through_the_admin_address(
    upstream, wsgate_process, tmp_path
):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0"}\n'
        'admin: {address: "127.0.0.1:0", token_env: WSGATE_TEST_ADMIN_TOKEN}\n'
        f"routes:\n  - path: /echo\n    upstream: {upstream.url('/')}\n    auth: none\n"
    )
    workers = await start_workers(wsgate_process, policy, env=ADMIN_ENV)
    process = workers.process
    token = {"Authorization": "Bearer admin-token-0123456789"}
    async with aiohttp.ClientSession() as session:
        opened = await sessions_on_both(session, workers)
        status, body = await workers.get("/sessions", **token)
        assert status == 200
        listed = {entry["request_id"] for entry in json.loads(body)}
        assert listed == {entry["request_id"] for entry in process.events("session.open")}
        assert len(listed) == len(opened)
        status, _ = await workers.get("/sessions", Authorization="Bearer wrong")
        assert status == 401
        url = f"http://127.0.0.1:{workers.admin}/sessions/close"
        async with session.post(
            url, json={"route": "/echo", "reason": "maintenance"}, headers=token
        ) as response:
            assert response.status == 200
            assert (await response.json())["closed"] == len(opened)
        for ws in opened:
            message = await ws.receive(timeout=5)
            assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 1008, "maintenance")
        async with session.post(url, json={}, headers=token) as response:
            assert response.status == 400  # a worker's refusal is passed on as is
    process.signal(signal.SIGTERM)
    assert await process.wait_exit() == 0


async def test_with_a_shared_redis_limits_count_across_workers_and_one_close_reaches_both(
    upstream, wsgate_process, tmp_path, redis_server
):
    redis = redis_server()
    policy = tmp_path / "p.yaml"
    policy.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0"}\n'
        'admin: {address: "127.0.0.1:0", token_env: WSGATE_TEST_ADMIN_TOKEN}\n'
        f'limiter: {{redis: {{url: "{redis.url}"}}}}\nlimits: {{connections_per_ip: 4}}\n'
        f"routes:\n  - path: /echo\n    upstream: {upstream.url('/')}\n    auth: none\n"
    )
    workers = await start_workers(wsgate_process, policy, env=ADMIN_ENV)
    process = workers.process
    token = {"Authorization": "Bearer admin-token-0123456789"}
    async with aiohttp.ClientSession() as session:
        opened = []
        for _ in range(4):
            ws = await session.ws_connect(workers.url())
            await ws.send_str("ping")
            assert (await ws.receive(timeout=5)).data == "ping"
            opened.append(ws)
        for _ in range(6):  # whichever worker the kernel picks, the cap is the gateway's, not a worker's
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(workers.url())
            assert refused.value.status == 429
        url = f"http://127.0.0.1:{workers.admin}/sessions/close"
        async with session.post(url, json={"client_ip": "127.0.0.1"}, headers=token) as response:
            assert response.status == 200
            assert await response.json() == {"closed": 4, "replicas": 2}  # one close, through Redis
        for ws in opened:
            message = await ws.receive(timeout=5)
            assert (message.type, message.data) == (WSMsgType.CLOSE, 1008)
    process.signal(signal.SIGTERM)
    assert await process.wait_exit() == 0


async def test_the_supervisor_admin_concatenates_sessions_and_sums_closes_over_real_listeners():
    """The forwarding of ``/sessions`` on its own: two aiohttp servers stand for the workers' admin."""

    def worker_admin(index: int) -> web.Application:
        async def listed(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != "Bearer right":
                return web.json_response({"error": "unauthorized"}, status=401)
            return web.json_response([{"worker": index, "query": request.query_string}])

        async def close(request: web.Request) -> web.Response:
            body = await request.json()
            return web.json_response({"closed": index + 1 if body == {"route": "/echo"} else 0})

        app = web.Application()
        app.router.add_get("/sessions", listed)
        app.router.add_post("/sessions/close", close)
        return app

    runners, endpoints = [], []
    for index in (0, 1):
        runner = web.AppRunner(worker_admin(index))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        endpoints.append(WorkerEndpoint(index, os.getpid(), Address("127.0.0.1", runner.addresses[0][1])))
    admin = SupervisorAdmin(
        SupervisorView(workers=lambda: endpoints, expected=2, draining=lambda: False, restarts=lambda: 0)
    )
    address = await admin.start(Address("127.0.0.1", 0))
    base = f"http://127.0.0.1:{address.port}"
    try:
        async with aiohttp.ClientSession() as session:
            right = {"Authorization": "Bearer right"}
            async with session.get(f"{base}/sessions?route=/echo", headers=right) as response:
                assert response.status == 200
                assert await response.json() == [
                    {"worker": 0, "query": "route=/echo"},
                    {"worker": 1, "query": "route=/echo"},
                ]
            async with session.get(f"{base}/sessions", headers={"Authorization": "Bearer wrong"}) as response:
                assert (response.status, await response.json()) == (401, {"error": "unauthorized"})
            async with session.post(
                f"{base}/sessions/close", json={"route": "/echo"}, headers=right
            ) as response:
                assert (response.status, await response.json()) == (200, {"closed": 3})
    finally:
        await admin.stop()
        for runner in runners:
            await runner.cleanup()
