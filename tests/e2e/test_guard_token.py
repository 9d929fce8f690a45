"""The token guard end to end: which tokens get a 101 and which a 401/403/429, what reaches the upstream
(identity headers, never the token), sessions ending at ``exp``, JWKS rotation and outage, log hygiene.

Keys are generated at test time; tokens are signed with PyJWT (or by hand for the forged ones).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from wsraw import TEXT, RawClient, Response

ISSUER = "https://issuer.test"
AUDIENCE = "chat"


# -- keys and tokens --------------------------------------------------------------------------------


@cache
def private_key(kind: str = "rsa", name: str = "main") -> Any:
    """A private key per (kind, name), generated once per test run."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for the ``main`` provider; an override of None removes the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def token(
    key: Any = None, alg: str = "RS256", headers: dict[str, Any] | None = None, **overrides: Any
) -> str:
    return jwt.encode(
        claims(**overrides), key if key is not None else private_key(), algorithm=alg, headers=headers
    )


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    encode = lambda part: b64url(json.dumps(part, separators=(",", ":")).encode())  # noqa: E731
    return f"{encode(header)}.{encode(payload)}.{b64url(signature)}"


def hmac_token(secret: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token signed by hand (PyJWT refuses a PEM as an HMAC secret, an attacker does not)."""
    head = unsigned_token({"alg": "HS256", "typ": "JWT"}, payload).rsplit(".", 1)[0]
    signature = hmac.new(secret, head.encode(), hashlib.sha256).digest()
    return f"{head}.{b64url(signature)}"


def jwk(key: Any, kid: str) -> dict[str, Any]:
    public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": kid, "alg": "RS256", "use": "sig"}


# -- policies ---------------------------------------------------------------------------------------


def write_pem(tmp_path: Path, key: Any, name: str = "pub.pem") -> str:
    path = tmp_path / name
    path.write_bytes(public_pem(key))
    return str(path)


def rsa_provider(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    return {
        "algorithms": ["RS256"],
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "public_key_file": write_pem(tmp_path, private_key()),
        **settings,
    }


def policy(upstream: Any, provider: dict[str, Any], route: dict[str, Any] | None = None, **top: Any) -> str:
    """A policy with one provider ``main`` and one route /echo -> the upstream's /headers."""
    document = {
        "auth": {"main": provider},
        "routes": [{"path": "/echo", "upstream": upstream.url("/headers"), "auth": "main", **(route or {})}],
        **top,
    }
    return yaml.safe_dump(document, sort_keys=False)


# -- handshakes -------------------------------------------------------------------------------------


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def error_of(response: Response) -> str:
    assert response.headers["content-type"].startswith("application/json")
    return str(json.loads(response.body)["error"])


async def refused(port: int, headers: dict[str, str] | None = None, path: str = "/echo") -> Response:
    ws, response = await RawClient.connect(port, path, headers)
    ws.close()
    assert response.status != 101, "the handshake was accepted"
    return response


async def assert_401(port: int, headers: dict[str, str] | None, reason: str = "auth_invalid") -> Response:
    response = await refused(port, headers)
    assert response.status == 401
    assert error_of(response) == reason
    assert response.headers["www-authenticate"].startswith("Bearer")
    return response


async def opened(
    port: int, headers: dict[str, str] | None = None, path: str = "/echo"
) -> tuple[RawClient, Response, dict[str, Any]]:
    """A session that got its 101, with what the upstream's /headers reported (headers lower-cased)."""
    ws, response = await RawClient.connect(port, path, headers)
    assert response.status == 101, response.body
    opcode, payload = await ws.recv_message()
    assert opcode == TEXT
    seen = json.loads(payload)
    seen["headers"] = {name.lower(): value for name, value in seen["headers"].items()}
    return ws, response, seen


async def close_session(ws: RawClient) -> None:
    ws.send_close(1000)
    await ws.recv_close()
    ws.close()


# -- a JWKS server ----------------------------------------------------------------------------------


class JwksServer:
    """Serves ``{"keys": keys}`` at /jwks (or ``status`` when it is not 200); counts its hits."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    async def start(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="boom")
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks_server() -> AsyncIterator[Callable[[], Awaitable[JwksServer]]]:
    started: list[JwksServer] = []

    async def start() -> JwksServer:
        server = await JwksServer().start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def jwks_provider(url: str, **settings: Any) -> dict[str, Any]:
    return {
        "algorithms": ["RS256"],
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "jwks_url": url,
        "jwks_cache_ttl": "5m",
        "jwks_min_refresh": "1s",
        **settings,
    }


# -- missing and forged tokens ----------------------------------------------------------------------


async def test_missing_token_is_401_with_a_bearer_challenge(gateway, upstream, tmp_path, log_events):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path)))
    response = await assert_401(gw.port, None, "auth_missing")
    assert response.headers["www-authenticate"].startswith('Bearer realm="wsgate"')
    # a non-bearer Authorization is no token either
    await assert_401(gw.port, {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "auth_missing")
    rejected = await log_events.wait_for("handshake.rejected", status=401)
    assert rejected["reason"] == "auth_missing"
    assert upstream.records == []


async def test_alg_none_token_is_refused(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path)))
    for alg in ("none", "None", "NONE"):
        forged = unsigned_token({"alg": alg, "typ": "JWT"}, claims())
        response = await assert_401(gw.port, bearer(forged))
        assert "not allowed" in json.loads(response.body)["detail"]
    assert upstream.records == []


async def test_rs256_public_key_used_as_hs256_secret_is_refused(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path)))
    pem = Path(rsa_provider(tmp_path)["public_key_file"]).read_bytes()
    for secret in (pem, pem.strip()):
        await assert_401(gw.port, bearer(hmac_token(secret, claims())))
    assert upstream.records == []


async def test_expired_and_not_yet_valid_tokens_are_401(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path)))
    now = int(time.time())
    await assert_401(gw.port, bearer(token(exp=now - 10)), "auth_expired")
    response = await assert_401(gw.port, bearer(token(nbf=now + 60)))
    assert "not yet valid" in json.loads(response.body)["detail"]
    await assert_401(gw.port, bearer(token(exp=None)))  # exp is required
    # a NumericDate is a JSON number: a numeric string would be checked once, then cached as never expiring
    for name in ("exp", "nbf", "iat"):
        response = await assert_401(gw.port, bearer(token(**{name: str(now + 60 if name == "exp" else now)})))
        assert "not a number" in json.loads(response.body)["detail"], name
    assert upstream.records == []


async def test_leeway_lets_a_slightly_expired_token_in(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, leeway="5s")))
    now = int(time.time())
    ws, _, _ = await opened(gw.port, bearer(token(exp=now - 2)))
    await close_session(ws)
    await assert_401(gw.port, bearer(token(exp=now - 30)), "auth_expired")


@pytest.mark.parametrize(
    ("make", "detail"),
    [
        pytest.param(lambda: token(iss="https://evil.test"), "issuer", id="wrong-iss"),
        pytest.param(lambda: token(aud="other"), "audience", id="wrong-aud"),
        pytest.param(lambda: token(iss=None), "'iss'", id="no-iss"),
        pytest.param(lambda: token(private_key("rsa", "other")), "signature", id="other-key"),
        pytest.param(lambda: token()[:-10], None, id="truncated"),
        pytest.param(lambda: "abc", "malformed", id="garbage"),
        pytest.param(lambda: token(private_key("ec"), "ES256"), "not allowed", id="es256-not-allowed"),
    ],
)
async def test_invalid_token_is_401_and_never_reaches_upstream(gateway, upstream, tmp_path, make, detail):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path)))
    response = await assert_401(gw.port, bearer(make()))
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    if detail is not None:
        assert detail in json.loads(response.body)["detail"]
    assert upstream.records == []


async def test_oversized_token_is_refused_unparsed(gateway, upstream, tmp_path, log_events):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, max_token_bytes="8KiB")))
    valid = token()
    oversized = valid + "." + "A" * (9000 - len(valid))
    await assert_401(gw.port, bearer(oversized))
    rejected = await log_events.wait_for("handshake.rejected", status=401)
    assert rejected["reason"] == "auth_invalid"
    assert "larger than 8192" in rejected["detail"]
    assert upstream.records == []


async def test_hs256_secret_from_the_environment(gateway, upstream, monkeypatch):
    secret = "s" * 40
    monkeypatch.setenv("WSGATE_TEST_SECRET", secret)
    provider = {"algorithms": ["HS256"], "issuer": ISSUER, "audiences": [AUDIENCE]}
    gw = await gateway(policy(upstream, {**provider, "secret_env": "WSGATE_TEST_SECRET"}))
    ws, _, seen = await opened(gw.port, bearer(token(secret, "HS256")))
    await close_session(ws)
    assert "authorization" not in seen["headers"]
    await assert_401(gw.port, bearer(token("t" * 40, "HS256")))
    await assert_401(gw.port, bearer(token(private_key(), "RS256")))  # not in the allowlist


@pytest.mark.parametrize(("kind", "alg"), [("ec", "ES256"), ("ed25519", "EdDSA")])
async def test_ec_and_eddsa_public_keys(gateway, upstream, tmp_path, kind, alg):
    provider = {
        "algorithms": [alg],
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "public_key_file": write_pem(tmp_path, private_key(kind)),
    }
    gw = await gateway(policy(upstream, provider))
    ws, _, _ = await opened(gw.port, bearer(token(private_key(kind), alg)))
    await close_session(ws)
    await assert_401(gw.port, bearer(token(private_key(kind, "other"), alg)))


# -- the token names no key location ----------------------------------------------------------------


async def test_kid_path_traversal_is_just_an_unknown_kid(gateway, upstream, jwks_server, log_events):
    jwks = await jwks_server()
    jwks.keys = [jwk(private_key(), "k1")]
    gw = await gateway(policy(upstream, jwks_provider(jwks.url)))
    for kid in ("../../../../etc/passwd", "/dev/zero", "k1' OR '1'='1", "file:///etc/passwd"):
        response = await assert_401(gw.port, bearer(token(headers={"kid": kid})))
        assert "kid" in json.loads(response.body)["detail"]
    assert not log_events.named("handshake.error")
    ws, _, _ = await opened(gw.port, bearer(token(headers={"kid": "k1"})))  # the gateway is fine
    await close_session(ws)
    assert jwks.hits >= 1
    assert all(str(entry.get("url", jwks.url)) == jwks.url for entry in log_events.events)


async def test_jku_and_jwk_headers_are_ignored(gateway, upstream, jwks_server, tmp_path):
    attacker_key = private_key("rsa", "attacker")
    attacker = await jwks_server()
    attacker.keys = [jwk(attacker_key, "k1")]
    jwks = await jwks_server()
    jwks.keys = [jwk(private_key(), "k1")]
    embedded = jwt.algorithms.RSAAlgorithm.to_jwk(attacker_key.public_key(), as_dict=True)
    forged = [
        token(attacker_key, headers={"kid": "k1", "jku": attacker.url}),
        token(attacker_key, headers={"jku": attacker.url}),
        token(attacker_key, headers={"kid": "k1", "jwk": embedded}),
        token(attacker_key, headers={"jwk": embedded}),
        token(attacker_key, headers={"kid": "k1", "x5u": attacker.url}),
    ]
    for provider in (jwks_provider(jwks.url), rsa_provider(tmp_path)):
        gw = await gateway(policy(upstream, provider))
        for forgery in forged:
            await assert_401(gw.port, bearer(forgery))
    assert attacker.hits == 0
    assert upstream.records == []


# -- where a valid token may travel, and that it goes no further ------------------------------------


async def test_token_in_the_authorization_header(gateway, upstream, tmp_path, log_events):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path)))
    ws, response, seen = await opened(gw.port, bearer(token()))
    assert "x-request-id" in response.headers
    assert "authorization" not in seen["headers"]
    await close_session(ws)
    opened_event = await log_events.wait_for("session.open")
    assert opened_event["subject"] == "alice"


async def test_token_in_the_query_is_removed_before_the_upstream(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, token_sources=["query"])))
    jwt_ = token()
    ws, _, seen = await opened(gw.port, path=f"/echo?room=7&access_token={jwt_}&lang=en")
    await close_session(ws)
    assert "access_token" not in seen["query"]
    assert jwt_ not in json.dumps(seen)  # nor in X-Forwarded-Uri or anywhere else
    assert "room=7" in seen["query"] and "lang=en" in seen["query"]
    assert "access_token" not in upstream.records[0].query
    # header is not a source of this provider
    await assert_401(gw.port, bearer(token()), "auth_missing")


async def test_percent_encoded_token_parameter_never_reaches_the_upstream(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, token_sources=["query"])))
    jwt_ = token()
    ws, response = await RawClient.connect(gw.port, f"/echo?room=7&access%5Ftoken={jwt_}")
    ws.close()
    assert response.status == 101  # the name is read decoded, and stripped decoded
    await asyncio.sleep(0.1)
    assert upstream.records
    assert upstream.records[0].query == "room=7"
    assert all(jwt_ not in value for value in upstream.records[0].headers.values())


async def test_token_in_a_cookie_is_not_forwarded_but_other_cookies_are(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, token_sources=["cookie"])))
    jwt_ = token()
    ws, _, seen = await opened(gw.port, {"Cookie": f"theme=dark; access_token={jwt_}; lang=en"})
    await close_session(ws)
    cookie = seen["headers"].get("cookie", "")
    assert jwt_ not in json.dumps(seen)
    assert "access_token" not in cookie
    assert "theme=dark" in cookie and "lang=en" in cookie
    # only the token cookie: no Cookie header at all upstream
    ws, _, seen = await opened(gw.port, {"Cookie": f"access_token={jwt_}"})
    await close_session(ws)
    assert "cookie" not in seen["headers"]
    await assert_401(gw.port, {"Cookie": "theme=dark"}, "auth_missing")


@pytest.mark.parametrize("separator", [" ", ", "])
async def test_token_cookie_after_a_non_semicolon_separator_is_not_forwarded(
    gateway, upstream, tmp_path, separator
):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, token_sources=["cookie"])))
    jwt_ = token()
    ws, response = await RawClient.connect(
        gw.port, "/echo", {"Cookie": f"theme=dark{separator}access_token={jwt_}"}
    )
    ws.close()
    # cookies are split on ';' only, as the stripping does: this is one cookie named theme, no token
    assert response.status == 401
    assert upstream.records == []


async def test_token_in_a_subprotocol_is_never_offered_upstream_nor_echoed(
    gateway, upstream, tmp_path, client
):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, token_sources=["subprotocol"])))
    jwt_ = token()
    ws, response, seen = await opened(gw.port, {"Sec-WebSocket-Protocol": f"bearer.{jwt_}, chat"})
    await close_session(ws)
    assert response.headers.get("sec-websocket-protocol") == "chat"
    assert jwt_ not in json.dumps(seen)
    assert seen["headers"]["sec-websocket-protocol"] == "chat"
    assert upstream.records[0].subprotocol == "chat"
    # only the bearer entry: the session opens without a subprotocol, never with the bearer one
    ws, response, seen = await opened(gw.port, {"Sec-WebSocket-Protocol": f"bearer.{jwt_}"})
    await close_session(ws)
    assert "sec-websocket-protocol" not in response.headers
    assert "sec-websocket-protocol" not in seen["headers"]
    # a real client library agrees
    async with client.ws_connect(gw.url("/echo"), protocols=(f"bearer.{jwt_}", "chat")) as session:
        assert session.protocol == "chat"
        message = await session.receive(timeout=5)
        assert message.type == WSMsgType.TEXT and jwt_ not in message.data


# -- claims, revocation, identity -------------------------------------------------------------------


async def test_required_claims(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, required_claims={"scope": "chat"})))
    for scope in (None, "read", "chatty", ["read"]):
        response = await refused(gw.port, bearer(token(scope=scope)))
        assert response.status == 403
        assert error_of(response) == "claims"
    for scope in ("chat", "read chat", ["read", "chat"]):
        ws, _, _ = await opened(gw.port, bearer(token(scope=scope)))
        await close_session(ws)


async def test_revoked_subject_and_token_id(gateway, upstream, tmp_path):
    revoked = {"subjects": ["mallory"], "token_ids": ["jti-1"]}
    gw = await gateway(policy(upstream, rsa_provider(tmp_path), revoked=revoked))
    await assert_401(gw.port, bearer(token(sub="mallory")), "revoked")
    await assert_401(gw.port, bearer(token(jti="jti-1")), "revoked")
    # a cached (already verified) token is still checked against the list
    await assert_401(gw.port, bearer(revoked_token := token(sub="mallory")), "revoked")
    await assert_401(gw.port, bearer(revoked_token), "revoked")
    ws, _, _ = await opened(gw.port, bearer(token(sub="bob", jti="jti-2")))
    await close_session(ws)
    assert len(upstream.records) == 1


async def test_claims_reach_the_upstream_and_spoofed_identity_does_not(gateway, upstream, tmp_path):
    route = {"forward_claims": {"sub": "X-User-Id"}}
    gw = await gateway(policy(upstream, rsa_provider(tmp_path), route))
    jwt_ = token(sub="alice")
    ws, _, seen = await opened(gw.port, {**bearer(jwt_), "X-User-Id": "admin", "x-user-id": "root"})
    await close_session(ws)
    assert seen["headers"]["x-user-id"] == "alice"
    assert "admin" not in json.dumps(seen) and "root" not in json.dumps(seen)
    assert "authorization" not in seen["headers"]
    raw = upstream.records[0].headers
    assert [value for name, value in raw.items() if name.lower() == "x-user-id"] == ["alice"]


async def test_a_claim_with_surrounding_spaces_is_forwarded_trimmed(gateway, upstream, tmp_path):
    """A field value has no surrounding whitespace (RFC 9110 5.5): such a claim used to fail the upstream
    request with a 500."""
    route = {"forward_claims": {"sub": "X-User-Id", "name": "X-User-Name"}}
    gw = await gateway(policy(upstream, rsa_provider(tmp_path), route))
    ws, _, seen = await opened(gw.port, bearer(token(sub=" alice\t ", name="  ")))
    await close_session(ws)
    assert seen["headers"]["x-user-id"] == "alice"
    assert seen["headers"]["x-user-name"] == ""


async def test_forward_token_passes_the_authorization_header(gateway, upstream, tmp_path):
    route = {"forward_claims": {"sub": "X-User-Id"}, "forward_token": True}
    gw = await gateway(policy(upstream, rsa_provider(tmp_path), route))
    jwt_ = token()
    ws, _, seen = await opened(gw.port, bearer(jwt_))
    await close_session(ws)
    assert seen["headers"]["authorization"] == f"Bearer {jwt_}"
    assert seen["headers"]["x-user-id"] == "alice"


# -- sessions bounded by the token ------------------------------------------------------------------


async def test_session_ends_when_the_token_expires(gateway, upstream, tmp_path, log_events):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, leeway="0s")))
    exp = int(time.time()) + 2
    short_lived = token(exp=exp)
    ws, _, _ = await opened(gw.port, bearer(short_lived))
    frame = await ws.recv_close(timeout=5)
    arrived = time.time()
    assert (frame.close_code, frame.close_reason) == (1008, "token expired")
    assert exp - 0.05 <= arrived <= exp + 1.0, arrived - exp
    record = upstream.records[0]
    await asyncio.wait_for(record.closed.wait(), 5)
    assert (record.close_code, record.close_reason) == (1008, "token expired")
    ws.send_close(1008)
    closed = await log_events.wait_for("session.close")
    assert (closed["initiator"], closed["code"]) == ("gateway", 1008)
    # the same token, now in the verified-token cache, is expired too
    await assert_401(gw.port, bearer(short_lived), "auth_expired")


async def test_connections_per_subject(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path), limits={"connections_per_subject": 1}))
    first, _, _ = await opened(gw.port, bearer(token(sub="alice")))
    response = await refused(gw.port, bearer(token(sub="alice")))
    assert response.status == 429
    assert error_of(response) == "conn_limit"
    other, _, _ = await opened(gw.port, bearer(token(sub="bob")))  # another subject is not affected
    await close_session(first)
    deadline = time.monotonic() + 3
    while True:
        ws, response = await RawClient.connect(gw.port, "/echo", bearer(token(sub="alice")))
        if response.status == 101:
            break
        ws.close()
        assert response.status == 429
        assert time.monotonic() < deadline, "the slot was never given back"
        await asyncio.sleep(0.05)
    await close_session(ws)
    await close_session(other)


# -- JWKS -------------------------------------------------------------------------------------------


async def test_jwks_rotation_and_outage_keep_last_good_keys(gateway, upstream, jwks_server, log_events):
    jwks = await jwks_server()
    jwks.keys = [jwk(private_key(), "k1")]
    gw = await gateway(policy(upstream, jwks_provider(jwks.url)))
    k2 = private_key("rsa", "k2")

    ws, _, _ = await opened(gw.port, bearer(token(headers={"kid": "k1"})))
    await close_session(ws)
    assert jwks.hits == 1

    jwks.keys = [*jwks.keys, jwk(k2, "k2")]
    await asyncio.sleep(1.1)  # past jwks_min_refresh
    ws, _, _ = await opened(gw.port, bearer(token(k2, headers={"kid": "k2"})))
    await close_session(ws)
    assert jwks.hits == 2

    jwks.status = 500
    await asyncio.sleep(1.1)
    await assert_401(gw.port, bearer(token(headers={"kid": "k3"})))  # unknown kid: a refetch, which fails
    assert jwks.hits == 3
    failed = await log_events.wait_for("jwks.refresh_failed")
    assert failed["kept_keys"] == 2
    for key, kid in ((private_key(), "k1"), (k2, "k2")):  # fresh tokens: not in the verified-token cache
        ws, _, _ = await opened(gw.port, bearer(token(key, headers={"kid": kid})))
        await close_session(ws)

    await jwks.stop()  # the server is gone altogether
    await asyncio.sleep(1.1)
    await assert_401(gw.port, bearer(token(headers={"kid": "k4"})))
    assert len(log_events.named("jwks.refresh_failed")) == 2
    ws, _, _ = await opened(gw.port, bearer(token(headers={"kid": "k1"})))
    await close_session(ws)


async def test_handshakes_during_the_first_fetch_wait_for_it(gateway, upstream, jwks_server):
    jwks = await jwks_server()
    jwks.keys = [jwk(private_key(), "k1")]
    jwks.delay = 0.3  # a slow identity provider: the burst arrives while the first fetch is under way
    gw = await gateway(policy(upstream, jwks_provider(jwks.url)))
    tokens = [token(sub=f"user-{n}", headers={"kid": "k1"}) for n in range(10)]
    results = await asyncio.gather(*(RawClient.connect(gw.port, "/echo", bearer(value)) for value in tokens))
    statuses = [response.status for _, response in results]
    for ws, response in results:
        if response.status == 101:
            await close_session(ws)
        else:
            ws.close()
    assert statuses == [101] * 10
    assert jwks.hits == 1


async def test_unknown_kid_storm_fetches_at_most_once_per_min_refresh(gateway, upstream, jwks_server):
    jwks = await jwks_server()
    jwks.keys = [jwk(private_key(), "k1")]
    gw = await gateway(policy(upstream, jwks_provider(jwks.url, jwks_min_refresh="10s")))
    ws, _, _ = await opened(gw.port, bearer(token(headers={"kid": "k1"})))
    await close_session(ws)
    before = jwks.hits
    forged = [token(headers={"kid": f"unknown-{n}"}) for n in range(20)]
    await asyncio.gather(*(assert_401(gw.port, bearer(value)) for value in forged[:10]))
    for value in forged[10:]:
        await assert_401(gw.port, bearer(value))
    assert jwks.hits - before <= 1


async def test_unknown_kid_storm_after_the_window_shares_one_fetch(gateway, upstream, jwks_server):
    jwks = await jwks_server()
    jwks.keys = [jwk(private_key(), "k1")]
    gw = await gateway(policy(upstream, jwks_provider(jwks.url)))
    ws, _, _ = await opened(gw.port, bearer(token(headers={"kid": "k1"})))
    await close_session(ws)
    await asyncio.sleep(1.1)
    before = jwks.hits
    forged = [token(headers={"kid": f"unknown-{n}"}) for n in range(20)]
    await asyncio.gather(*(assert_401(gw.port, bearer(value)) for value in forged))
    assert 1 <= jwks.hits - before <= 2


async def test_jwks_unreachable_from_the_start_is_401_not_500(gateway, upstream, jwks_server, log_events):
    jwks = await jwks_server()
    jwks.status = 503
    gw = await gateway(policy(upstream, jwks_provider(jwks.url)))
    await assert_401(gw.port, bearer(token(headers={"kid": "k1"})))
    await log_events.wait_for("jwks.refresh_failed")
    assert not log_events.named("handshake.error")


# -- cache and logs ---------------------------------------------------------------------------------


async def test_the_same_token_thirty_times(gateway, upstream, tmp_path):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path)))
    jwt_ = token()
    for _ in range(30):
        ws, _, seen = await opened(gw.port, bearer(jwt_))
        assert "authorization" not in seen["headers"]
        await close_session(ws)
    assert len(upstream.records) == 30


async def test_logs_carry_a_fingerprint_never_the_token(gateway, upstream, tmp_path, log_events):
    gw = await gateway(policy(upstream, rsa_provider(tmp_path, token_sources=["header", "query", "cookie"])))
    accepted = token()
    expired = token(exp=int(time.time()) - 60)
    forged = token(private_key("rsa", "other"))
    await assert_401(gw.port, bearer(expired), "auth_expired")
    await assert_401(gw.port, {"Cookie": f"access_token={forged}"})
    response = await refused(gw.port, path=f"/echo?access_token={expired}")
    assert response.status == 401
    ws, _, _ = await opened(gw.port, bearer(accepted))
    await close_session(ws)
    await log_events.wait_for("session.close")
    text = str(log_events.events)
    for raw in (accepted, expired, forged):
        assert raw not in text
        assert raw.split(".")[2] not in text  # not even the signature
    fingerprints = [entry["token"] for entry in log_events.events if entry.get("token")]
    assert fingerprints and all(re.fullmatch(r"[0-9a-f]{12}", value) for value in fingerprints)
    expected = {hashlib.sha256(raw.encode()).hexdigest()[:12] for raw in (accepted, expired, forged)}
    assert expected <= set(fingerprints)
    rejected = log_events.named("handshake.rejected")
    assert len(rejected) == 3 and all(entry["token"] for entry in rejected)
