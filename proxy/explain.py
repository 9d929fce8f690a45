"""``wsgate explain``: how a policy would judge one handshake, guard by guard, without a server.

The request is built as a real upgrade request and judged by the guard registry the gateway's pipeline
runs, in the same order, each guard saying what its step prints (:meth:`~proxy.guards.base.Guard.explain`).
Rate limits and connection caps depend on live traffic, so they are reported with their configured values
and not evaluated. With ``claims`` instead of a token, the signature step is skipped and the claims are
judged as a verified token's would be. The route is matched on the ``host`` given (none: only routes
without a host match), and a ``client_certificate`` is judged as if the TLS handshake had verified it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from proxy.errors import Rejection
from proxy.guards.base import ExplainInput
from proxy.guards.context import HandshakeContext
from proxy.guards.registry import GUARDS
from proxy.guards.slots import LimiterSlots
from proxy.guards.token import provider_by_issuer, unverified_issuer
from proxy.handshake import Pipeline
from proxy.limiter.memory import MemoryLimiter
from proxy.policy.model import Policy, Route
from proxy.request import ClientCertificate, HandshakeRequest


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
    #: Why the answer cannot be given here ("" when it can): a step needs a secret that is not set.
    undecided: str = ""
    host: str | None = None
    client_certificate: ClientCertificate | None = None

    @property
    def admitted(self) -> bool:
        return self.status == 101 and not self.undecided

    def render(self) -> str:
        route = self.route
        host = f" (Host {self.host})" if self.host is not None else ""
        lines = [f"request   GET {self.path}{host} from {self.client_ip}"]
        if self.client_certificate is not None:
            certificate = self.client_certificate
            lines.append(f"cert      {certificate.subject} (sha256 {certificate.sha256[:16]}...)")
        if route is None:
            lines.append("route     none matches")
        else:
            auth = ", ".join(route.auth) or "none"
            lines.append(f"route     {route.label} ({route.match}) -> {route.upstream.url}, auth: {auth}")
        for number, step in enumerate(self.steps, 1):
            line = f"  {number}. {step.guard:<24} {step.verdict}"
            lines.append(f"{line}: {step.detail}" if step.detail else line)
        if self.undecided:
            lines.append(f"answer    undecided: {self.undecided}")
        elif self.admitted:
            lines.append(
                "answer    101 Switching Protocols (the upstream is connected next; 502 if that fails)"
            )
        else:
            lines.append(f"answer    {self.status} {self.reason}: {self.detail}")
        return "\n".join(lines) + "\n"


def _request(
    policy: Policy,
    route: Route | None,
    path: str,
    client_ip: str,
    origin: str | None,
    token: str | None,
    host: str | None = None,
) -> HandshakeRequest:
    headers = [
        ("host", host if host is not None else "explain"),
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
        providers = policy.route_providers(route) if route is not None else ()
        # The token goes where the provider its iss picks looks first (the first provider without one).
        provider = provider_by_issuer(unverified_issuer(token), providers) if providers else None
        if provider is None and providers:
            provider = providers[0]
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


async def explain(
    policy: Policy,
    path: str,
    client_ip: str,
    origin: str | None = None,
    token: str | None = None,
    claims: dict[str, Any] | None = None,
    host: str | None = None,
    client_certificate: ClientCertificate | None = None,
) -> Explanation:
    """Judge ``GET path`` from ``client_ip`` (with ``Host: host``, and ``client_certificate`` as if TLS
    verified it) as the gateway would, guard by guard."""
    probe = _request(policy, None, path, client_ip, origin, None, host)
    route = policy.match_route(probe.path, probe.host if host is not None else None)
    result = Explanation(path, client_ip, route, host=host, client_certificate=client_certificate)
    if route is None:
        result.status, result.reason, result.detail = 404, "no_route", f"no route for {path}"
        return result
    if claims is not None and route.auth:
        token = None
    request = _request(policy, route, path, client_ip, origin, token, host)
    request.client_certificate = client_certificate
    limiter = MemoryLimiter()
    context = HandshakeContext(
        request=request,
        policy=policy,
        route=route,
        limiter=limiter,
        verifiers=Pipeline(policy, limiter).verifiers,
        client_ip=client_ip,
        slots=LimiterSlots(limiter),
    )
    given = ExplainInput(claims=claims)
    refused: Rejection | None = None
    for guard in GUARDS:
        if refused is not None or result.undecided:
            result.steps.append(Step(guard.name, "not reached"))
            continue
        explained = await guard.explain(context, given)
        result.steps.append(Step(explained.name or guard.name, explained.verdict, explained.detail))
        refused = explained.rejection
        if explained.undecided:
            result.undecided = explained.detail
    if refused is not None:
        result.status, result.reason, result.detail = refused.status, refused.reason, refused.detail
    return result
