"""The handshake pipeline: from a parsed upgrade request to an :class:`Admission` or a :class:`Rejection`.

Guards run in the order a reader of the policy expects, cheapest first, and each returns ``None`` to pass
or a :class:`~proxy.errors.Rejection`:

==========================  ====================================
route                        404 ``no_route``
draining                     503 ``draining``
WebSocket upgrade            400/426 ``bad_request``
firewall (policy, route)     403 ``firewall``
origin                       403 ``origin``
handshakes per IP            429 ``rate_limited`` + Retry-After
connections per IP           429 ``conn_limit``
token                        401 ``auth_missing`` / ``auth_invalid`` / ``auth_expired``, 403 ``claims``
revocation                   401 ``revoked``
connections per subject      429 ``conn_limit``
==========================  ====================================

Nothing here touches a socket, so every step is testable on its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy.clientip import resolve_client_ip
from proxy.errors import Rejection
from proxy.frames import is_valid_client_key
from proxy.guards.context import HandshakeContext, Identity
from proxy.guards.firewall import check_firewall
from proxy.guards.jwks import JwksKeys
from proxy.guards.limits import check_connections_per_ip, check_connections_per_subject, check_handshake_rate
from proxy.guards.origin import check_origin
from proxy.guards.token import TokenVerifier, check_revocation, check_token
from proxy.limiter import Limiter
from proxy.policy.model import AuthProvider, Policy, Route
from proxy.request import HandshakeRequest

__all__ = ["GUARDS", "Admission", "HandshakeRequest", "Pipeline", "check_upgrade"]


@dataclass(frozen=True, slots=True)
class Admission:
    """A handshake that passed every guard: what the upstream connection and the session need."""

    route: Route
    client_ip: str
    #: The X-Forwarded-For value for the upstream (the trusted chain plus the peer).
    forwarded_for: str
    identity: Identity | None = None
    #: The route's auth provider (None on an open route): where its token travels, so it is not forwarded.
    provider: AuthProvider | None = None
    #: Limiter slots held for the session's lifetime.
    slots: tuple[str, ...] = field(default=())


Guard = Callable[[HandshakeContext], "Rejection | Awaitable[Rejection | None] | None"]


def check_upgrade(context: HandshakeContext) -> Rejection | None:
    """The request must be a well-formed RFC 6455 opening handshake (section 4.2.1)."""
    request = context.request
    if "websocket" not in request.header_tokens("upgrade"):
        return Rejection(
            426,
            "bad_request",
            "this route only speaks WebSocket; send an Upgrade: websocket request",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )
    if request.method != "GET":
        return Rejection(400, "bad_request", "a WebSocket handshake must use GET", (("Allow", "GET"),))
    if request.http_version != "1.1":
        return Rejection(400, "bad_request", "a WebSocket handshake needs HTTP/1.1")
    if "upgrade" not in request.header_tokens("connection"):
        return Rejection(400, "bad_request", "missing 'Connection: Upgrade'")
    if request.header("sec-websocket-version") != "13":
        return Rejection(
            426, "bad_request", "unsupported WebSocket version; use 13", (("Sec-WebSocket-Version", "13"),)
        )
    key = request.header("sec-websocket-key")
    if key is None or not is_valid_client_key(key):
        return Rejection(400, "bad_request", "missing or malformed Sec-WebSocket-Key")
    return None


#: The guards, in the order they run (see the module docstring).
GUARDS: tuple[Guard, ...] = (
    check_upgrade,
    check_firewall,
    check_origin,
    check_handshake_rate,
    check_connections_per_ip,
    check_token,
    check_revocation,
    check_connections_per_subject,
)


class Pipeline:
    """The guards with the state they keep across handshakes: the limiter and the token verifiers."""

    def __init__(
        self,
        policy: Policy,
        limiter: Limiter,
        previous: Pipeline | None = None,
        on_jwks_refresh: Callable[[str, str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.limiter = limiter
        self._on_jwks_refresh = on_jwks_refresh
        self.verifiers = {provider.name: self._verifier(provider, previous) for provider in policy.auth}

    def _verifier(self, provider: AuthProvider, previous: Pipeline | None) -> TokenVerifier:
        old = previous.verifiers.get(provider.name) if previous is not None else None
        if old is not None and old.provider == provider:
            return old  # same provider: keep its JWKS and verified-token caches
        jwks = None
        if provider.jwks_url is not None:
            jwks = JwksKeys(
                provider.name,
                provider.jwks_url,
                provider.jwks_cache_ttl,
                provider.jwks_min_refresh,
                provider.jwks_timeout,
                self._on_jwks_refresh,
            )
        return TokenVerifier(provider, jwks)

    async def admit(self, request: HandshakeRequest, draining: bool = False) -> Admission:
        """Run every guard for one request.

        Raises:
            Rejection: the first guard that said no; limiter slots taken before it are given back.
        """
        policy = self.policy
        route = policy.match_route(request.path)
        if route is None:
            raise Rejection(404, "no_route", f"no route for {request.path}")
        if draining:
            raise Rejection(503, "draining", "the gateway is shutting down; retry", (("Retry-After", "1"),))
        client_ip, forwarded_for = resolve_client_ip(
            request.peer_ip,
            request.header_values("x-forwarded-for"),
            policy.trusted_proxies,
        )
        request.client_ip = client_ip
        context = HandshakeContext(request, policy, route, self.limiter, self.verifiers, client_ip)
        try:
            for guard in GUARDS:
                verdict = guard(context)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
                if verdict is not None:
                    raise verdict
        except BaseException:
            await self.release(tuple(context.slots))
            if context.token_fingerprint is not None:
                request.token_fingerprint = context.token_fingerprint
            raise
        provider = policy.provider(route.auth) if route.auth is not None else None
        return Admission(route, client_ip, forwarded_for, context.identity, provider, tuple(context.slots))

    async def release(self, slots: tuple[str, ...]) -> None:
        """Give back the limiter slots of a session that ended (or a handshake that failed)."""
        for key in slots:
            await self.limiter.release(key)
