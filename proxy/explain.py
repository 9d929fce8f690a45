"""``wsgate explain``: how a policy would judge one handshake, guard by guard, without a server.

The request is built as a real upgrade request and judged by the same guard functions, in the same order,
as the gateway's pipeline. Rate limits and connection caps depend on live traffic, so they are reported
with their configured values and not evaluated. With ``claims`` instead of a token, the signature step is
skipped and the claims are judged as a verified token's would be.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt

from proxy.errors import Rejection
from proxy.guards.context import HandshakeContext, Identity
from proxy.guards.firewall import check_firewall
from proxy.guards.limits import check_connections_per_ip, check_connections_per_subject, check_handshake_rate
from proxy.guards.origin import check_origin
from proxy.guards.token import check_revocation, check_token, claims_allowed, rejection_for, validation
from proxy.handshake import GUARDS, Guard, Pipeline, check_upgrade
from proxy.limiter.memory import MemoryLimiter
from proxy.policy.model import Policy, Route
from proxy.request import HandshakeRequest

_NAMES: dict[Guard, str] = {
    check_upgrade: "websocket upgrade",
    check_firewall: "firewall",
    check_origin: "origin",
    check_handshake_rate: "handshakes per IP",
    check_connections_per_ip: "connections per IP",
    check_token: "token",
    check_revocation: "revocation",
    check_connections_per_subject: "connections per subject",
}
_RUNTIME = {check_handshake_rate, check_connections_per_ip, check_connections_per_subject}


@dataclass(slots=True)
class Step:
    guard: str
    #: "pass", "refuse", "not evaluated" (depends on live traffic) or "not reached".
    verdict: str
    detail: str = ""


@dataclass(slots=True)
class Explanation:
    path: str
    client_ip: str
    route: Route | None
    steps: list[Step] = field(default_factory=list)
    #: The HTTP status the client would get (101 when every evaluated guard passes) and why.
    status: int = 101
    reason: str = ""
    detail: str = ""

    @property
    def admitted(self) -> bool:
        return self.status == 101

    def render(self) -> str:
        route = self.route
        lines = [f"request   GET {self.path} from {self.client_ip}"]
        if route is None:
            lines.append("route     none matches")
        else:
            auth = route.auth or "none"
            lines.append(f"route     {route.path} ({route.match}) -> {route.upstream.url}, auth: {auth}")
        for number, step in enumerate(self.steps, 1):
            line = f"  {number}. {step.guard:<24} {step.verdict}"
            lines.append(f"{line}: {step.detail}" if step.detail else line)
        if self.admitted:
            lines.append(
                "answer    101 Switching Protocols (the upstream is connected next; 502 if that fails)"
            )
        else:
            lines.append(f"answer    {self.status} {self.reason}: {self.detail}")
        return "\n".join(lines) + "\n"


def _runtime_detail(guard: Guard, route: Route, policy: Policy) -> str:
    limits = route.limits
    if guard is check_handshake_rate:
        if policy.limits.handshakes_per_ip is None:
            return "no limit set"
        rate, burst = policy.limits.handshakes_per_ip, policy.limits.handshake_burst
        return f"{rate:g}/s, burst {burst}; depends on traffic"
    if guard is check_connections_per_ip:
        cap = policy.limits.connections_per_ip
        return "no limit set" if cap is None else f"at most {cap}; depends on live sessions"
    cap = limits.connections_per_subject
    return "no limit set" if cap is None else f"at most {cap}; depends on live sessions"


def _request(
    policy: Policy, route: Route | None, path: str, client_ip: str, origin: str | None, token: str | None
) -> HandshakeRequest:
    headers = [
        ("host", "explain"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ]
    if origin is not None:
        headers.append(("origin", origin))
    target = path
    if token is not None:
        source = "header"
        provider = policy.provider(route.auth) if route is not None and route.auth is not None else None
        if provider is not None:
            source = provider.token_sources[0]
        if source == "query" and provider is not None:
            separator = "&" if "?" in target else "?"
            target = f"{target}{separator}{urlencode({provider.query_parameter: token})}"
        elif source == "cookie" and provider is not None:
            headers.append(("cookie", f"{provider.cookie_name}={token}"))
        elif source == "subprotocol" and provider is not None:
            headers.append(("sec-websocket-protocol", f"{provider.subprotocol_prefix}{token}"))
        else:
            headers.append(("authorization", f"Bearer {token}"))
    return HandshakeRequest.build("explain", "GET", target, "1.1", headers, client_ip, client_ip, False)


def _judge_claims(context: HandshakeContext, claims: dict[str, Any]) -> Rejection | None:
    """The token step for ``--claims``: PyJWT's own claim checks (exp, nbf, iat, iss, aud, required
    claims, leeway) on the claims as if a valid signature carried them, then the route's claim rules."""
    route = context.route
    if route.auth is None:
        return None
    provider = context.policy.provider(route.auth)
    key = os.urandom(32)
    try:
        token = jwt.encode(claims, key, algorithm="HS256")
        jwt.decode(token, key, algorithms=["HS256"], **validation(provider))
    except jwt.PyJWTError as error:
        return rejection_for(error)
    except (TypeError, ValueError) as error:
        return Rejection(401, "auth_invalid", f"malformed claims: {error}")
    broken = claims_allowed(claims, provider.required_claims)
    if broken is not None:
        return Rejection(403, "claims", f"claim {broken.claim!r} does not allow this route")
    subject, token_id = claims.get("sub"), claims.get("jti")
    context.identity = Identity(
        provider=provider.name,
        subject=str(subject) if subject is not None else None,
        token_id=str(token_id) if token_id is not None else None,
        expires_at=None,
        fingerprint="(claims)",
        source="claims",
        claims=claims,
    )
    return None


async def explain(
    policy: Policy,
    path: str,
    client_ip: str,
    origin: str | None = None,
    token: str | None = None,
    claims: dict[str, Any] | None = None,
) -> Explanation:
    """Judge ``GET path`` from ``client_ip`` as the gateway would, guard by guard."""
    route = policy.match_route(_request(policy, None, path, client_ip, origin, None).path)
    result = Explanation(path, client_ip, route)
    if route is None:
        result.status, result.reason, result.detail = 404, "no_route", f"no route for {path}"
        return result
    if claims is not None and route.auth is not None:
        token = None
    request = _request(policy, route, path, client_ip, origin, token)
    pipeline = Pipeline(policy, MemoryLimiter())
    context = HandshakeContext(request, policy, route, MemoryLimiter(), pipeline.verifiers, client_ip)
    refused: Rejection | None = None
    for guard in GUARDS:
        name = _NAMES.get(guard, getattr(guard, "__name__", "guard"))
        if refused is not None:
            result.steps.append(Step(name, "not reached"))
            continue
        if guard in _RUNTIME:
            result.steps.append(Step(name, "not evaluated", _runtime_detail(guard, route, policy)))
            continue
        if guard is check_token and claims is not None:
            verdict: Rejection | None = _judge_claims(context, claims)
            name = "token (claims given)"
        else:
            outcome = guard(context)
            verdict = await outcome if inspect.isawaitable(outcome) else outcome
        if verdict is None:
            result.steps.append(Step(name, "pass", _pass_detail(guard, context)))
        else:
            refused = verdict
            result.steps.append(Step(name, "refuse", f"{verdict.status} {verdict.reason}: {verdict.detail}"))
    if refused is not None:
        result.status, result.reason, result.detail = refused.status, refused.reason, refused.detail
    return result


def _pass_detail(guard: Guard, context: HandshakeContext) -> str:
    if guard is check_token:
        identity = context.identity
        if context.route.auth is None:
            return "open route (auth: none)"
        if identity is not None:
            return f"subject {identity.subject!r} via {identity.source}"
    if guard is check_origin and context.request.header("origin") is None:
        return "no Origin sent (allowed on this route)"
    return ""
