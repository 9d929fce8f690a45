"""Several token providers on one route, end to end: the token's ``iss`` (then ``kid``) chooses the provider
that verifies it; what each provider accepts, revokes and counts stays its own; no provider's token place
reaches the upstream; a reload that drops a provider closes its sessions and keeps the others'.

Staff tokens are HS256 with a secret from the environment and travel in the Authorization header or a
``staff_token`` cookie; partner tokens are RS256 against a PEM public key and travel in the
``partner_token`` query parameter or a ``partner.`` subprotocol. Keys are made at test time, tokens with
PyJWT.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from conftest import policy_text
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from wsraw import TEXT, RawClient, Response

from proxy.explain import explain
from proxy.policy.load import parse_policy

STAFF = "https://staff.example.test"
PARTNERS = "https://partners.example.test"
STAFF_SECRET = "staff-secret-0123456789-0123456789-abcdef"
ADMIN_TOKEN = "admin-token-0123456789-0123456789"


@cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """An RSA key per name, made once per test run."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims(issuer: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": issuer, "sub": "42", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def staff_token(**overrides: Any) -> str:
    return jwt.encode(claims(STAFF, **{"aud": "staff-app", **overrides}), STAFF_SECRET, algorithm="HS256")


def partner_token(**overrides: Any) -> str:
    return jwt.encode(claims(PARTNERS, **overrides), rsa_key("partners"), algorithm="RS256")


@pytest.fixture
def providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The two providers, as policy mappings."""
    monkeypatch.setenv("WSGATE_TEST_STAFF_SECRET", STAFF_SECRET)
    monkeypatch.setenv("WSGATE_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    pem = tmp_path / "partners.pem"
    pem.write_bytes(
        rsa_key("partners")
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return {
        "staff": {
            "algorithms": ["HS256"],
            "issuer": STAFF,
            "audiences": ["staff-app"],
            "secret_env": "WSGATE_TEST_STAFF_SECRET",
            "token_sources": ["header", "cookie"],
            "cookie_name": "staff_token",
        },
        "partners": {
            "algorithms": ["RS256"],
            "issuer": PARTNERS,
            "public_key_file": str(pem),
            "token_sources": ["query", "subprotocol"],
            "query_parameter": "partner_token",
            "subprotocol_prefix": "partner.",
        },
    }


def policy(upstream: Any, providers: dict[str, Any], auth: Any = ("staff", "partners"), **route: Any) -> str:
    """One route /echo -> the upstream's /headers, behind ``auth``; an admin listener with /sessions."""
    document = {
        "admin": {"address": "127.0.0.1:0", "token_env": "WSGATE_TEST_ADMIN_TOKEN"},
        "auth": providers,
        "routes": [{"path": "/echo", "upstream": upstream.url("/headers"), "auth": list(auth), **route}],
    }
    return yaml.safe_dump(document, sort_keys=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


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


async def refused(port: int, headers: dict[str, str] | None = None, path: str = "/echo") -> tuple[int, dict]:
    """The status and JSON body of a refused handshake."""
    ws, response = await RawClient.connect(port, path, headers)
    ws.close()
    assert response.status != 101, "the handshake was accepted"
    return response.status, json.loads(response.body)


async def close_session(ws: RawClient) -> None:
    ws.send_close(1000)
    await ws.recv_close()
    ws.close()


async def explained(gw: Any, token: str) -> str:
    """``wsgate explain`` for GET /echo with ``token``, as printed."""
    return (await explain(gw.gateway.policy, "/echo", "198.51.100.7", token=token)).render()


# -- two issuers on one route -----------------------------------------------------------------------


async def test_each_issuer_is_admitted_by_its_own_provider_and_named(
    gateway, upstream, providers, log_events
):
    gw = await gateway(policy(upstream, providers))
    staff, _, _ = await opened(gw.port, bearer(staff_token(sub="alice")))
    opened_staff = await log_events.wait_for("session.open", subject="alice")
    assert opened_staff["provider"] == "staff"
    partner, _, seen = await opened(gw.port, path=f"/echo?room=7&partner_token={partner_token(sub='bob')}")
    opened_partner = await log_events.wait_for("session.open", subject="bob")
    assert opened_partner["provider"] == "partners"
    assert seen["query"] == "room=7"
    # the admin listing names each session's provider, and selects by it
    url = f"http://127.0.0.1:{gw.gateway.admin_address.port}/sessions"
    async with aiohttp.ClientSession(headers=bearer(ADMIN_TOKEN)) as client:
        async with client.get(url) as response:
            assert response.status == 200
            listed = {item["subject"]: item["provider"] for item in await response.json()}
        async with client.get(f"{url}?provider=partners") as response:
            selected = [item["subject"] for item in await response.json()]
    assert listed == {"alice": "staff", "bob": "partners"}
    assert selected == ["bob"]
    await close_session(staff)
    await close_session(partner)
    closed = await log_events.wait_for("session.close", subject="bob")
    assert closed["provider"] == "partners"
    # explain names the provider that took the token
    assert "token                    pass: subject 'alice' via header, provider 'staff'" in await explained(
        gw, staff_token(sub="alice")
    )
    assert "via query, provider 'partners'" in await explained(gw, partner_token(sub="bob"))


async def test_a_third_issuer_is_refused_401_and_no_provider_is_tried(
    gateway, upstream, providers, log_events
):
    gw = await gateway(policy(upstream, providers))
    # signed with the staff secret, but claiming another issuer: no provider of the route is its own
    stranger = jwt.encode(claims("https://elsewhere.test"), STAFF_SECRET, algorithm="HS256")
    status, body = await refused(gw.port, bearer(stranger))
    assert (status, body["error"]) == (401, "auth_invalid")
    assert body["detail"] == "token issuer matches no provider of this route"
    rejected = await log_events.wait_for("handshake.rejected", reason="auth_invalid")
    assert rejected["provider"] is None
    assert rejected["token"] is not None and rejected["token"] not in stranger
    assert stranger not in json.dumps(log_events.events)
    assert upstream.records == []
    # a token of the staff issuer that the staff provider refuses names staff in the refusal's log line
    status, body = await refused(gw.port, bearer(staff_token(aud="another-app")))
    assert (status, body["detail"]) == (401, "token audience not accepted")
    rejected = await log_events.wait_for("handshake.rejected", detail="token audience not accepted")
    assert rejected["provider"] == "staff"
    # explain says why none took it, and what each would have needed
    text = await explained(gw, stranger)
    assert "refuse: 401 auth_invalid: token issuer matches no provider of this route" in text
    assert f"staff: iss '{STAFF}'; partners: iss '{PARTNERS}'" in text


async def test_explain_judges_given_claims_by_the_provider_their_iss_picks(gateway, upstream, providers):
    gw = await gateway(policy(upstream, providers))
    policy_now = gw.gateway.policy
    given = claims(PARTNERS, sub="bob")
    result = await explain(policy_now, "/echo", "198.51.100.7", claims=given)
    assert result.admitted
    assert "pass: subject 'bob' via claims, provider 'partners'" in result.render()
    # the staff provider wants its audience: claims of its issuer without it are refused by staff
    result = await explain(policy_now, "/echo", "198.51.100.7", claims=claims(STAFF))
    assert (result.status, result.reason) == (401, "auth_invalid")
    result = await explain(policy_now, "/echo", "198.51.100.7", claims=claims("https://elsewhere.test"))
    assert (result.status, result.detail) == (401, "token issuer matches no provider of this route")


async def test_a_provider_without_issuer_takes_the_tokens_no_other_issuer_claims(
    gateway, upstream, providers
):
    del providers["partners"]["issuer"]
    providers["partners"]["token_sources"] = ["query", "header"]
    document = yaml.safe_load(policy(upstream, providers))
    # /partners: the provider without an issuer alone, so it accepts a token of any iss there
    document["routes"].append({"path": "/partners", "upstream": upstream.url("/headers"), "auth": "partners"})
    gw = await gateway(yaml.safe_dump(document))
    anyone = jwt.encode(claims("https://elsewhere.test"), rsa_key("partners"), algorithm="RS256")
    ws, _, _ = await opened(gw.port, path=f"/echo?partner_token={anyone}")
    await close_session(ws)
    # a staff-issued token still goes to staff on /echo, which refuses an RSA signature -- even once the
    # provider without an issuer verified (and cached) the same token on /partners
    forged = jwt.encode(claims(STAFF, aud="staff-app"), rsa_key("partners"), algorithm="RS256")
    ws, _, _ = await opened(gw.port, bearer(forged), path="/partners")
    await close_session(ws)
    status, body = await refused(gw.port, bearer(forged))
    assert (status, body["error"]) == (401, "auth_invalid")
    assert body["detail"] == "token algorithm 'RS256' not allowed"


# -- where tokens travel, and that none goes further -------------------------------------------------


async def test_no_provider_place_reaches_the_upstream(gateway, upstream, providers):
    gw = await gateway(policy(upstream, providers, forward_claims={"sub": "X-User-Id"}))
    token = staff_token(sub="alice")
    # the same token in every place any of the route's providers reads
    headers = {
        **bearer(token),
        "Cookie": f"theme=dark; staff_token={token}",
        "Sec-WebSocket-Protocol": f"partner.{token}, chat",
        "X-User-Id": "root",
    }
    ws, response, seen = await opened(gw.port, headers, path=f"/echo?lang=en&partner_token={token}")
    await close_session(ws)
    assert response.headers.get("sec-websocket-protocol") == "chat"
    assert token not in json.dumps(seen)
    assert seen["query"] == "lang=en"
    assert seen["headers"]["cookie"] == "theme=dark"
    assert seen["headers"]["sec-websocket-protocol"] == "chat"
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["x-user-id"] == "alice"  # from the matched token, never the client's own
    record = upstream.records[0]
    assert token not in record.query and all(token not in value for value in record.headers.values())


async def test_two_different_tokens_are_400_and_a_token_out_of_its_place_401(gateway, upstream, providers):
    gw = await gateway(policy(upstream, providers))
    status, body = await refused(
        gw.port, bearer(staff_token()), path=f"/echo?partner_token={partner_token()}"
    )
    assert (status, body["error"]) == (400, "bad_request")
    assert body["detail"] == "two different tokens (header and query): send one"
    # a partner token in the staff provider's header: partners never looks there
    status, body = await refused(gw.port, bearer(partner_token()))
    assert (status, body["error"]) == (401, "auth_invalid")
    assert body["detail"] == "token sent in the header, where its provider does not look"
    status, body = await refused(gw.port)
    assert (status, body["error"]) == (401, "auth_missing")
    assert upstream.records == []


# -- per provider: revocation, connections per subject -----------------------------------------------


async def test_a_token_id_revoked_on_one_provider_leaves_the_others_alone(gateway, upstream, providers):
    providers["partners"]["revoked"] = {"token_ids": ["jti-1"], "subjects": ["mallory"]}
    gw = await gateway(policy(upstream, providers))
    ws, _, _ = await opened(gw.port, bearer(staff_token(jti="jti-1")))
    await close_session(ws)
    ws, _, _ = await opened(gw.port, bearer(staff_token(sub="mallory")))
    await close_session(ws)
    for revoked in (partner_token(jti="jti-1"), partner_token(sub="mallory")):
        status, body = await refused(gw.port, path=f"/echo?partner_token={revoked}")
        assert (status, body["error"]) == (401, "revoked")
    ws, _, _ = await opened(gw.port, path=f"/echo?partner_token={partner_token(jti='jti-2')}")
    await close_session(ws)


async def test_connections_per_subject_count_each_provider_apart(gateway, upstream, providers):
    gw = await gateway(policy(upstream, providers, limits={"connections_per_subject": 1}))
    staff, _, _ = await opened(gw.port, bearer(staff_token(sub="42")))
    partner, _, _ = await opened(gw.port, path=f"/echo?partner_token={partner_token(sub='42')}")
    status, body = await refused(gw.port, bearer(staff_token(sub="42")))
    assert (status, body["error"]) == (429, "conn_limit")
    await close_session(staff)
    await close_session(partner)


async def test_the_matched_tokens_expiry_ends_its_session(gateway, upstream, providers):
    providers["staff"]["leeway"] = "1h"  # the other provider's leeway does not stretch a partner token
    gw = await gateway(policy(upstream, providers))
    exp = int(time.time()) + 2
    ws, _, _ = await opened(gw.port, path=f"/echo?partner_token={partner_token(exp=exp)}")
    frame = await ws.recv_close(timeout=10)
    assert (frame.close_code, frame.close_reason) == (1008, "token expired")
    assert time.time() <= exp + 5
    ws.close()


# -- kid between two JWKS providers of one issuer ----------------------------------------------------


class JwksServer:
    """Serves ``{"keys": keys}`` on every path; counts its hits."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
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
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
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


def jwk(name: str, kid: str) -> dict[str, Any]:
    public = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key(name).public_key(), as_dict=True)
    return {**public, "kid": kid, "alg": "RS256", "use": "sig"}


def regional_token(key: str, kid: str | None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(STAFF, **overrides), rsa_key(key), algorithm="RS256", headers=headers or None)


async def test_kid_picks_between_two_jwks_providers_of_one_issuer(
    gateway, upstream, jwks_server, log_events, monkeypatch
):
    monkeypatch.setenv("WSGATE_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    east, west = await jwks_server(), await jwks_server()
    east.keys, west.keys = [jwk("east", "e1")], [jwk("west", "w1")]
    regional = {
        name: {
            "algorithms": ["RS256"],
            "issuer": STAFF,
            "jwks_url": server.url,
            "jwks_min_refresh": "1s",
            "required_claims": {"region": name},
        }
        for name, server in (("east", east), ("west", west))
    }
    gw = await gateway(policy(upstream, regional, auth=("east", "west")))
    for region, key in (("east", "e1"), ("west", "w1")):
        ws, _, _ = await opened(gw.port, bearer(regional_token(region, key, sub=region, region=region)))
        await close_session(ws)
        assert (await log_events.wait_for("session.open", subject=region))["provider"] == region
    # the kid chose east, and east alone judges it: its required claim, its key
    status, body = await refused(gw.port, bearer(regional_token("east", "e1", region="west")))
    assert (status, body["error"]) == (403, "claims")
    status, body = await refused(gw.port, bearer(regional_token("west", "e1", region="east")))
    assert (status, body["detail"]) == (401, "token signature does not verify")
    # a kid neither set holds, and no kid at all
    status, body = await refused(gw.port, bearer(regional_token("east", "x9", region="east")))
    assert (status, body["detail"]) == (401, "no key for this token (unknown kid)")
    status, body = await refused(gw.port, bearer(regional_token("east", None, region="east")))
    assert (status, body["detail"]) == (401, "token has no kid to pick one of its issuer's providers")
    # a key published since the last fetch is found: the unknown kid refetches (once per min refresh)
    await asyncio.sleep(1.1)
    west.keys.append(jwk("west2", "w2"))
    ws, _, _ = await opened(gw.port, bearer(regional_token("west2", "w2", sub="new", region="west")))
    await close_session(ws)
    assert (await log_events.wait_for("session.open", subject="new"))["provider"] == "west"


# -- reload -----------------------------------------------------------------------------------------


async def test_reload_closes_the_sessions_of_a_provider_no_longer_listed(gateway, upstream, providers):
    gw = await gateway(policy(upstream, providers))
    staff, _, _ = await opened(gw.port, bearer(staff_token(sub="alice")))
    partner, _, _ = await opened(gw.port, path=f"/echo?partner_token={partner_token(sub='bob')}")
    assert (
        gw.gateway.apply_policy(parse_policy(policy_text(policy(upstream, providers, auth=["staff"])))) == 1
    )
    frame = await partner.recv_close(timeout=5)
    assert (frame.close_code, frame.close_reason) == (1008, "policy changed")
    partner.close()
    staff.send_frame(0x1, b"still here")
    assert await staff.recv_message() == (TEXT, b"still here")
    # the staff provider now wants another audience: its live session's token no longer passes
    providers["staff"]["audiences"] = ["another-app"]
    assert (
        gw.gateway.apply_policy(parse_policy(policy_text(policy(upstream, providers, auth=["staff"])))) == 1
    )
    frame = await staff.recv_close(timeout=5)
    assert (frame.close_code, frame.close_reason) == (1008, "policy changed")
    staff.close()
