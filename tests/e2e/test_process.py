"""wsgate as users run it: the installed command, ``python -m proxy``, ``check``, ``demo``, ``serve``
with JSON logs, and graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import WSMsgType
from conftest import REPO, free_port
from wsraw import TEXT, RawClient

WSGATE = str(Path(sys.executable).with_name("wsgate"))
EXAMPLES = sorted((REPO / "policies").glob("*.yaml"))
BROKEN = sorted((REPO / "tests" / "policies" / "broken").glob("*.yaml"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize("command", [[WSGATE], [sys.executable, "-m", "proxy"]], ids=["wsgate", "python-m"])
@pytest.mark.parametrize("sub", [[], ["serve"], ["check"], ["demo"]], ids=["top", "serve", "check", "demo"])
def test_help(command, sub):
    result = run(*command, *sub, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: wsgate")


def test_version():
    result = run(WSGATE, "--version")
    assert re.fullmatch(r"wsgate \d+\.\d+\.\d+\n", result.stdout)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_check_accepts_every_example_policy(path):
    result = run(WSGATE, "check", "-c", str(path.relative_to(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {path.relative_to(REPO)}")


def test_check_accepts_the_kubernetes_configmap_policy(tmp_path):
    documents = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text()))
    configmap = next(document for document in documents if document["kind"] == "ConfigMap")
    policy = tmp_path / "policy.yaml"
    policy.write_text(configmap["data"]["policy.yaml"])
    result = run(WSGATE, "check", "-c", str(policy))
    assert result.returncode == 0, result.stderr


def _expectations(path: Path) -> tuple[str, int | None]:
    text = path.read_text()
    expect = re.search(r"^# expect: (.+)$", text, re.M)
    line = re.search(r"^# line: (\d+)$", text, re.M)
    assert expect, f"{path} has no '# expect:' comment"
    return expect.group(1), int(line.group(1)) if line else None


@pytest.mark.parametrize("path", BROKEN, ids=lambda path: path.name)
def test_check_refuses_every_broken_policy_with_file_and_line(path):
    relative = str(path.relative_to(REPO))
    expected_message, expected_line = _expectations(path)
    result = run(WSGATE, "check", "-c", relative)
    assert result.returncode == 1
    assert result.stdout == ""
    prefix = f"error: {relative}:{expected_line}:" if expected_line else f"error: {relative}:"
    assert result.stderr.startswith(prefix), result.stderr
    assert expected_message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_broken_policy_without_starting():
    result = run(WSGATE, "serve", "-c", "tests/policies/broken/http_upstream.yaml")
    assert result.returncode == 1
    assert "tests/policies/broken/http_upstream.yaml:" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_missing_file():
    result = run(WSGATE, "check", "-c", "no/such/policy.yaml")
    assert result.returncode == 1
    assert "no/such/policy.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def _policy(tmp_path: Path, upstream_url: str, limits: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0"}\nadmin: {address: "127.0.0.1:0"}\n'
        f"limits: {{{limits}}}\n"
        f"routes:\n  - path: /\n    match: prefix\n    upstream: {upstream_url}\n    auth: none\n"
    )
    return path


async def test_serve_relays_and_logs_one_json_line_per_open_close_and_rejection(
    upstream, wsgate_process, tmp_path
):
    process = wsgate_process("serve", "-c", str(_policy(tmp_path, upstream.url("/"))), "--log-format", "json")
    port = await process.listening_port()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{port}/echo?x=1") as ws:
            await ws.send_bytes(b"12345")
            assert (await ws.receive(timeout=5)).data == b"12345"
            await ws.send_str("close:4000")
            await ws.receive(timeout=5)
        async with session.get(f"http://127.0.0.1:{port}/echo") as response:
            assert response.status == 426
            request_id = (await response.json())["request_id"]
    opened = await process.wait_for("session.open")
    closed = await process.wait_for("session.close")
    rejected = await process.wait_for("handshake.rejected")
    assert opened["request_id"] == closed["request_id"]
    assert opened["client_ip"] == closed["client_ip"] == "127.0.0.1"
    assert closed["route"] == "/"
    assert (closed["initiator"], closed["code"], closed["reason"]) == ("upstream", 4000, "bye")
    assert closed["client_messages"] == 2 and closed["client_bytes"] == 5 + len("close:4000")
    assert closed["upstream_messages"] == 1 and closed["upstream_bytes"] == 5
    assert closed["duration_s"] >= 0
    assert (rejected["request_id"], rejected["status"], rejected["reason"]) == (
        request_id,
        426,
        "bad_request",
    )
    for line in process.lines:  # every line on stdout is one JSON object
        assert isinstance(json.loads(line), dict), line
    masks = [json.loads(line) for line in process.lines if '"gateway.mask"' in line]
    assert [line.get("implementation") for line in masks] == ["aiohttp-cython"]  # said once, at start
    process.signal(signal.SIGTERM)
    assert await process.wait_exit() == 0


async def test_sigterm_drains_sessions_with_1001_and_exits_0(upstream, wsgate_process, tmp_path):
    policy = _policy(tmp_path, upstream.url("/"), "drain_timeout: 10s")
    process = wsgate_process("serve", "-c", str(policy), "--log-format", "json")
    port = await process.listening_port()
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"ws://127.0.0.1:{port}/echo") for _ in range(5)]
        for ws in sockets:
            await ws.send_str("before")
            assert (await ws.receive(timeout=5)).data == "before"
        started = time.monotonic()
        process.signal(signal.SIGTERM)
        for ws in sockets:
            message = await ws.receive(timeout=5)
            assert (message.type, message.data, message.extra) == (
                WSMsgType.CLOSE,
                1001,
                "server shutting down",
            )
        assert await process.wait_exit() == 0
        assert time.monotonic() - started < 3
        for record in upstream.records:
            await asyncio.wait_for(record.closed.wait(), 5)
            assert record.close_code == 1001
        stopped = await process.wait_for("gateway.stopped")
        assert stopped["drained"] is True
        with pytest.raises(aiohttp.ClientConnectionError):  # nothing listens any more
            await session.ws_connect(f"ws://127.0.0.1:{port}/echo")


async def test_drain_timeout_cuts_clients_that_never_answer(upstream, wsgate_process, tmp_path):
    policy = _policy(tmp_path, upstream.url("/"), "drain_timeout: 1s, close_timeout: 30s")
    process = wsgate_process("serve", "-c", str(policy), "--log-format", "json")
    port = await process.listening_port()
    ws, _ = await RawClient.connect(port, "/echo")
    ws.send_frame(TEXT, b"x")
    await ws.recv_message()
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert (await ws.recv_close()).close_code == 1001  # and we never answer it
    assert await ws.at_eof(timeout=5)
    assert await process.wait_exit() == 0
    assert 0.8 < time.monotonic() - started < 3
    assert (await process.wait_for("gateway.stopped"))["drained"] is False


async def test_second_sigterm_exits_at_once_with_1(upstream, wsgate_process, tmp_path):
    policy = _policy(tmp_path, upstream.url("/"), "drain_timeout: 30s, close_timeout: 30s")
    process = wsgate_process("serve", "-c", str(policy), "--log-format", "json")
    port = await process.listening_port()
    ws, _ = await RawClient.connect(port, "/echo")
    ws.send_frame(TEXT, b"x")
    await ws.recv_message()
    process.signal(signal.SIGTERM)
    assert (await ws.recv_close()).close_code == 1001
    await process.wait_for("gateway.draining")
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert await process.wait_exit() == 1
    assert time.monotonic() - started < 2


def test_logs_are_readable_text_on_a_terminal(tmp_path):
    """With stdout a terminal (and no --log-format), log lines are text, not JSON."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0"}\nadmin: {address: "127.0.0.1:0"}\n'
        "routes:\n  - path: /echo\n    upstream: ws://127.0.0.1:9/\n    auth: none\n"
    )
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [WSGATE, "serve", "-c", str(policy)], stdout=follower, stderr=follower, stdin=subprocess.DEVNULL
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 10
    try:
        while b"gateway.listening" not in output and time.monotonic() < deadline:
            output += os.read(leader, 4096)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        os.close(leader)
    line = next(line for line in output.decode().splitlines() if "gateway.listening" in line)
    assert not line.lstrip().startswith("{")
    assert re.search(r"INFO\s+gateway\.listening address=127\.0\.0\.1:\d+", line), line


async def test_log_level_and_error_file_from_the_policy(upstream, wsgate_process, tmp_path):
    errors = tmp_path / "errors.jsonl"
    policy = tmp_path / "policy.yaml"
    port = free_port()  # gateway.listening is an info event, below this policy's level: know the port
    policy.write_text(
        f'version: 1\nlisten: {{address: "127.0.0.1:{port}"}}\nadmin: {{address: "127.0.0.1:0"}}\n'
        f"log: {{level: warning, format: json, error_file: {errors.name}}}\n"
        f"routes:\n  - path: /echo\n    upstream: {upstream.url()}\n    auth: none\n"
        f"  - path: /down\n    upstream: ws://127.0.0.1:{free_port()}/\n    auth: none\n"
    )
    process = wsgate_process("serve", "-c", str(policy))
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 10
        while True:
            try:
                ws = await session.ws_connect(f"ws://127.0.0.1:{port}/echo")
                break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline, process.stderr
                await asyncio.sleep(0.1)
        await ws.send_str("x")
        await ws.receive(timeout=5)
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"ws://127.0.0.1:{port}/down")
    await process.wait_for("handshake.rejected", status=502)
    process.signal(signal.SIGTERM)
    assert await process.wait_exit() == 0
    assert process.events("session.open") == []  # info events are below the policy's level
    lines = [json.loads(line) for line in errors.read_text().splitlines()]
    # the /down upstream's endpoint going down is a warning too, logged once before the 502's line
    assert [line["event"] for line in lines] == ["upstream.down", "handshake.rejected"]
    assert (lines[0]["route"], lines[0]["level"]) == ("/down", "warning")
    assert (lines[1]["status"], lines[1]["route"], lines[1]["level"]) == (502, "/down", "warning")


@pytest.mark.parametrize("taken", ["listen", "admin"])
def test_an_address_in_use_is_a_clear_error_not_a_traceback(tmp_path, taken):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        addresses = {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", taken: f"127.0.0.1:{port}"}
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            f'version: 1\nlisten: {{address: "{addresses["listen"]}"}}\n'
            f'admin: {{address: "{addresses["admin"]}"}}\n'
            "routes:\n  - path: /a\n    upstream: ws://127.0.0.1:9/\n    auth: none\n"
        )
        result = run(WSGATE, "serve", "-c", str(policy))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port} ({taken}.address):")
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_certificate_that_does_not_load_is_refused_by_check(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    (tmp_path / "ca.pem").write_text("not a CA\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\n"
        "listen:\n  address: 127.0.0.1:0\n  tls: {cert: cert.pem, key: key.pem}\n"
        "routes:\n  - path: /a\n    upstream: wss://127.0.0.1:9/\n    auth: none\n"
    )
    result = run(WSGATE, "check", "-c", str(policy))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"error: {policy}:4: listen.tls.cert: cannot load the certificate and key"
    )
    policy.write_text(
        "version: 1\n"
        "routes:\n  - path: /a\n    upstream: wss://127.0.0.1:9/\n    auth: none\n"
        "    upstream_tls: {ca_file: ca.pem}\n"
    )
    result = run(WSGATE, "check", "-c", str(policy))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {policy}:6: routes[0].upstream_tls.ca_file: not a PEM CA bundle")
