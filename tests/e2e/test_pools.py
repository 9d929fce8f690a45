"""Upstream pools: sessions spread over several endpoints (round robin, least connections, sticky hashing),
a dead endpoint costs no failed handshake, health checks take endpoints out and back, a reload keeps what
is known of endpoints that stay, and a wss:// upstream that asks for a client certificate gets one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from conftest import LogCapture, Upstream, policy_text
from prometheus_client.parser import text_string_to_metric_families
from test_tls import make_ca, make_leaf

from proxy.policy.load import parse_policy
from proxy.pool import rendezvous_order

SECRET = "pool-test-secret-0123456789-abcdefghijklmnop"


class PoolUpstream(Upstream):
    """The tests' upstream on a port that can be reused (stopped and started again, as a restarted
    service), with a plain HTTP ``/health`` for path checks."""

    async def start(self, ssl_context: Any = None, port: int = 0) -> PoolUpstream:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def restart(self) -> None:
        await self.start(port=self.port)

    @staticmethod
    async def _health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def label(self, path: str = "/echo", scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def sessions_of(self, header: str) -> list[str]:
        """The value of ``header`` in each session this upstream served (health checks left out)."""
        return [_header(record, header) for record in self.records if not is_probe(record)]


def _header(record: Any, name: str) -> str:
    return next((value for key, value in record.headers.items() if key.lower() == name.lower()), "")


def is_probe(record: Any) -> bool:
    """Whether a session the upstream saw was a health check's."""
    return _header(record, "User-Agent") == "wsgate-health-check"


@pytest.fixture
async def pair() -> Any:
    started = [await PoolUpstream().start(), await PoolUpstream().start()]
    yield started
    for server in started:
        await server.stop()


@pytest.fixture
async def trio() -> Any:
    started = [await PoolUpstream().start() for _ in range(3)]
    yield started
    for server in started:
        await server.stop()


def pool_route(
    servers: list[PoolUpstream], balance: str = "round_robin", extra: str = "", path="/echo"
) -> str:
    endpoints = ", ".join(server.url(path) for server in servers)
    return f"""
    routes:
      - path: /echo
        upstream:
          endpoints: [{endpoints}]
          balance: {balance}
          {extra}
        auth: none
    """


async def metrics(gw: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    address = gw.gateway.admin_address
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{address.port}/metrics") as response,
    ):
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def open_sessions(gw: Any, count: int, **kwargs: Any) -> list[aiohttp.ClientWebSocketResponse]:
    """``count`` sessions opened one after the other, each answered once (so it is live upstream)."""
    session = aiohttp.ClientSession()
    sockets = []
    for index in range(count):
        ws = await session.ws_connect(gw.url("/echo"), **kwargs)
        await ws.send_str(f"hello {index}")
        assert (await ws.receive(timeout=10)).data == f"hello {index}"
        sockets.append(ws)
    sockets[0]._pool_test_session = session  # type: ignore[attr-defined]
    return sockets


async def close_all(sockets: list[aiohttp.ClientWebSocketResponse]) -> None:
    session = sockets[0]._pool_test_session  # type: ignore[attr-defined]
    for ws in sockets:
        await ws.close()
    await session.close()


async def handshake_status(gw: Any, **kwargs: Any) -> int:
    """Open one session and close it: 101, or the refusal's status."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(gw.url("/echo"), **kwargs) as ws:
                await ws.send_str("ping")
                assert (await ws.receive(timeout=10)).data == "ping"
                return 101
        except aiohttp.WSServerHandshakeError as error:
            return error.status


async def eventually(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -- balancing ----------------------------------------------------------------------------------------


async def test_round_robin_alternates_between_the_endpoints(gateway, pair):
    a, b = pair
    gw = await gateway(pool_route(pair))
    went = []
    for _ in range(6):
        before = len(a.records)
        assert await handshake_status(gw) == 101
        went.append("a" if len(a.records) > before else "b")
    assert went in (["a", "b"] * 3, ["b", "a"] * 3)
    live = await open_sessions(gw, 4)
    samples = await metrics(gw)
    assert sample(samples, "wsgate_upstream_sessions", route="/echo", endpoint=a.label()) == 2
    assert sample(samples, "wsgate_upstream_sessions", route="/echo", endpoint=b.label()) == 2
    await close_all(live)


async def test_least_connections_fills_the_emptier_endpoint(gateway, pair):
    a, b = pair
    gw = await gateway(pool_route(pair, "least_connections"))
    live = await open_sessions(gw, 4)
    assert (a.sessions_open, b.sessions_open) == (2, 2)
    # close both of a's sessions: find them by the message each sent
    on_a = {message for record in a.records for message in record.messages}
    for index, ws in enumerate(live):
        if f"hello {index}" in on_a:
            await ws.close()
    await eventually(lambda: _is(a.sessions_open == 0))
    more = await open_sessions(gw, 2)
    assert (a.sessions_open, b.sessions_open) == (2, 2), "both new sessions went to the emptier endpoint"
    samples = await metrics(gw)
    assert sample(samples, "wsgate_upstream_sessions", route="/echo", endpoint=a.label()) == 2
    await close_all(live)
    await close_all(more)


async def _is(value: bool) -> bool:
    return value


# -- passive health -----------------------------------------------------------------------------------


async def test_a_killed_endpoint_costs_no_failed_handshake(gateway, pair, log_events: LogCapture):
    a, b = pair
    gw = await gateway(pool_route(pair))
    for _ in range(4):
        assert await handshake_status(gw) == 101
    await b.stop()
    statuses = [await handshake_status(gw) for _ in range(10)]
    assert statuses == [101] * 10
    down = await log_events.wait_for("upstream.down", endpoint=b.label())
    assert down["route"] == "/echo" and "refused" in down["cause"]
    samples = await metrics(gw)
    assert sample(samples, "wsgate_upstream_up", route="/echo", endpoint=b.label()) == 0
    assert sample(samples, "wsgate_upstream_up", route="/echo", endpoint=a.label()) == 1
    # tried once, then left alone for its backoff (2 s) instead of costing every other handshake a connect
    assert sample(samples, "wsgate_upstream_connect_failures_total", route="/echo", endpoint=b.label()) == 1
    rejections = [key for key in samples if key[0] == "wsgate_handshake_rejections_total"]
    assert all(samples[key] == 0 for key in rejections)


async def test_every_endpoint_down_is_a_502_naming_each(gateway, pair, client):
    gw = await gateway(pool_route(pair))
    for server in pair:
        await server.stop()
    for _ in range(2):  # the second finds both marked down, and still tries them
        async with client.get(gw.http("/echo"), headers=_upgrade_headers()) as response:
            assert response.status == 502
            detail = (await response.json())["detail"]
    assert detail.startswith("no endpoint of 2 answered: ")
    assert detail.count("refused the connection") == 2
    samples = await metrics(gw)
    for server in pair:
        assert (
            sample(samples, "wsgate_upstream_connect_failures_total", route="/echo", endpoint=server.label())
            == 2
        )
    await pair[0].restart()
    assert await handshake_status(gw) == 101, "stale marks do not refuse a pool whose endpoint is back"


def _upgrade_headers() -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }


def _syn_black_hole() -> tuple[socket.socket, list[socket.socket]]:
    """A port whose accept queue is full: the kernel drops further SYNs, so a connect there hangs, as to
    a host that is gone (a firewall dropping packets)."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listening.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    return listening, fillers


async def test_an_endpoint_that_swallows_connects_costs_only_its_share_of_the_timeout(gateway, upstream):
    listening, fillers = _syn_black_hole()
    port = listening.getsockname()[1]
    try:
        gw = await gateway(
            f"""
    limits: {{upstream_connect_timeout: 2s}}
    routes:
      - path: /echo
        upstream: {{endpoints: ["ws://127.0.0.1:{port}/", "{upstream.url()}"]}}
        auth: none
    """
        )
        started = time.monotonic()
        assert await handshake_status(gw) == 101  # the first turn is the black hole's: 1 s, then the echo
        assert await handshake_status(gw) == 101
        assert time.monotonic() - started < 1.9
    finally:
        for sock in (listening, *fillers):
            sock.close()


async def test_a_slow_but_healthy_first_endpoint_keeps_the_whole_deadline_for_its_101(gateway, upstream):
    """Connected, an endpoint's 101 may take the route's whole upstream_connect_timeout: a pool turns
    no latency into 502s, and marks nothing down for it (the connect alone is bounded by its share)."""

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1.2)  # connected at once, answering late: a loaded but healthy instance
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream.port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await gateway(
        f"""
    limits: {{upstream_connect_timeout: 2s}}
    routes:
      - path: /echo
        upstream: {{endpoints: ["ws://127.0.0.1:{port}/echo", "{upstream.url()}"]}}
        auth: none
    """
    )
    try:
        assert await handshake_status(gw) == 101  # the slow one's turn
        samples = await metrics(gw)
        assert (
            sample(samples, "wsgate_upstream_up", route="/echo", endpoint=f"ws://127.0.0.1:{port}/echo") == 1
        )
    finally:
        server.close()


@pytest.mark.parametrize("answer", ["no_upgrade", "bad_accept", "extension"])
async def test_an_endpoint_answering_a_broken_101_is_taken_out(gateway, upstream, answer):
    """A 101 no request could make right (no Upgrade, a wrong accept, an extension never offered) is a
    broken endpoint, as a 5xx is: it is marked down and the next endpoint serves the handshake."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        lines = {
            "no_upgrade": b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n",
            "bad_accept": b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n",
            "extension": b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Extensions: x-y\r\n",
        }[answer]
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n" + lines + b"\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await gateway(
        f"""
    routes:
      - path: /echo
        upstream: {{endpoints: ["ws://127.0.0.1:{port}/", "{upstream.url()}"]}}
        auth: none
        compression: {{upstream: false}}
    """
    )
    try:
        assert [await handshake_status(gw) for _ in range(4)] == [101] * 4
        samples = await metrics(gw)
        assert sample(samples, "wsgate_upstream_up", route="/echo", endpoint=f"ws://127.0.0.1:{port}/") == 0
    finally:
        server.close()


async def test_a_5xx_takes_an_endpoint_out_and_a_4xx_is_the_answer(gateway, upstream, client):
    async def answering(status: int) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()

        return await asyncio.start_server(handle, "127.0.0.1", 0)

    unavailable, forbidden = await answering(503), await answering(403)
    ports = [server.sockets[0].getsockname()[1] for server in (unavailable, forbidden)]
    gw = await gateway(
        f"""
    routes:
      - path: /echo
        upstream: {{endpoints: ["ws://127.0.0.1:{ports[0]}/", "{upstream.url()}"]}}
        auth: none
      - path: /forbidden
        upstream: {{endpoints: ["ws://127.0.0.1:{ports[1]}/", "{upstream.url()}"]}}
        auth: none
    """
    )
    assert [await handshake_status(gw) for _ in range(4)] == [101] * 4
    async with client.get(gw.http("/forbidden"), headers=_upgrade_headers()) as response:
        assert response.status == 502
        assert "HTTP 403" in (await response.json())["detail"]
    samples = await metrics(gw)
    assert sample(samples, "wsgate_upstream_up", route="/echo", endpoint=f"ws://127.0.0.1:{ports[0]}/") == 0
    assert (
        sample(samples, "wsgate_upstream_up", route="/forbidden", endpoint=f"ws://127.0.0.1:{ports[1]}/") == 1
    )
    for server in (unavailable, forbidden):
        server.close()


async def test_a_host_name_is_resolved_and_each_of_its_addresses_tried(gateway, upstream):
    """``localhost`` resolves on every connect; where it resolves to several addresses (::1 and
    127.0.0.1), the loop tries each in turn, and the upstream listens on the last one only."""
    addresses = [
        info[4][0] for info in socket.getaddrinfo("localhost", upstream.port, type=socket.SOCK_STREAM)
    ]
    gw = await gateway(
        f"routes: [{{path: /echo, upstream: 'ws://localhost:{upstream.port}/echo', auth: none}}]"
    )
    assert await handshake_status(gw) == 101
    if len(addresses) < 2 or addresses[-1] != "127.0.0.1":
        pytest.skip(f"localhost resolves to {addresses} here: only the single-address case was shown")


# -- active health ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "path: /health, "], ids=["websocket", "http"])
async def test_health_checks_take_an_endpoint_out_and_bring_it_back(gateway, pair, log_events, path):
    _a, b = pair
    check = f"health_check: {{{path}interval: 200ms, timeout: 200ms, rise: 2, fall: 2}}"
    gw = await gateway(pool_route(pair, extra=check))
    await b.stop()
    down = await log_events.wait_for("upstream.down", timeout=15, endpoint=b.label())
    assert down["cause"].startswith("health check failed")
    samples = await metrics(gw)
    assert sample(samples, "wsgate_upstream_up", route="/echo", endpoint=b.label()) == 0
    assert [await handshake_status(gw) for _ in range(4)] == [101] * 4
    assert (
        sample(await metrics(gw), "wsgate_upstream_connect_failures_total", route="/echo", endpoint=b.label())
        == 0
    )
    b.records.clear()
    await b.restart()
    up = await log_events.wait_for("upstream.up", timeout=15, endpoint=b.label())
    assert up["cause"] == "health check passed"
    assert sample(await metrics(gw), "wsgate_upstream_up", route="/echo", endpoint=b.label()) == 1
    assert len(log_events.named("upstream.down")) == 1, "one line per change"
    served_before = len(b.sessions_of("X-Request-Id"))
    assert [await handshake_status(gw) for _ in range(4)] == [101] * 4
    assert len(b.sessions_of("X-Request-Id")) == served_before + 2
    if not path:  # WebSocket checks close politely
        probes = [record for record in b.records if is_probe(record)]
        await eventually(lambda: _is(any(record.closed.is_set() for record in probes)))
        assert {record.close_code for record in probes if record.closed.is_set()} == {1000}


# -- sticky hashing -----------------------------------------------------------------------------------


def hs_token(subject: str) -> str:
    return jwt.encode({"sub": subject, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")


def served_by(servers: list[PoolUpstream], header: str, value: str) -> set[int]:
    """Which servers served a session whose ``header`` (its first entry, for X-Forwarded-For) is ``value``."""
    return {
        index
        for index, server in enumerate(servers)
        if value in (seen.split(",")[0].strip() for seen in server.sessions_of(header))
    }


async def test_hash_subject_keeps_a_subject_on_its_endpoint_and_moves_only_a_dead_ones(
    gateway, trio, monkeypatch
):
    monkeypatch.setenv("WSGATE_POOL_SECRET", SECRET)
    endpoints = ", ".join(server.url() for server in trio)
    gw = await gateway(
        f"""
    auth:
      main: {{algorithms: [HS256], secret_env: WSGATE_POOL_SECRET}}
    routes:
      - path: /echo
        upstream: {{endpoints: [{endpoints}], balance: hash_subject}}
        auth: main
        forward_claims: {{sub: X-Subject}}
    """
    )
    subjects = [f"user-{index}" for index in range(40)]
    home: dict[str, int] = {}
    for subject in subjects:
        for _ in range(3):
            headers = {"Authorization": f"Bearer {hs_token(subject)}"}
            assert await handshake_status(gw, headers=headers) == 101
        where = served_by(trio, "X-Subject", subject)
        assert len(where) == 1, f"{subject} was served by {where}"
        home[subject] = where.pop()
    # the pick is the rendezvous order of the endpoints' labels: the same in every process
    labels = [server.label() for server in trio]
    assert all(labels.index(rendezvous_order(s, labels)[0]) == home[s] for s in subjects)
    assert set(home.values()) == {0, 1, 2}
    await trio[2].stop()
    for server in trio:
        server.records.clear()
    for subject in subjects:
        headers = {"Authorization": f"Bearer {hs_token(subject)}"}
        assert await handshake_status(gw, headers=headers) == 101
        (now,) = served_by(trio, "X-Subject", subject)
        if home[subject] != 2:
            assert now == home[subject], "a live endpoint's subjects stay"
        else:
            assert labels.index(rendezvous_order(subject, labels[:2])[0]) == now


async def forwarded_session(gw: Any, address: str) -> None:
    """One session from ``address`` (as the trusted proxy in front says) to the upstream's /headers."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(gw.url("/echo"), headers={"X-Forwarded-For": address}) as ws,
    ):
        await ws.receive(timeout=10)


async def test_hash_client_ip_keeps_a_client_on_its_endpoint(gateway, trio):
    endpoints = ", ".join(server.url("/headers") for server in trio)
    gw = await gateway(
        f"""
    trusted_proxies: [127.0.0.1/32]
    routes:
      - path: /echo
        upstream: {{endpoints: [{endpoints}], balance: hash_client_ip}}
        auth: none
    """
    )
    clients = [f"203.0.113.{index}" for index in range(1, 41)]
    home: dict[str, int] = {}
    for address in clients:
        for _ in range(3):
            await forwarded_session(gw, address)
        where = served_by(trio, "X-Forwarded-For", address)
        assert len(where) == 1, f"{address} was served by {where}"
        home[address] = where.pop()
    assert set(home.values()) == {0, 1, 2}
    moved = home[clients[0]]
    await trio[moved].stop()
    for server in trio:
        server.records.clear()
    for address in clients:
        await forwarded_session(gw, address)
        (now,) = served_by(trio, "X-Forwarded-For", address)
        assert (now == home[address]) == (home[address] != moved)


# -- reload ---------------------------------------------------------------------------------------------


async def test_a_reload_keeps_the_health_of_endpoints_that_stay(gateway, trio, log_events):
    a, b, c = trio
    gw = await gateway(pool_route([a, b]))
    await b.stop()
    assert [await handshake_status(gw) for _ in range(2)] == [101, 101]
    assert sample(await metrics(gw), "wsgate_upstream_up", route="/echo", endpoint=b.label()) == 0

    gw.gateway.apply_policy(parse_policy(policy_text(pool_route([a, b, c]))))
    samples = await metrics(gw)
    assert sample(samples, "wsgate_upstream_up", route="/echo", endpoint=b.label()) == 0, (
        "b is still known down"
    )
    assert sample(samples, "wsgate_upstream_connect_failures_total", route="/echo", endpoint=b.label()) == 1
    assert sample(samples, "wsgate_upstream_up", route="/echo", endpoint=c.label()) == 1
    assert [await handshake_status(gw) for _ in range(4)] == [101] * 4
    samples = await metrics(gw)
    assert sample(samples, "wsgate_upstream_connect_failures_total", route="/echo", endpoint=b.label()) == 1
    assert len(c.records) == 2

    live = await open_sessions(gw, 2)  # on a and c
    gw.gateway.apply_policy(parse_policy(policy_text(pool_route([a, b]))))
    samples = await metrics(gw)
    assert sample(samples, "wsgate_upstream_up", route="/echo", endpoint=c.label()) is None, (
        "c's state is gone"
    )
    for index, ws in enumerate(live):  # sessions on a removed endpoint run on
        await ws.send_str(f"still {index}")
        assert (await ws.receive(timeout=10)).data == f"still {index}"
    await close_all(live)
    assert len(log_events.named("upstream.down")) == 1


async def test_a_reload_keeps_active_checks_running_and_their_verdict(gateway, pair, log_events):
    a, b = pair
    check = "health_check: {interval: 200ms, timeout: 200ms, rise: 1, fall: 1}"
    gw = await gateway(pool_route(pair, extra=check))
    await b.stop()
    await log_events.wait_for("upstream.down", timeout=15, endpoint=b.label())
    new_check = check.replace("fall: 1", "fall: 2")  # a route added, and the checks' settings changed
    added = f"  - {{path: /other, upstream: {{endpoints: ['{a.url('/probe')}'], {check}}}, auth: none}}\n"
    gw.gateway.apply_policy(parse_policy(policy_text(pool_route(pair, extra=new_check) + added)))
    assert sample(await metrics(gw), "wsgate_upstream_up", route="/echo", endpoint=b.label()) == 0
    await asyncio.sleep(0.5)
    assert not log_events.named("upstream.up"), "b is not brought back by a reload"
    assert any(record.path == "/probe" and is_probe(record) for record in a.records), (
        "new endpoints are checked"
    )
    await b.restart()
    await log_events.wait_for("upstream.up", timeout=15, endpoint=b.label())
    assert len(log_events.named("upstream.down")) == 1


# -- a client certificate for a wss:// upstream -------------------------------------------------------


@pytest.fixture
def client_pki(tmp_path: Path) -> dict[str, Path]:
    ca, ca_key, ca_cert = make_ca(tmp_path, "upstream-ca")
    server_cert, server_key = make_leaf(tmp_path, "upstream", ca_key, ca_cert)
    client_ca, client_ca_key, client_ca_cert = make_ca(tmp_path, "client-ca")
    client_cert, client_key = make_leaf(tmp_path, "gateway", client_ca_key, client_ca_cert)
    return {
        "ca": ca,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_ca": client_ca,
        "client_cert": client_cert,
        "client_key": client_key,
    }


async def test_a_wss_upstream_requiring_a_client_certificate_gets_the_configured_one(gateway, client_pki):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(client_pki["server_cert"], client_pki["server_key"])
    context.load_verify_locations(cafile=str(client_pki["client_ca"]))
    context.verify_mode = ssl.CERT_REQUIRED
    server = await PoolUpstream().start(ssl_context=context)
    try:
        url = f"wss://127.0.0.1:{server.port}/echo"
        pem = client_pki
        gw = await gateway(
            f"""
        routes:
          - path: /echo
            upstream: {{endpoints: ["{url}"], health_check: {{interval: 200ms}}}}
            upstream_tls: {{ca_file: {pem["ca"]}, cert: {pem["client_cert"]}, key: {pem["client_key"]}}}
            auth: none
          - path: /nocert
            upstream: {url}
            upstream_tls: {{ca_file: {client_pki["ca"]}}}
            auth: none
        """
        )
        assert await handshake_status(gw) == 101
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(aiohttp.WSServerHandshakeError):
                async with session.ws_connect(gw.url("/nocert")):
                    raise AssertionError("a handshake without the client certificate went through")
            async with session.get(gw.http("/nocert"), headers=_upgrade_headers()) as response:
                assert response.status == 502
        samples = await metrics(gw)
        assert (
            sample(
                samples, "wsgate_upstream_up", route="/echo", endpoint=f"wss://127.0.0.1:{server.port}/echo"
            )
            == 1
        )
    finally:
        await server.stop()


# -- several workers ------------------------------------------------------------------------------------


@pytest.mark.serve_process
async def test_workers_report_endpoint_sessions_summed_and_health_by_the_minimum(
    tmp_path, pair, wsgate_process
):
    from test_workers import sessions_on_both, start_workers, until

    a, b = pair
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        policy_text(
            pool_route(pair, extra="health_check: {interval: 200ms, timeout: 200ms, rise: 1, fall: 1}")
        )
    )
    workers = await start_workers(wsgate_process, policy)

    async def merged() -> dict[tuple[str, str], float]:
        _status, text = await workers.get("/metrics")
        return {
            (sample.name, sample.labels["endpoint"]): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if "endpoint" in sample.labels
        }

    async with aiohttp.ClientSession() as session:
        opened = await sessions_on_both(session, workers)
        found = await merged()
        assert found[("wsgate_upstream_up", a.label())] == found[("wsgate_upstream_up", b.label())] == 1
        live = found[("wsgate_upstream_sessions", a.label())] + found[("wsgate_upstream_sessions", b.label())]
        assert live == len(opened) == a.sessions_open + b.sessions_open
        await b.stop()
        await until(lambda: _down(merged, b.label()), timeout=20, what="b down in the merged metrics")
        found = await merged()
        assert found[("wsgate_upstream_up", a.label())] == 1
        for ws in opened:
            await ws.close()

    async def down_in_each_worker() -> bool:
        down = [entry for entry in workers.process.events("upstream.down") if entry["endpoint"] == b.label()]
        return {entry["worker"] for entry in down} == {0, 1}

    # The merged metric is down once one worker's check failed; each worker judges on its own.
    await until(down_in_each_worker, timeout=20, what="b down in each worker's log")


async def _down(merged: Any, label: str) -> bool:
    return (await merged())[("wsgate_upstream_up", label)] == 0
