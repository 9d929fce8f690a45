"""Judging one upgrade request: route, draining, client IP, then every guard of the registry in order.

The outcome is an :class:`Admission` (what the upstream connection and the session need) or a
:class:`~proxy.errors.Rejection`:

==========================  ====================================
route (Host, then path)      404 ``no_route``
draining                     503 ``draining``
the guard registry           :data:`proxy.guards.registry.GUARDS`, each with its own refusals
==========================  ====================================

Nothing here touches a socket; :mod:`proxy.handshake_flow` does the I/O around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.clientip import resolve_client_ip
from proxy.errors import DRAINING, Rejection
from proxy.guards.context import HandshakeContext, Identity
from proxy.guards.jwks import JwksKeys
from proxy.guards.registry import GUARDS
from proxy.guards.slots import LimiterSlots
from proxy.guards.token import TokenVerifier
from proxy.limiter import Limiter
from proxy.policy.model import AuthProvider, Policy, Route
from proxy.request import HandshakeRequest

__all__ = ["Admission", "HandshakeRequest", "Pipeline"]


@dataclass(frozen=True, slots=True)
class Admission:
    """A handshake that passed every guard: what the upstream connection and the session need."""

    route: Route
    client_ip: str
    #: The X-Forwarded-For value for the upstream (the trusted chain plus the peer).
    forwarded_for: str
    identity: Identity | None = None
    #: The route's auth providers (none on an open route): every place a token of theirs travels, so none
    #: is forwarded, whichever provider took the token.
    providers: tuple[AuthProvider, ...] = ()


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

    async def admit(
        self, request: HandshakeRequest, slots: LimiterSlots, draining: bool = False
    ) -> Admission:
        """Run every guard for one request; the caps take their limiter slots into ``slots``, which the
        caller owns (and releases) whatever the outcome.

        Raises:
            Rejection: the first guard that said no.
        """
        policy = self.policy
        route = policy.match_route(request.path, request.host)
        if route is None:
            raise Rejection(404, "no_route", f"no route for {request.path}")
        if draining:
            raise DRAINING()
        client_ip, forwarded_for = resolve_client_ip(
            request.peer_ip,
            request.header_values("x-forwarded-for"),
            policy.trusted_proxies,
        )
        request.client_ip = client_ip
        context = HandshakeContext(
            request=request,
            policy=policy,
            route=route,
            limiter=self.limiter,
            verifiers=self.verifiers,
            client_ip=client_ip,
            slots=slots,
        )
        try:
            for guard in GUARDS:
                # run_check's work inline: most guards answer at once, and a coroutine each costs
                outcome = guard.check(context)
                verdict = outcome if outcome is None or isinstance(outcome, Rejection) else await outcome
                if verdict is not None:
                    raise verdict
        finally:
            # a refused token's fingerprint, for the refusal's log line
            request.token_fingerprint = context.token_fingerprint
            request.token_provider = context.token_provider
        providers = policy.route_providers(route)
        return Admission(route, client_ip, forwarded_for, context.identity, providers)
