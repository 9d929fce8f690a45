"""Shared fixtures: a real aiohttp upstream, an in-process gateway, and ``wsgate serve`` as a subprocess.

Everything runs on 127.0.0.1 with ephemeral ports; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from proxy import logs
from proxy.app import Gateway
from proxy.policy.load import parse_policy

REPO = Path(__file__).resolve().parent.parent


# -- upstream ---------------------------------------------------------------------------------------


@dataclass
class UpstreamRecord:
    """What the upstream saw of one WebSocket session."""

    path: str
    query: str
    headers: dict[str, str]
    subprotocol: str | None
    close_code: int | None = None
    close_reason: str = ""
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    messages: list[Any] = field(default_factory=list)
    sent: int = 0


class Upstream:
    """An aiohttp WebSocket server with behaviours chosen by path:

    - ``/echo`` (and any unknown path): every message back, ``close:CODE`` closes with CODE and reason "bye";
    - ``/headers``: sends the request headers, path and query as one JSON text message;
    - ``/die``: aborts the TCP connection after the first message;
    - ``/silent``: reads and never answers (a slow or stuck service);
    - ``/close-on-open``: closes 4001 "go away" right after the handshake;
    - ``/slow-reader``: reads nothing until told (``release`` event), to test backpressure;
    - ``/flood``: sends ``count`` binary messages of ``size`` bytes (query parameters) as fast as it can.
    Every session's request and close are recorded in :attr:`records`.
    """

    def __init__(self) -> None:
        self.records: list[UpstreamRecord] = []
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.sessions_open = 0
        self._sockets: set[web.WebSocketResponse] = set()

    def url(self, path: str = "/echo") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def start(self, ssl_context: Any = None) -> Upstream:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Close live sessions with 1001 like a real service going down, then stop listening."""
        self.release.set()
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=1001, message=b"upstream shutting down"), 2)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("chat", "echo"), max_msg_size=0, autoping=True)
        await ws.prepare(request)
        record = UpstreamRecord(request.path, request.query_string, dict(request.headers), ws.ws_protocol)
        self.records.append(record)
        self.sessions_open += 1
        self._sockets.add(ws)
        try:
            await self._behave(request, ws, record)
        finally:
            self._sockets.discard(ws)
            self.sessions_open -= 1
            if record.close_code is None:
                record.close_code = ws.close_code
            record.closed.set()
        return ws

    async def _behave(self, request: web.Request, ws: web.WebSocketResponse, record: UpstreamRecord) -> None:
        path = "/" + request.path.split("/")[1]  # behaviour by first segment: /headers/room/7 is /headers
        if path == "/headers":
            await ws.send_str(
                json.dumps(
                    {"headers": dict(request.headers), "path": request.path, "query": request.query_string}
                )
            )
        elif path == "/close-on-open":
            await ws.close(code=4001, message=b"go away")
            return
        elif path == "/slow-reader":
            await self.release.wait()
        elif path == "/flood":
            payload = b"x" * int(request.query.get("size", "1024"))
            for _ in range(int(request.query.get("count", "100"))):
                await ws.send_bytes(payload)
                record.sent += 1
        while True:
            message = await ws.receive()
            if message.type == WSMsgType.CLOSE:
                record.close_code, record.close_reason = message.data, message.extra or ""
                return
            if message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            if message.type == WSMsgType.TEXT:
                record.messages.append(message.data)
                if message.data.startswith("close:"):
                    await ws.close(code=int(message.data[6:]), message=b"bye")
                    return
                if path != "/silent":
                    await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                record.messages.append(message.data)
                if path == "/die":
                    assert request.transport is not None
                    request.transport.abort()
                    return
                if path != "/silent":
                    await ws.send_bytes(message.data)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await Upstream().start()
    yield server
    await server.stop()


# -- in-process gateway -----------------------------------------------------------------------------


class LogCapture(logging.Handler):
    """Collects wsgate's log events as dicts (event name plus fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        self.events.append({"event": record.getMessage(), "level": record.levelname.lower(), **fields})

    def named(self, name: str) -> list[dict[str, Any]]:
        return [entry for entry in self.events if entry["event"] == name]

    async def wait_for(self, name: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.named(name):
                if all(entry.get(key) == value for key, value in match.items()):
                    return entry
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {name} event matching {match}; saw {self.events}")


@pytest.fixture
def log_events() -> Iterator[LogCapture]:
    capture = LogCapture()
    logger = logs.LOGGER
    saved = (logger.level, logger.propagate)
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(saved[0])


@dataclass
class RunningGateway:
    gateway: Gateway
    port: int

    def url(self, path: str = "/echo") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def http(self, path: str = "/echo") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def policy_text(body: str) -> str:
    """``body`` (dedented YAML) with ``version`` and, unless it has one, a listener on an ephemeral port."""
    body = textwrap.dedent(body)
    listen = "" if re.search(r"^listen:", body, re.M) else 'listen: {address: "127.0.0.1:0"}\n'
    admin = "" if re.search(r"^admin:", body, re.M) else 'admin: {address: "127.0.0.1:0"}\n'
    return "version: 1\n" + listen + admin + body


GatewayFactory = Callable[[str], Awaitable[RunningGateway]]


@pytest.fixture
async def gateway(log_events: LogCapture, upstream: Upstream) -> AsyncIterator[GatewayFactory]:
    """Factory: ``await gateway(yaml_body)`` starts an in-process gateway; stopped at teardown (before the
    upstream, which it depends on for that reason)."""
    started: list[Gateway] = []

    async def start(body: str) -> RunningGateway:
        instance = Gateway(parse_policy(policy_text(body)))
        address = await instance.start()
        started.append(instance)
        return RunningGateway(instance, address.port)

    yield start
    for instance in started:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(instance.stop(), 10)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- wsgate as a subprocess -------------------------------------------------------------------------


#: ``python -c`` program: the ``wsgate`` command on asyncio's own loop, as where uvloop is not installed.
ON_ASYNCIO = (
    "import sys; sys.modules['uvloop'] = None; from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
)


class WsgateProcess:
    """``wsgate serve -c FILE`` in a subprocess; its JSON log lines are collected as they arrive.

    ``loop="asyncio"`` runs it on asyncio's own loop instead of uvloop; ``open_files`` lowers its
    ``RLIMIT_NOFILE`` (soft and hard) before it starts."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        loop: str = "uvloop",
        open_files: int | None = None,
    ) -> None:
        command = ["-m", "proxy"] if loop == "uvloop" else ["-c", ON_ASYNCIO]

        def limit_open_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        self.process = subprocess.Popen(
            [sys.executable, *command, *args],
            preexec_fn=limit_open_files,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            text=True,
        )
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        parsed = []
        for line in list(self.lines) + list(self.stderr):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                    parsed.append(entry)
        return parsed

    async def wait_for(self, name: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.events(name):
                if all(entry.get(key) == value for key, value in match.items()):
                    return entry
            if self.process.poll() is not None and not self.events(name):
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {name} event matching {match}; stdout={self.lines} stderr={self.stderr}")

    async def listening_port(self) -> int:
        entry = await self.wait_for("gateway.listening")
        return int(entry["address"].rsplit(":", 1)[1])

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("wsgate did not exit")
            await asyncio.sleep(0.02)
        for thread in self._threads:
            thread.join(2)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far (from ``/proc/PID/stat``)."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@pytest.fixture
def wsgate_process() -> Iterator[Callable[..., WsgateProcess]]:
    """Factory: ``wsgate_process("serve", "-c", path)`` starts ``python -m proxy ...``; killed at teardown."""
    started: list[WsgateProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, loop: str = "uvloop", open_files: int | None = None
    ) -> WsgateProcess:
        process = WsgateProcess(list(args), env, loop, open_files)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Every async test runs on uvloop, the loop wsgate runs on, and on asyncio's own loop, its fallback
    where uvloop is missing: their transports differ in ways that have broken code before. A test of the
    ``wsgate serve`` process alone (marked ``serve_process``) runs once: the gateway's loop is its own."""
    import uvloop

    if item.get_closest_marker("serve_process"):
        return {"uvloop": uvloop.new_event_loop}
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


# -- a real redis-server ----------------------------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """``redis-server`` on a free port, without persistence; :meth:`stop` and :meth:`start` again keep the
    port (a Redis restart as replicas see it). ``args`` are extra server arguments (``--requirepass``...);
    with ``tls`` (cert, key, CA files) it listens for TLS only."""

    def __init__(
        self, directory: Path, args: tuple[str, ...] = (), tls: tuple[Path, Path, Path] | None = None
    ):
        self.port = free_port()
        self.directory = directory
        self.args = args
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            cert, key, ca = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            listen += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        command = [REDIS_SERVER, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.directory), *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.process.returncode}: {command}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.02)
        raise AssertionError("redis-server did not listen within 10 s")

    def stop(self) -> None:
        """Stop it (SIGKILL: what a crashed or partitioned Redis looks like; nothing is saved anyway)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def client(self, password: str | None = None) -> Any:
        """A synchronous redis-py client, for looking at what wsgate stored."""
        import redis

        if self.tls is not None:
            return redis.Redis.from_url(self.url, password=password, ssl_ca_certs=str(self.tls[2]))
        return redis.Redis.from_url(self.url, password=password)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory: ``redis_server(*args, tls=None)`` starts a ``redis-server``; stopped at teardown. Skips the
    test when redis-server is not installed."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    started: list[RedisServer] = []

    def start(*args: str, tls: tuple[Path, Path, Path] | None = None) -> RedisServer:
        directory = tmp_path / f"redis-{len(started)}"
        directory.mkdir()
        server = RedisServer(directory, args, tls).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
