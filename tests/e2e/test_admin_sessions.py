"""The admin session API: GET /sessions lists who is connected, POST /sessions/close closes them 1008.

Both exist only when the policy names an ``admin.token_env``, and answer only to that bearer token.
Sessions here carry HS256 tokens minted with PyJWT; client IPs come through X-Forwarded-For from a trusted
proxy (the test itself, on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from conftest import policy_text
from test_hosts_tls import client_context, pki, tls_listen  # noqa: F401 - pki is a fixture

from proxy.errors import AdminRequestError
from proxy.policy.load import parse_policy
from proxy.session_control import Selector, close_reason, close_request

SECRET = "s" * 40
ADMIN_TOKEN = "admin-token-0123456789-\u00e9"  # not ASCII: compared as bytes
ISSUER = "https://issuer.test"
AUDIENCE = "chat"


def user_token(subject: str, token_id: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 300}
    claims["jti"] = token_id or uuid.uuid4().hex
    return jwt.encode(claims, SECRET, algorithm="HS256")


def admin_policy(upstream: Any, token_env: bool = True) -> str:
    admin = '{address: "127.0.0.1:0", token_env: WSGATE_TEST_ADMIN_TOKEN}' if token_env else None
    admin_line = f"admin: {admin}\n" if admin else ""
    return f"""
{admin_line}trusted_proxies: [127.0.0.1/32]
limits: {{close_timeout: 1s}}
auth:
  main:
    algorithms: [HS256]
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    secret_env: WSGATE_TEST_SECRET
routes:
  - path: /echo
    upstream: {upstream.url("/echo")}
    auth: main
  - path: /other
    upstream: {upstream.url("/echo")}
    auth: main
"""


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGATE_TEST_SECRET", SECRET)
    monkeypatch.setenv("WSGATE_TEST_ADMIN_TOKEN", ADMIN_TOKEN)


def admin_url(gw: Any, path: str) -> str:
    return f"http://127.0.0.1:{gw.gateway.admin_address.port}{path}"


def authorized(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def session(
    client: aiohttp.ClientSession, gw: Any, subject: str, ip: str, path: str = "/echo", **token: Any
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    headers = {"Authorization": f"Bearer {user_token(subject, **token)}", "X-Forwarded-For": ip}
    async with client.ws_connect(gw.url(path), headers=headers) as ws:
        await ws.send_str("hello")
        reply = await ws.receive(timeout=5)
        assert reply.data == "hello"
        yield ws


async def listed(client: aiohttp.ClientSession, gw: Any, query: str = "") -> list[dict[str, Any]]:
    async with client.get(admin_url(gw, "/sessions" + query), headers=authorized()) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    assert isinstance(body, list)
    return body


async def close(client: aiohttp.ClientSession, gw: Any, body: Any, **kwargs: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    headers = {**authorized(), "Content-Type": "application/json", **kwargs.pop("headers", {})}
    async with client.post(admin_url(gw, "/sessions/close"), data=data, headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text.startswith("{") else text


async def test_without_token_env_the_session_endpoints_do_not_exist(gateway, upstream, client, secrets):
    gw = await gateway(admin_policy(upstream, token_env=False))
    async with client.get(admin_url(gw, "/no-such-path")) as response:
        unknown = (response.status, await response.text())
    assert unknown[0] == 404
    for method, path in (
        ("GET", "/sessions"),
        ("POST", "/sessions/close"),
        ("GET", "/sessions/close"),
        ("DELETE", "/sessions"),
    ):
        async with client.request(method, admin_url(gw, path), headers=authorized(), json={}) as response:
            assert (response.status, await response.text()) == unknown
            assert "WWW-Authenticate" not in response.headers


async def test_missing_or_wrong_token_is_401_and_never_logged(gateway, upstream, client, secrets, log_events):
    gw = await gateway(admin_policy(upstream))
    async with session(client, gw, "alice", "10.0.0.1") as ws:
        for headers in (
            {},
            {"Authorization": "Basic " + ADMIN_TOKEN},
            {"Authorization": "Bearer"},
            authorized("wrong"),
            authorized(ADMIN_TOKEN + "x"),
            authorized(ADMIN_TOKEN[:-1]),
        ):
            async with client.get(admin_url(gw, "/sessions"), headers=headers) as response:
                assert response.status == 401, headers
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await response.json())["error"] == "unauthorized"
            async with client.post(
                admin_url(gw, "/sessions/close"), headers=headers, json={"subject": "alice"}
            ) as response:
                assert response.status == 401
        assert not ws.closed
        async with client.get(admin_url(gw, "/sessions/close"), headers=authorized()) as response:
            assert response.status == 405  # the right token learns the method; others learn nothing
        async with client.get(admin_url(gw, "/sessions/close")) as response:
            assert response.status == 401
        status, answer = await close(client, gw, {"subject": "nobody"})
        assert (status, answer) == (200, {"closed": 0})
    await log_events.wait_for("admin.sessions_closed", subject="nobody", closed=0)
    assert ADMIN_TOKEN not in repr(log_events.events)


async def test_listing_describes_sessions_and_filters(gateway, upstream, client, secrets):
    gw = await gateway(admin_policy(upstream))
    async with (
        session(client, gw, "alice", "10.1.0.5", token_id="alice-1") as alice,
        session(client, gw, "bob", "10.2.0.9") as bob,
        session(client, gw, "carol", "192.0.2.7", path="/other"),
    ):
        await alice.send_bytes(b"x" * 100)
        await alice.receive(timeout=5)
        everyone = await listed(client, gw)
        assert sorted(entry["subject"] for entry in everyone) == ["alice", "bob", "carol"]
        (entry,) = await listed(client, gw, "?subject=alice")
        assert entry["route"] == "/echo"
        assert entry["client_ip"] == "10.1.0.5"
        assert entry["token_id"] == "alice-1"
        assert entry["provider"] == "main"
        assert entry["request_id"]
        assert entry["opened_at"].endswith("Z")
        assert abs(entry["opened_at_unix"] - time.time()) < 30
        assert entry["messages"] == {"client_to_upstream": 2, "upstream_to_client": 2}
        assert entry["bytes"] == {"client_to_upstream": 105, "upstream_to_client": 105}
        assert "claims" not in entry and "token" not in json.dumps(entry).lower().replace("token_id", "")
        (by_id,) = await listed(client, gw, f"?request_id={entry['request_id']}")
        assert by_id["subject"] == "alice"
        assert [e["subject"] for e in await listed(client, gw, "?client_ip=10.0.0.0/8")] == ["alice", "bob"]
        assert [e["subject"] for e in await listed(client, gw, "?client_ip=10.2.0.9")] == ["bob"]
        assert [e["subject"] for e in await listed(client, gw, "?route=/other")] == ["carol"]
        assert await listed(client, gw, "?route=/echo&subject=carol") == []
        assert [e["subject"] for e in await listed(client, gw, "?token_id=alice-1")] == ["alice"]
        for query, message in (
            ("?user=alice", "unknown field 'user'"),
            ("?client_ip=10.0.0.0/33", "client_ip must be an IP address or a CIDR network"),
            ("?subject=", "subject must not be empty"),
            ("?subject=a&subject=b", "given more than once"),
        ):
            async with client.get(admin_url(gw, "/sessions" + query), headers=authorized()) as response:
                assert response.status == 400, query
                assert message in (await response.json())["detail"]
        assert not bob.closed


async def wait_closed_upstream(upstream: Any, count: int) -> list[Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        closed = [record for record in upstream.records if record.closed.is_set()]
        if len(closed) >= count:
            return closed
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} upstream sessions closed")


async def test_close_by_subject_closes_both_sides_with_1008_and_leaves_others(
    gateway, upstream, client, secrets, log_events
):
    gw = await gateway(admin_policy(upstream))
    async with (
        session(client, gw, "alice", "10.1.0.5") as first,
        session(client, gw, "alice", "10.1.0.6", path="/other") as second,
        session(client, gw, "bob", "10.1.0.7") as bob,
    ):
        status, answer = await close(client, gw, {"subject": "alice", "reason": "account suspended"})
        assert (status, answer) == (200, {"closed": 2})
        for ws in (first, second):
            message = await ws.receive(timeout=5)
            assert message.type == WSMsgType.CLOSE
            assert (message.data, message.extra) == (1008, "account suspended")
        closed = await wait_closed_upstream(upstream, 2)
        assert [record.close_code for record in closed] == [1008, 1008]
        await bob.send_str("still here")
        assert (await bob.receive(timeout=5)).data == "still here"
        assert [entry["subject"] for entry in await listed(client, gw)] == ["bob"]
        entry = await log_events.wait_for("admin.sessions_closed", subject="alice")
        assert entry["closed"] == 2 and entry["reason"] == "account suspended"
        # the default reason
        assert await close(client, gw, {"subject": "bob"}) == (200, {"closed": 1})
        message = await bob.receive(timeout=5)
        assert (message.data, message.extra) == (1008, "closed by operator")


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"not json", 400, "the body must be a JSON object"),
        (b"\xff\xfe", 400, "the body must be a JSON object"),
        (b"", 400, "the body must be a JSON object"),
        (b"[" * 15000, 400, "the body must be a JSON object"),
        ([{"subject": "alice"}], 400, "the body must be a JSON object, not an array"),
        ({}, 400, "name at least one of subject, token_id, client_ip, route, request_id, provider"),
        ({"reason": "bye"}, 400, "name at least one of"),
        ({"subject": "alice", "user": "x"}, 400, "unknown field 'user'"),
        ({"subject": 7}, 400, "subject must be a string, not a number"),
        ({"subject": None}, 400, "subject must be a string, not null"),
        ({"client_ip": "10.0.0.0/40"}, 400, "client_ip must be an IP address or a CIDR network"),
        ({"subject": "alice", "reason": "x" * 124}, 400, "reason is 124 bytes of UTF-8"),
        ({"subject": "alice", "reason": "\u00e9" * 62}, 400, "reason is 124 bytes"),
        ({"subject": "alice", "reason": ""}, 400, "reason must not be empty"),
        ({"subject": "alice", "reason": 5}, 400, "reason must be a string"),
        (json.dumps({"subject": "alice", "pad": "x" * 20000}).encode(), 413, None),
    ],
)
async def test_bad_close_requests_change_nothing(gateway, upstream, client, secrets, body, status, detail):
    gw = await gateway(admin_policy(upstream))
    async with session(client, gw, "alice", "10.1.0.5") as ws:
        got, answer = await close(client, gw, body)
        assert got == status, answer
        if detail is not None:
            assert answer["error"] == "bad_request"
            assert detail in answer["detail"]
        assert len(await listed(client, gw)) == 1
        await ws.send_str("still open")
        assert (await ws.receive(timeout=5)).data == "still open"


async def test_a_reason_of_exactly_123_bytes_is_sent_whole(gateway, upstream, client, secrets):
    gw = await gateway(admin_policy(upstream))
    reason = "\u00e9" * 61 + "x"  # 123 bytes of UTF-8
    async with session(client, gw, "alice", "10.1.0.5") as ws:
        assert await close(client, gw, {"client_ip": "10.1.0.0/24", "reason": reason}) == (200, {"closed": 1})
        message = await ws.receive(timeout=5)
        assert (message.data, message.extra) == (1008, reason)


async def test_the_token_is_read_from_the_policy_at_request_time(
    gateway, upstream, client, secrets, monkeypatch
):
    gw = await gateway(admin_policy(upstream))
    async with client.get(admin_url(gw, "/sessions"), headers=authorized()) as response:
        assert response.status == 200
    # A reloaded policy reads the variable again: the new token works at once, the old one no more.
    monkeypatch.setenv("WSGATE_TEST_ADMIN_TOKEN", "rotated-token")
    gw.gateway.apply_policy(parse_policy(policy_text(admin_policy(upstream))))
    async with client.get(admin_url(gw, "/sessions"), headers=authorized()) as response:
        assert response.status == 401
    async with client.get(admin_url(gw, "/sessions"), headers=authorized("rotated-token")) as response:
        assert response.status == 200
    # And a policy without admin.token_env takes the endpoints away.
    gw.gateway.apply_policy(parse_policy(policy_text(admin_policy(upstream, token_env=False))))
    async with client.get(admin_url(gw, "/sessions"), headers=authorized("rotated-token")) as response:
        assert response.status == 404


async def test_a_chunked_body_over_the_limit_is_413(gateway, upstream, client, secrets):
    gw = await gateway(admin_policy(upstream))

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"subject": "alice", "pad": "'
        for _ in range(40):
            yield b"x" * 1024
        yield b'"}'

    async with session(client, gw, "alice", "10.1.0.5") as ws:
        async with client.post(
            admin_url(gw, "/sessions/close"), data=chunks(), headers=authorized()
        ) as response:
            assert response.status == 413
        assert not ws.closed
        assert len(await listed(client, gw)) == 1


@pytest.mark.serve_process
async def test_serve_process_guards_sessions_and_never_logs_the_token(
    wsgate_process, upstream, client, tmp_path
):
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(admin_policy(upstream)))
    env = {"WSGATE_TEST_SECRET": SECRET, "WSGATE_TEST_ADMIN_TOKEN": ADMIN_TOKEN}
    process = wsgate_process("serve", "-c", str(path), env=env)
    listening = await process.wait_for("gateway.listening")
    port = int(listening["address"].rsplit(":", 1)[1])
    admin = f"http://{listening['admin']}"
    headers = {"Authorization": f"Bearer {user_token('alice')}", "X-Forwarded-For": "10.9.0.1"}
    async with client.ws_connect(f"ws://127.0.0.1:{port}/echo", headers=headers) as ws:
        async with client.get(f"{admin}/sessions", headers=authorized("guess")) as response:
            assert response.status == 401
        async with client.get(f"{admin}/sessions?client_ip=10.9.0.0/16", headers=authorized()) as response:
            assert [entry["subject"] for entry in await response.json()] == ["alice"]
        async with client.post(
            f"{admin}/sessions/close", json={"subject": "alice", "reason": "bye"}, headers=authorized()
        ) as response:
            assert await response.json() == {"closed": 1}
        message = await ws.receive(timeout=5)
        assert (message.data, message.extra) == (1008, "bye")
    entry = await process.wait_for("admin.sessions_closed")
    assert entry["subject"] == "alice" and entry["closed"] == 1
    process.signal()
    assert await process.wait_exit() == 0
    output = "\n".join(process.lines + process.stderr)
    assert ADMIN_TOKEN not in output
    assert ADMIN_TOKEN.encode("unicode_escape").decode() not in output


# -- the selector itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"subject": "alice"},
        {"client_ip": "10.0.0.0/8", "route": "/echo"},
        {"client_ip": "2001:db8::/32", "token_id": "t", "request_id": "r", "subject": "s"},
        {"host": "*.Rooms.example.com", "endpoint": "wss://10.0.0.5/chat?key=x"},
        {"host": "[2001:DB8::1]", "endpoint": "ws://[2001:db8::1]:8080/"},
    ],
)
def test_a_selector_travels_as_its_mapping(values):
    """As a replica's close request carries it over Redis, and as it is checked there."""
    selector = Selector.from_mapping(values)
    assert Selector.from_mapping(selector.to_mapping()) == selector
    assert close_request({**selector.to_mapping(), "reason": "r"}) == (selector, "r")
    assert "key=x" not in json.dumps(selector.to_mapping())
    assert not selector.empty


def test_a_single_address_is_its_own_network_and_host_bits_are_allowed():
    assert Selector.from_mapping({"client_ip": "10.1.2.3"}).client_ip == ip_network("10.1.2.3/32")
    assert Selector.from_mapping({"client_ip": "10.1.2.3/16"}).client_ip == ip_network("10.1.0.0/16")
    assert Selector().empty


def test_an_ipv4_mapped_filter_is_its_ipv4_network_and_a_scoped_address_is_refused():
    # Client addresses are kept as IPv4 when a dual-stack socket maps them: so are the filters.
    assert Selector.from_mapping({"client_ip": "::ffff:10.5.5.5"}).client_ip == ip_network("10.5.5.5/32")
    assert Selector.from_mapping({"client_ip": "::ffff:10.5.5.0/120"}).client_ip == ip_network("10.5.5.0/24")
    with pytest.raises(AdminRequestError, match="client_ip must be an IP address"):
        Selector.from_mapping({"client_ip": "fe80::1%eth0"})


@pytest.mark.parametrize(
    ("reason", "problem"),
    [("x" * 124, "124 bytes"), ("\ud800", "lone surrogate"), ("", "must not be empty"), (None, "not null")],
)
def test_close_reasons_that_do_not_fit_a_close_frame(reason, problem):
    with pytest.raises(AdminRequestError, match=problem):
        close_reason(reason)


@pytest.mark.serve_process
async def test_a_close_on_one_replica_closes_the_subject_on_every_replica_within_a_second(
    redis_server, upstream, wsgate_process, tmp_path
):
    """Two ``wsgate serve`` processes sharing one Redis: ``POST /sessions/close`` on the first closes the
    subject's sessions on both (1008 and the reason, within 1 s), leaves another subject's alone, and
    counts both replicas. With Redis gone, the replica asked still closes its own and says 503."""
    server = redis_server()
    redis = f"limiter: {{redis: {{url: '{server.url}', key_prefix: 'adm{uuid.uuid4().hex[:6]}:'}}}}\n"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(redis + admin_policy(upstream)))
    env = {"WSGATE_TEST_SECRET": SECRET, "WSGATE_TEST_ADMIN_TOKEN": ADMIN_TOKEN}
    replicas = []
    for _ in range(2):
        process = wsgate_process("serve", "-c", str(policy), "--log-format", "json", env=env)
        listening = await process.wait_for("gateway.listening")
        port = int(listening["address"].rsplit(":", 1)[1])
        await process.wait_for("cluster.subscribed")
        replicas.append((process, f"ws://127.0.0.1:{port}/echo", f"http://{listening['admin']}"))

    async with aiohttp.ClientSession() as client:

        async def connect(url: str, subject: str) -> aiohttp.ClientWebSocketResponse:
            headers = {"Authorization": f"Bearer {user_token(subject)}", "X-Forwarded-For": "192.0.2.7"}
            ws = await client.ws_connect(url, headers=headers)
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            return ws

        alice = [await connect(url, "alice") for _, url, _ in replicas]
        bob = [await connect(url, "bob") for _, url, _ in replicas]
        started = time.monotonic()
        async with client.post(
            replicas[0][2] + "/sessions/close",
            json={"subject": "alice", "reason": "account suspended"},
            headers=authorized(),
        ) as response:
            assert response.status == 200, await response.text()
            assert await response.json() == {"closed": 2, "replicas": 2}
        for ws in alice:
            message = await ws.receive(timeout=1.5)
            assert (message.type, message.data, message.extra) == (
                WSMsgType.CLOSE,
                1008,
                "account suspended",
            )
        assert time.monotonic() - started < 1.5
        for ws in bob:
            await ws.send_str("still here")
            assert (await ws.receive(timeout=5)).data == "still here"

        server.stop()
        async with client.post(
            replicas[1][2] + "/sessions/close", json={"subject": "bob"}, headers=authorized()
        ) as response:
            assert response.status == 503
            answer = await response.json()
        assert answer["closed"] == 1 and answer["replicas"] == 1
        assert "other replicas not reached" in answer["error"]
        message = await bob[1].receive(timeout=2)
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1008)
        await bob[0].send_str("still here")  # the other replica was not reached
        assert (await bob[0].receive(timeout=5)).data == "still here"
        await bob[0].close()
    for process, _, _ in replicas:
        assert not any("Traceback" in line for line in process.stderr)
        assert not any("admin-token-0123456789" in line for line in process.lines + process.stderr)


# -- hosts, pool endpoints and client certificates ---------------------------------------------------


def hosts_policy(upstream: Any, listen: str = "") -> str:
    """Two hosts' routes on one path; one route is a pool of two endpoints of the same upstream (told apart
    by their paths; the second's query stands for a secret no listing or log may show)."""
    return f"""
{listen}admin: {{address: "127.0.0.1:0", token_env: WSGATE_TEST_ADMIN_TOKEN}}
limits: {{close_timeout: 1s}}
routes:
  - path: /ws
    host: Chat.Example.com
    upstream:
      endpoints: ["{upstream.url("/one")}", "{upstream.url("/two")}?key=pool-secret"]
      balance: round_robin
    auth: none
  - path: /ws
    host: "*.rooms.example.com"
    upstream: {upstream.url("/rooms")}
    auth: none
"""


async def open_on(client: aiohttp.ClientSession, url: str, host: str, **options: Any) -> Any:
    ws = await client.ws_connect(url, headers={"Host": host}, **options)
    await ws.send_str("hello")
    assert (await ws.receive(timeout=5)).data == "hello"
    return ws


async def test_sessions_are_listed_and_closed_by_route_host_and_endpoint(
    gateway, upstream, client, secrets, log_events
):
    gw = await gateway(hosts_policy(upstream))
    one, two = f"ws://127.0.0.1:{upstream.port}/one", f"ws://127.0.0.1:{upstream.port}/two"
    chat = [await open_on(client, gw.url("/ws"), "chat.example.com") for _ in range(2)]
    room = await open_on(client, gw.url("/ws"), "blue.rooms.example.com:8443")
    everyone = await listed(client, gw)
    assert sorted(entry["endpoint"] for entry in everyone) == sorted([one, two, upstream.url("/rooms")])
    assert "pool-secret" not in json.dumps(everyone)
    by_host = {entry["host"]: entry for entry in everyone}
    assert by_host["*.rooms.example.com"]["request_host"] == "blue.rooms.example.com"
    assert by_host["*.rooms.example.com"]["client_subject"] is None
    assert {entry["route"] for entry in everyone} == {"/ws"}
    # route alone matches by path: both hosts' routes
    assert len(await listed(client, gw, "?route=/ws")) == 3
    assert len(await listed(client, gw, "?host=CHAT.example.com.")) == 2  # normalized as routes[].host is
    assert len(await listed(client, gw, "?host=*.rooms.example.com&route=/ws")) == 1
    assert await listed(client, gw, "?host=blue.rooms.example.com") == []  # a route's host, not a request's
    (on_two,) = await listed(client, gw, f"?endpoint={two}?key=whatever")  # the query is no part of a label
    assert on_two["endpoint"] == two
    assert [
        e["endpoint"] for e in await listed(client, gw, f"?endpoint=ws://127.0.0.1:{upstream.port}/one")
    ] == [one]
    async with client.get(admin_url(gw, "/sessions?endpoint=http://x/"), headers=authorized()) as response:
        assert response.status == 400
        assert "endpoint must be a ws:// or wss:// URL" in (await response.json())["detail"]
    async with client.get(admin_url(gw, "/sessions?host=a.example.com:80"), headers=authorized()) as response:
        assert response.status == 400
        assert "host must be a route's host" in (await response.json())["detail"]
    # drain one endpoint
    assert await close(client, gw, {"endpoint": two, "reason": "draining"}) == (200, {"closed": 1})
    closed = await log_events.wait_for("session.close", request_id=on_two["request_id"])
    assert (closed["host"], closed["endpoint"], closed["client_subject"]) == ("chat.example.com", two, None)
    assert (closed["code"], closed["reason"]) == (1008, "draining")
    opened = await log_events.wait_for("session.open", request_id=on_two["request_id"])
    assert (opened["host"], opened["endpoint"]) == (closed["host"], closed["endpoint"])
    (left,) = await listed(client, gw, "?host=chat.example.com")
    assert left["endpoint"] == one
    # close one host's route
    assert await close(client, gw, {"host": "*.rooms.example.com"}) == (200, {"closed": 1})
    message = await room.receive(timeout=5)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1008)
    assert [entry["endpoint"] for entry in await listed(client, gw)] == [one]
    assert "pool-secret" not in repr(log_events.events)
    for ws in chat:
        await ws.close()


async def test_a_session_with_a_client_certificate_shows_and_logs_its_subject(
    gateway,
    upstream,
    client,
    secrets,
    pki,  # noqa: F811 - the fixture imported from test_hosts_tls
    log_events,
):
    gw = await gateway(hosts_policy(upstream, tls_listen(pki, "optional", indent=0)))
    url = f"wss://127.0.0.1:{gw.port}/ws"
    ws = await open_on(client, url, "chat.example.com", ssl=client_context(pki, "alice"))
    (entry,) = await listed(client, gw, "?host=chat.example.com")
    assert entry["client_subject"] == "CN=alice,O=Example"
    assert entry["request_host"] == "chat.example.com"
    assert await close(client, gw, {"host": "chat.example.com"}) == (200, {"closed": 1})
    assert (await ws.receive(timeout=5)).type == WSMsgType.CLOSE
    closed = await log_events.wait_for("session.close", request_id=entry["request_id"])
    assert closed["client_subject"] == "CN=alice,O=Example"
    assert closed["host"] == "chat.example.com" and closed["endpoint"] == entry["endpoint"]
    await ws.close()


@pytest.mark.serve_process
async def test_host_and_endpoint_selectors_reach_every_worker_through_the_supervisor(
    upstream, wsgate_process, tmp_path
):
    from test_workers import start_workers

    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text('listen: {address: "127.0.0.1:0"}\n' + hosts_policy(upstream)))
    workers = await start_workers(wsgate_process, policy, env={"WSGATE_TEST_ADMIN_TOKEN": ADMIN_TOKEN})
    two = f"ws://127.0.0.1:{upstream.port}/two"
    async with aiohttp.ClientSession() as client:
        opened = []
        for _ in range(200):  # until both workers have a session on each endpoint
            opened.append(await open_on(client, workers.url("/ws"), "chat.example.com"))
            await asyncio.sleep(0.01)  # the session.open line reaches the log
            seen = {(entry["worker"], entry["endpoint"]) for entry in workers.process.events("session.open")}
            if len(seen) == 4:
                break
        assert len(seen) == 4, seen
        on_two = [e for e in workers.process.events("session.open") if e["endpoint"] == two]
        status, body = await workers.get(f"/sessions?host=chat.example.com&endpoint={two}", **authorized())
        assert status == 200
        assert {entry["request_id"] for entry in json.loads(body)} == {e["request_id"] for e in on_two}
        async with client.post(
            f"http://127.0.0.1:{workers.admin}/sessions/close", json={"endpoint": two}, headers=authorized()
        ) as response:
            assert response.status == 200
            assert (await response.json())["closed"] == len(on_two)
        for entry in on_two:
            closed = await workers.process.wait_for("session.close", request_id=entry["request_id"])
            assert (closed["code"], closed["endpoint"], closed["host"]) == (1008, two, "chat.example.com")
        status, body = await workers.get("/sessions", **authorized())
        assert len(json.loads(body)) == len(opened) - len(on_two)
        for ws in opened:
            await ws.close()
    workers.process.signal()
    assert await workers.process.wait_exit() == 0
