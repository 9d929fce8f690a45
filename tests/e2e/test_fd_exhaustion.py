"""Out of file descriptors: ``wsgate serve`` with ``RLIMIT_NOFILE`` at 128 and 200 idle clients says so once,
counts it, spends no CPU while it lasts, and serves again by itself once descriptors are free. Run on the
loop of the test (uvloop and asyncio's own: they fail differently without wsgate's own accept loop)."""

from __future__ import annotations

import asyncio
import re
import signal
import socket

import aiohttp
import uvloop
from conftest import free_port

OPEN_FILES = 128
IDLE_CLIENTS = 200


async def test_running_out_of_descriptors_is_logged_once_costs_no_cpu_and_recovers(
    upstream, wsgate_process, tmp_path
):
    loop = "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"
    admin_port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f'version: 1\nlisten: {{address: "127.0.0.1:0"}}\nadmin: {{address: "127.0.0.1:{admin_port}"}}\n'
        "limits: {handshake_timeout: 60s}\n"  # the idle clients stay until the test lets them go
        f"routes:\n  - path: /echo\n    upstream: {upstream.url()}\n    auth: none\n"
    )
    process = wsgate_process(
        "serve", "-c", str(policy), "--log-format", "json", loop=loop, open_files=OPEN_FILES
    )
    port = await process.listening_port()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE_CLIENTS)]
    try:
        exhausted = await process.wait_for("listener.fd_exhausted", listener="client")
        assert exhausted["level"] == "warning"
        assert (exhausted["error"], exhausted["errno"]) == ("too many open files", "EMFILE")
        assert exhausted["nofile_limit"] == OPEN_FILES
        assert process.open_fds() == OPEN_FILES
        # Scrapers arriving meanwhile wait too (asyncio's own accept loop spun on these, growing).
        idle += [socket.create_connection(("127.0.0.1", admin_port)) for _ in range(3)]
        await process.wait_for("listener.fd_exhausted", listener="admin")
        before = process.cpu_seconds()
        await asyncio.sleep(2)
        assert process.cpu_seconds() - before < 0.3  # a busy loop would spend about 2 s
        assert len(process.events("listener.fd_exhausted")) == 2  # once per listener
        assert process.events("listener.accept_resumed") == []
    finally:
        for client in idle:
            client.close()
    resumed = await process.wait_for("listener.accept_resumed", listener="client")
    assert (resumed["listener"], resumed["reason"]) == ("client", "fd_exhausted")
    assert resumed["failed_accepts"] >= 1
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{port}/echo") as ws:
            await ws.send_str("served again")
            assert (await ws.receive(timeout=5)).data == "served again"
        async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
            text = await response.text()
    counted = re.search(
        r'^wsgate_accept_errors_total\{listener="client",reason="fd_exhausted"\} (\S+)$', text, re.M
    )
    assert counted and float(counted.group(1)) == resumed["failed_accepts"]
    assert len(process.events("listener.fd_exhausted")) == 2
    process.signal(signal.SIGTERM)
    assert await process.wait_exit() == 0
