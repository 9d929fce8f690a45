"""Limits shared through a real redis-server: replicas (``wsgate serve`` processes) enforce one combined
handshake budget and one combined connection cap; a replica killed with SIGKILL gives its slots back
within ``lease_ttl``; a Redis outage follows ``limiter.on_error`` and heals by itself; passwords and TLS;
session control across replicas over pub/sub."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from conftest import RedisServer, free_port, policy_text
from wsraw import RawClient

from proxy.errors import Close, CloseCode, LimiterUnavailable
from proxy.guards.slots import LimiterSlots
from proxy.limiter.redis import MAX_CONNECTIONS, RedisLimiter
from proxy.policy.load import parse_policy
from proxy.policy.model import RedisLimiter as RedisSettings

#: What an open route on the test upstream looks like; {upstream} is filled in.
ROUTE = """
routes:
  - path: /echo
    upstream: {upstream}
    auth: none
"""


def write_policy(
    tmp_path: Path,
    name: str,
    upstream: str,
    redis: str,
    limits: str,
    on_error: str = "allow",
) -> Path:
    """A policy file for one replica: ``redis`` is the body of ``limiter.redis`` (a flow mapping's
    inside), ``limits`` that of ``limits``."""
    path = tmp_path / f"{name}.yaml"
    body = f"limiter:\n  redis: {{{redis}}}\n  on_error: {on_error}\nlimits: {{{limits}}}\n"
    path.write_text(policy_text(body + ROUTE.format(upstream=upstream)))
    return path


def redis_settings(server: RedisServer, prefix: str, extra: str = "") -> str:
    return f"url: '{server.url}', key_prefix: '{prefix}', lease_ttl: 2s, timeout: 200ms" + extra


async def serve(wsgate_process, policy: Path, env: dict[str, str] | None = None):
    process = wsgate_process("serve", "-c", str(policy), "--log-format", "json", env=env)
    listening = await process.wait_for("gateway.listening")
    port = int(listening["address"].rsplit(":", 1)[1])
    return process, port, f"http://{listening['admin']}"


async def handshake(port: int) -> tuple[int, str | None, dict[str, str]]:
    """One handshake on /echo, closed right away: its status, the refusal's reason and the headers."""
    client, response = await RawClient.connect(port, "/echo")
    client.abort()
    reason = json.loads(response.body)["error"] if response.status != 101 else None
    return response.status, reason, response.headers


async def limiter_up(client: aiohttp.ClientSession, admin: str) -> str:
    """The ``wsgate_limiter_up`` sample line of a scrape of /metrics."""
    async with client.get(f"{admin}/metrics") as response:
        text = await response.text()
    lines = [line for line in text.splitlines() if line.startswith("wsgate_limiter_up{")]
    assert len(lines) == 1, text
    return lines[0]


async def until(condition, timeout: float, step: float = 0.05):
    """Poll ``condition`` (async) until it returns something true, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await condition()
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(step)


@pytest.mark.serve_process
async def test_two_replicas_share_one_handshake_budget(redis_server, upstream, wsgate_process, tmp_path):
    server = redis_server()
    settings = redis_settings(server, f"t{uuid.uuid4().hex[:6]}:")
    limits = "handshakes_per_ip: 1/m, handshake_burst: 3"
    ports = []
    for name in ("a", "b"):
        _, port, _ = await serve(
            wsgate_process, write_policy(tmp_path, name, upstream.url(), settings, limits)
        )
        ports.append(port)
    outcomes = [await handshake(ports[number % 2]) for number in range(3 + 4)]
    assert [status for status, _, _ in outcomes] == [101, 101, 101, 429, 429, 429, 429]
    assert {reason for _, reason, _ in outcomes[3:]} == {"rate_limited"}
    assert all(int(headers["retry-after"]) >= 1 for _, _, headers in outcomes[3:])


@pytest.mark.serve_process
async def test_two_replicas_share_one_connection_cap(
    redis_server, upstream, wsgate_process, tmp_path, client
):
    server = redis_server()
    settings = redis_settings(server, f"t{uuid.uuid4().hex[:6]}:")
    ports = []
    for name in ("a", "b"):
        policy = write_policy(tmp_path, name, upstream.url(), settings, "connections_per_ip: 3")
        ports.append((await serve(wsgate_process, policy))[1])
    a, b = ports
    sessions = [await client.ws_connect(f"ws://127.0.0.1:{port}/echo") for port in (a, a, b)]
    for ws in sessions:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "hi"
    for port in (b, a):
        status, reason, headers = await handshake(port)
        assert (status, reason, headers["retry-after"]) == (429, "conn_limit", "1")
    assert server.client().zcard(next(iter(server.client().scan_iter("*ip:*")))) == 3
    await sessions.pop(0).close()

    async def admitted_on_b():
        return (await handshake(b))[0] == 101

    assert await until(admitted_on_b, timeout=3.0), (
        "a closed session on one replica frees its slot on the other"
    )
    for ws in sessions:
        await ws.close()


@pytest.mark.serve_process
async def test_a_replica_killed_with_sigkill_frees_its_slots_within_the_lease_ttl(
    redis_server, upstream, wsgate_process, tmp_path, client
):
    server = redis_server()
    settings = redis_settings(server, f"t{uuid.uuid4().hex[:6]}:")
    processes, ports = [], []
    for name in ("a", "b"):
        process, port, _ = await serve(
            wsgate_process, write_policy(tmp_path, name, upstream.url(), settings, "connections_per_ip: 2")
        )
        processes.append(process)
        ports.append(port)
    held = [await client.ws_connect(f"ws://127.0.0.1:{ports[0]}/echo") for _ in range(2)]
    # Alive, replica a keeps its leases past their TTL (2 s) by refreshing them.
    await asyncio.sleep(3.0)
    assert (await handshake(ports[1]))[:2] == (429, "conn_limit")
    processes[0].signal(signal.SIGKILL)
    killed = time.monotonic()

    async def admitted():
        return (await handshake(ports[1]))[0] == 101

    assert await until(admitted, timeout=2.0 + 1.0, step=0.1), "slots of a dead replica free within lease_ttl"
    elapsed = time.monotonic() - killed
    # The last refresh was at most lease_ttl / 3 before the kill: the slots cannot free sooner than 2/3 TTL.
    assert elapsed >= 2.0 * 2 / 3 - 0.2, elapsed
    assert len(held) == 2


@pytest.mark.serve_process
async def test_a_redis_outage_follows_on_error_and_heals_by_itself(
    redis_server, upstream, wsgate_process, tmp_path, client
):
    server = redis_server()
    replicas = {}
    for on_error in ("allow", "deny"):
        settings = redis_settings(server, f"{on_error}{uuid.uuid4().hex[:6]}:")
        policy = write_policy(tmp_path, on_error, upstream.url(), settings, "connections_per_ip: 1", on_error)
        replicas[on_error] = await serve(wsgate_process, policy)
    for _, port, admin in replicas.values():
        assert await limiter_up(client, admin) == 'wsgate_limiter_up{backend="redis"} 1.0'
        first = await client.ws_connect(f"ws://127.0.0.1:{port}/echo")
        assert (await handshake(port))[:2] == (429, "conn_limit")
        await first.close()

    server.stop()
    allow_port, deny_port = replicas["allow"][1], replicas["deny"][1]
    # on_error allow: the cap cannot be counted, so it admits (fail open); one of them stays open.
    during = [await client.ws_connect(f"ws://127.0.0.1:{allow_port}/echo") for _ in range(3)]
    for ws in during[1:]:
        await ws.close()
    # on_error deny: 503 limiter_unavailable (fail closed), fast and with Retry-After.
    started = time.monotonic()
    for _ in range(5):
        status, reason, headers = await handshake(deny_port)
        assert (status, reason, headers["retry-after"]) == (503, "limiter_unavailable", "1")
    assert time.monotonic() - started < 2.0
    for process, _, admin in replicas.values():
        assert process.process.poll() is None
        assert await limiter_up(client, admin) == 'wsgate_limiter_up{backend="redis"} 0.0'
        down = process.events("limiter.down")
        assert len(down) == 1, down
        assert down[0]["level"] in ("warning", "error") and down[0]["redis"] == server.url
        assert down[0]["error"]

    server.start()  # the same port, empty: every lease was lost with it
    for process, _, admin in replicas.values():
        await process.wait_for("limiter.up", timeout=3.0)
        assert await limiter_up(client, admin) == 'wsgate_limiter_up{backend="redis"} 1.0'
        assert len(process.events("limiter.down")) == len(process.events("limiter.up")) == 1

    async def refused_on_allow():
        return (await handshake(allow_port))[:2] == (429, "conn_limit")

    # The session admitted during the outage counts again: the cap binds at once on that replica.
    assert await until(refused_on_allow, timeout=2.0)
    await during[0].close()
    second = await client.ws_connect(f"ws://127.0.0.1:{deny_port}/echo")
    assert (await handshake(deny_port))[:2] == (429, "conn_limit")
    await second.close()


async def test_a_password_from_the_environment(redis_server, upstream, gateway, monkeypatch, log_events):
    server = redis_server("--requirepass", "correct-horse")
    monkeypatch.setenv("WSGATE_TEST_REDIS_PASSWORD", "correct-horse")
    prefix = f"p{uuid.uuid4().hex[:6]}:"
    settings = redis_settings(server, prefix, ", password_env: WSGATE_TEST_REDIS_PASSWORD")
    body = f"limiter: {{redis: {{{settings}}}, on_error: deny}}\nlimits: {{connections_per_ip: 1}}\n"
    gw = await gateway(body + ROUTE.format(upstream=upstream.url()))
    async with aiohttp.ClientSession() as client:
        ws = await client.ws_connect(gw.url())
        assert (await handshake(gw.port))[:2] == (429, "conn_limit")
        assert server.client(password="correct-horse").zcard(f"{prefix}ip:127.0.0.1") == 1
        await ws.close()
    assert log_events.named("limiter.down") == []


async def test_a_wrong_password_is_a_limiter_down_not_a_crash(
    redis_server, upstream, gateway, monkeypatch, log_events
):
    server = redis_server("--requirepass", "correct-horse")
    monkeypatch.setenv("WSGATE_TEST_REDIS_PASSWORD", "battery-staple")
    settings = redis_settings(
        server, f"p{uuid.uuid4().hex[:6]}:", ", password_env: WSGATE_TEST_REDIS_PASSWORD"
    )
    body = f"limiter: {{redis: {{{settings}}}, on_error: deny}}\nlimits: {{connections_per_ip: 1}}\n"
    gw = await gateway(body + ROUTE.format(upstream=upstream.url()))
    for _ in range(3):
        assert (await handshake(gw.port))[:2] == (503, "limiter_unavailable")
    down = log_events.named("limiter.down")
    assert len(down) == 1, down
    assert "battery-staple" not in json.dumps(log_events.events, default=str)
    assert gw.gateway.metrics.limiter_state() == ("redis", False)


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed: (cert, key, CA) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key, issuer: str, signer, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("wsgate test CA", ca_key, "wsgate test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("127.0.0.1", key, "wsgate test CA", ca_key, ca=False)
    files = directory / "server.pem", directory / "server.key", directory / "ca.pem"
    files[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files[2].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return files


async def test_rediss_with_a_ca_file(redis_server, upstream, gateway, tmp_path, log_events):
    tls = _certificates(tmp_path)
    server = redis_server(tls=tls)
    settings = redis_settings(server, f"s{uuid.uuid4().hex[:6]}:", f", ca_file: '{tls[2]}'")
    body = f"limiter: {{redis: {{{settings}}}, on_error: deny}}\nlimits: {{connections_per_ip: 1}}\n"
    gw = await gateway(body + ROUTE.format(upstream=upstream.url()))
    async with aiohttp.ClientSession() as client:
        ws = await client.ws_connect(gw.url())
        assert (await handshake(gw.port))[:2] == (429, "conn_limit")
        await ws.close()
    assert log_events.named("limiter.down") == []
    # Without the CA file the server's certificate is not trusted: the limiter is down, not lied to.
    untrusted = await gateway(
        body.replace(f", ca_file: '{tls[2]}'", "") + ROUTE.format(upstream=upstream.url())
    )
    assert (await handshake(untrusted.port))[:2] == (503, "limiter_unavailable")
    down = log_events.named("limiter.down")
    assert len(down) == 1 and "certificate" in down[0]["error"].lower(), down


def close_by_path(gw, selector: dict, reason: str) -> int:
    """A local close for the test: this replica's sessions on ``selector["path"]``, closed 1008."""
    matching = [session for session in gw.sessions if session.request_path == selector.get("path")]
    for session in matching:
        session.close(Close(CloseCode.POLICY_VIOLATION, reason))
    return len(matching)


#: The admin section of the cluster tests: close requests are signed with the admin token.
ADMIN = 'admin: {address: "127.0.0.1:0", token_env: WSGATE_TEST_ADMIN_TOKEN}\n'


async def test_close_everywhere_closes_matching_sessions_on_every_replica(
    redis_server, upstream, gateway, log_events, monkeypatch
):
    monkeypatch.setenv("WSGATE_TEST_ADMIN_TOKEN", "cluster-admin-token")
    server = redis_server()
    settings = redis_settings(server, f"c{uuid.uuid4().hex[:6]}:")
    body = ADMIN + f"limiter: {{redis: {{{settings}}}}}\nroutes:\n"
    for path in ("/a", "/b"):
        body += f"  - {{path: {path}, upstream: '{upstream.url()}', auth: none}}\n"
    replicas = [await gateway(body) for _ in range(2)]
    for replica in replicas:
        replica.gateway.local_close = lambda selector, reason, gw=replica.gateway: close_by_path(
            gw, selector, reason
        )
        assert replica.gateway.cluster is not None
        await asyncio.wait_for(replica.gateway.cluster.subscribed.wait(), 5)
    async with aiohttp.ClientSession() as client:
        on_a = [await client.ws_connect(replica.url("/a")) for replica in (*replicas, replicas[0])]
        on_b = await client.ws_connect(replicas[1].url("/b"))
        # Noise on the channel changes nothing, and neither does a request without the admin token's
        # signature (anyone who may PUBLISH on this Redis could send one).
        server.client().publish(replicas[0].gateway.cluster.requests, b"\xff not json")
        server.client().publish(replicas[0].gateway.cluster.requests, b"[" * (1 << 20))  # not even parsed
        forged = {"id": "forged", "selector": {"path": "/a"}, "reason": "forged", "mac": "0" * 64}
        server.client().publish(replicas[0].gateway.cluster.requests, json.dumps(forged))
        await log_events.wait_for("cluster.refused", reason="bad signature")
        started = time.monotonic()
        answer = await replicas[0].gateway.cluster.close_everywhere({"path": "/a"}, "closed by operator")
        assert answer == {"closed": 3, "replicas": 2}
        for ws in on_a:
            message = await ws.receive(timeout=1.0)
            assert (message.type, message.data, message.extra) == (
                aiohttp.WSMsgType.CLOSE,
                1008,
                "closed by operator",
            )
        assert time.monotonic() - started < 1.0 + 0.5
        await on_b.send_str("still here")
        assert (await on_b.receive(timeout=5)).data == "still here"
        await on_b.close()
    assert len(log_events.named("cluster.bad_message")) == 4  # seen by both replicas, once each


async def test_a_hung_redis_costs_each_decision_at_most_the_timeout(
    redis_server, upstream, gateway, log_events
):
    server = redis_server()
    settings = redis_settings(server, f"h{uuid.uuid4().hex[:6]}:")
    body = f"limiter: {{redis: {{{settings}}}, on_error: deny}}\nlimits: {{connections_per_ip: 2}}\n"
    gw = await gateway(body + ROUTE.format(upstream=upstream.url()))
    assert (await handshake(gw.port))[0] == 101
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        assert (await handshake(gw.port))[:2] == (503, "limiter_unavailable")
        assert time.monotonic() - started < 0.2 + 0.5  # the timeout (200ms), not the OS's
        started = time.monotonic()
        for _ in range(5):  # known down: no wait at all
            assert (await handshake(gw.port))[:2] == (503, "limiter_unavailable")
        assert time.monotonic() - started < 0.5
        assert len(log_events.named("limiter.down")) == 1
    finally:
        server.process.send_signal(signal.SIGCONT)
    await log_events.wait_for("limiter.up", timeout=3.0)

    async def admitted():
        return (await handshake(gw.port))[0] == 101

    # What the hung server read meanwhile (a lease asked for and given up on) is undone once it is back,
    # well before that lease's TTL (2 s) would free it.
    assert await until(admitted, timeout=1.0)


async def test_a_reload_counts_new_handshakes_in_the_redis_it_names(redis_server, upstream, gateway):
    server = redis_server()
    prefix = f"r{uuid.uuid4().hex[:6]}:"
    route = ROUTE.format(upstream=upstream.url())
    gw = await gateway("limits: {connections_per_ip: 1}\n" + route)
    in_memory = gw.gateway.limiter
    async with aiohttp.ClientSession() as client:
        before = await client.ws_connect(gw.url())
        assert (await handshake(gw.port))[:2] == (429, "conn_limit")
        settings = redis_settings(server, prefix)
        body = f"limiter: {{redis: {{{settings}}}}}\nlimits: {{connections_per_ip: 1}}\n" + route
        gw.gateway.apply_policy(parse_policy(policy_text(body)))
        after = await client.ws_connect(gw.url())  # Redis counts from zero
        assert (await handshake(gw.port))[:2] == (429, "conn_limit")
        assert server.client().zcard(f"{prefix}ip:127.0.0.1") == 1
        await before.close()

        async def memory_released():
            return in_memory.tracked_keys == 0

        assert await until(memory_released, timeout=2.0), "a session gives back to the limiter it took from"
        await after.close()

        async def redis_released():
            return server.client().zcard(f"{prefix}ip:127.0.0.1") == 0

        assert await until(redis_released, timeout=2.0)


async def test_cluster_control_comes_back_with_redis(
    redis_server, upstream, gateway, log_events, monkeypatch
):
    monkeypatch.setenv("WSGATE_TEST_ADMIN_TOKEN", "cluster-admin-token")
    server = redis_server()
    settings = redis_settings(server, f"k{uuid.uuid4().hex[:6]}:")
    body = ADMIN + f"limiter: {{redis: {{{settings}}}}}\n" + ROUTE.format(upstream=upstream.url())
    replicas = [await gateway(body) for _ in range(2)]
    clusters = [replica.gateway.cluster for replica in replicas]
    for replica, cluster in zip(replicas, clusters, strict=True):
        assert cluster is not None
        replica.gateway.local_close = lambda selector, reason, gw=replica.gateway: close_by_path(
            gw, selector, reason
        )
        await asyncio.wait_for(cluster.subscribed.wait(), 5)
    server.stop()
    with pytest.raises(LimiterUnavailable):
        await clusters[0].close_everywhere({"path": "/echo"}, "bye")

    async def logged(name: str, count: int = 2):
        return len(log_events.named(name)) == count

    assert await until(lambda: logged("cluster.unsubscribed"), timeout=3.0)
    assert not any(cluster.subscribed.is_set() for cluster in clusters)
    server.start()
    assert await until(lambda: logged("cluster.subscribed", 4), timeout=3.0)  # at start, then again
    assert all(cluster.subscribed.is_set() for cluster in clusters)
    async with aiohttp.ClientSession() as client:
        sessions = [await client.ws_connect(replica.url()) for replica in replicas]
        answer = await clusters[1].close_everywhere({"path": "/echo"}, "bye")
        assert answer == {"closed": 2, "replicas": 2}
        for ws in sessions:
            assert (await ws.receive(timeout=1.0)).type == aiohttp.WSMsgType.CLOSE


async def test_the_keys_in_redis_are_as_documented(redis_server):
    server = redis_server()
    prefix = f"d{uuid.uuid4().hex[:6]}:"
    settings = RedisSettings(url=server.url, key_prefix=prefix, lease_ttl=30.0)
    limiter = RedisLimiter(settings, "deny", replica="replica-1")
    limiter.start()
    redis = server.client()
    try:
        # GCRA: a burst of 5 at 10/s, then one per 100 ms; the key lives at most burst / rate.
        assert [await limiter.hit("hs:192.0.2.1", 10.0, 5) for _ in range(5)] == [0.0] * 5
        wait = await limiter.hit("hs:192.0.2.1", 10.0, 5)
        assert 0.05 < wait <= 0.1
        assert 0 < redis.pttl(f"{prefix}hs:192.0.2.1") <= 501
        # Leases: one member per slot, scored with its expiry; the key goes with its last lease.
        assert [await limiter.acquire("ip:192.0.2.1", 2) for _ in range(3)] == [True, True, False]
        members = redis.zrange(f"{prefix}ip:192.0.2.1", 0, -1, withscores=True)
        assert [member for member, _ in members] == [b"replica-1:1", b"replica-1:2"]
        now_ms = redis.time()[0] * 1000
        assert all(now_ms + 29_000 < score <= now_ms + 31_000 for _, score in members)
        assert 29_000 < redis.pttl(f"{prefix}ip:192.0.2.1") <= 30_000
        await limiter.release("ip:192.0.2.1")
        await limiter.release("ip:192.0.2.1")
        assert redis.exists(f"{prefix}ip:192.0.2.1") == 0
        assert limiter.held == 0
    finally:
        await limiter.close()


def limiter_for(server: RedisServer, prefix: str, on_error: str = "deny", **settings) -> RedisLimiter:
    values = {"url": server.url, "key_prefix": prefix, "timeout": 0.05, "lease_ttl": 30.0, **settings}
    limiter = RedisLimiter(RedisSettings(**values), on_error)  # type: ignore[arg-type]
    limiter.start()
    return limiter


async def test_a_burst_of_decisions_queues_here_and_never_marks_a_healthy_redis_down(
    redis_server, log_events
):
    """Thousands of handshakes at once (a reconnect storm after a deploy) from distinct clients: each
    waits for one of the limiter's connections, and Redis stays up. Only the first wave may time out
    (their answers come while this loop is still busy starting 3000 decisions: read too late), and
    each of those costs only its own decision (on_error deny: a 503), never everyone's. The timeout is
    0.2 s, still well below the time the burst waits in the queue (3000 decisions take longer than that),
    so a wait in the queue counted as Redis being slow would still fail the test; at 50 ms a machine
    busy with other work also delays answers of the second wave past it."""
    server = redis_server()
    limiter = limiter_for(server, f"q{uuid.uuid4().hex[:6]}:", timeout=0.2)
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            *(limiter.hit(f"hs:client{n}", 5.0, 5) for n in range(3000)), return_exceptions=True
        )
        assert time.monotonic() - started > 0.2  # the last decisions waited longer than the timeout
        refused = [result for result in results if isinstance(result, BaseException)]
        assert len(refused) <= MAX_CONNECTIONS, (len(refused), refused[:1])
        assert results.count(0.0) == 3000 - len(refused)
        await asyncio.sleep(0.5)  # a check of Redis that a timeout started has ended
        assert limiter.up and log_events.named("limiter.down") == []
        assert await limiter.hit("hs:after", 5.0, 5) == 0.0
    finally:
        await limiter.close()


async def test_a_slot_released_while_redis_is_away_is_free_once_it_is_back(redis_server, log_events):
    server = redis_server()
    prefix = f"w{uuid.uuid4().hex[:6]}:"
    limiter = limiter_for(server, prefix, on_error="allow")
    try:
        assert await limiter.acquire("ip:a", 1)
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)  # a hiccup: the next decision times out
        await asyncio.sleep(0.1)  # longer than the timeout since Redis last answered: it is down
        try:
            assert await limiter.hit("hs:b", 1.0, 1) == 0.0  # on_error allow
            assert await until(lambda: _async(not limiter.up), timeout=1.0)  # its check failed too
            await limiter.release("ip:a")  # the session ends while Redis cannot hear it
        finally:
            server.process.send_signal(signal.SIGCONT)
        await log_events.wait_for("limiter.up", timeout=3.0)
        assert await until(lambda: _async(server.client().zcard(prefix + "ip:a") == 0), timeout=1.0)
        assert await limiter.acquire("ip:a", 1)  # the client reconnects: its old slot is free
    finally:
        await limiter.close()


async def test_a_handshake_cancelled_while_redis_took_its_slot_leaves_no_slot_behind(redis_server):
    server = redis_server()
    prefix = f"x{uuid.uuid4().hex[:6]}:"
    limiter = limiter_for(server, prefix, timeout=2.0)
    other = server.client()
    try:
        assert await limiter.acquire("ip:warm", 5)
        await limiter.release("ip:warm")
        # Redis busy for 300 ms: the lease request waits in its queue while the handshake is cancelled.
        busy = asyncio.get_running_loop().run_in_executor(
            None,
            other.eval,
            "local t = redis.call('TIME') local start = t[1] * 1e6 + t[2] while true do "
            "local u = redis.call('TIME') if u[1] * 1e6 + u[2] - start > 300000 then break end end return 1",
            0,
        )
        await asyncio.sleep(0.05)
        slots = LimiterSlots(limiter)
        taking = asyncio.ensure_future(slots.acquire("ip:x", 1))
        await asyncio.sleep(0.1)
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        await slots.release()
        await busy
        assert await until(lambda: _async(other.zcard(prefix + "ip:x") == 0), timeout=1.0)
        assert await limiter.acquire("ip:x", 1)
    finally:
        await limiter.close()


async def test_a_read_only_redis_keeps_the_limiter_down_instead_of_flapping(redis_server, log_events):
    """A Redis that became a read-only replica (a failover behind the same address) answers PING but
    refuses every lease: the limiter goes down once and stays down until writes work again."""
    server = redis_server()
    limiter = limiter_for(server, f"f{uuid.uuid4().hex[:6]}:", on_error="allow", timeout=0.2)
    admin = server.client()
    try:
        assert await limiter.acquire("ip:warm", 5)
        admin.replicaof("127.0.0.1", str(free_port()))  # a master that is not there: read-only
        assert await limiter.acquire("ip:a", 5)  # refused by Redis: allowed, as a phantom
        assert not limiter.up
        await asyncio.sleep(2.0)  # four probes
        assert len(log_events.named("limiter.down")) == 1
        assert log_events.named("limiter.up") == []
        admin.replicaof("NO", "ONE")
        await log_events.wait_for("limiter.up", timeout=3.0)
        assert len(log_events.named("limiter.down")) == 1
    finally:
        admin.replicaof("NO", "ONE")
        await limiter.close()


async def _async(value):
    return value


async def test_a_close_request_is_judged_as_the_admin_api_judges_it(
    redis_server, upstream, gateway, log_events, monkeypatch
):
    """Even signed, a request naming no session field (``{}``: every session) or with a reason that does
    not fit a close frame closes nothing; a replica without an admin token acts on no request."""
    from proxy.cluster import _mac

    token = "cluster-admin-token"
    monkeypatch.setenv("WSGATE_TEST_ADMIN_TOKEN", token)
    server = redis_server()
    settings = redis_settings(server, f"j{uuid.uuid4().hex[:6]}:")
    limiter = f"limiter: {{redis: {{{settings}}}}}\n" + ROUTE.format(upstream=upstream.url())
    signed, unsigned = await gateway(ADMIN + limiter), await gateway(limiter)
    for replica in (signed, unsigned):
        assert replica.gateway.cluster is not None
        await asyncio.wait_for(replica.gateway.cluster.subscribed.wait(), 5)
    channel = signed.gateway.cluster.requests
    async with aiohttp.ClientSession() as client:
        sessions = [await client.ws_connect(replica.url()) for replica in (signed, unsigned)]
        for number, (selector, reason) in enumerate([({}, "all"), ({"route": "/echo"}, "r" * 124)]):
            request = {"id": f"r{number}", "selector": selector, "reason": reason}
            server.client().publish(channel, json.dumps({**request, "mac": _mac(token, request)}))
        await until(lambda: _async(len(log_events.named("cluster.refused")) >= 4), timeout=3.0)
        refused = sorted(entry["reason"] for entry in log_events.named("cluster.refused"))
        assert len(refused) == 4, refused
        assert refused.count("no admin token on this replica") == 2
        assert any("name at least one of" in reason for reason in refused)
        assert any("a close reason holds at most 123" in reason for reason in refused)
        for ws in sessions:
            await ws.send_str("still here")
            assert (await ws.receive(timeout=5)).data == "still here"
            await ws.close()


async def test_connections_redis_closed_while_idle_are_replaced_not_taken_for_an_outage(
    redis_server, log_events
):
    """Redis closes idle clients (its ``timeout``, a restart, ``CLIENT KILL``): the next decisions get
    fresh connections, are decided by Redis, and the limiter stays up."""
    server = redis_server()
    limiter = limiter_for(server, f"k{uuid.uuid4().hex[:6]}:")
    try:
        assert await asyncio.gather(*(limiter.hit(f"hs:c{n}", 5.0, 5) for n in range(8))) == [0.0] * 8
        assert server.client().client_kill_filter(_type="normal", skipme=True) >= 1
        assert await limiter.hit("hs:after", 1.0, 1) == 0.0
        assert await limiter.hit("hs:after", 1.0, 1) > 0  # decided by Redis: the burst of 1 is spent
        assert limiter.up and log_events.named("limiter.down") == []
    finally:
        await limiter.close()


async def test_closing_the_limiter_of_a_redis_that_never_answers_takes_seconds_not_forever(log_events):
    """A partitioned Redis host accepts TCP and never answers: decisions follow on_error, the probe
    keeps timing out, and closing the limiter (a drain, a reload that drops limiter.redis) still ends
    within its bound instead of hanging the shutdown."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = {"url": f"redis://127.0.0.1:{port}/0", "key_prefix": "h:", "timeout": 0.05, "lease_ttl": 30.0}
    limiter = RedisLimiter(RedisSettings(**settings), "allow")  # type: ignore[arg-type]
    limiter.start()
    try:
        assert await limiter.acquire("ip:a", 5)  # no answer: allowed, on_error allow
        await log_events.wait_for("limiter.down", timeout=3.0)
        await asyncio.sleep(0.7)  # a probe is in flight
        started = time.monotonic()
        await asyncio.wait_for(limiter.close(), timeout=10)
        assert time.monotonic() - started < 5.0
    finally:
        server.close()
        for writer in held:
            writer.close()
