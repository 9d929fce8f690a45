"""The token and revocation guards as registry entries.

:mod:`proxy.guards.token` finds and verifies tokens; these guards put that to work at the handshake, judge
live sessions again when the policy changes, and say what ``wsgate explain`` prints.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import jwt

from proxy.errors import Rejection
from proxy.guards.base import Explained, ExplainInput, LiveSession, OfflineGuard
from proxy.guards.context import HandshakeContext, Identity
from proxy.guards.token import (
    check_revocation,
    check_token,
    claims_allowed,
    find_route_token,
    is_revoked,
    provider_by_issuer,
    rejection_for,
    unverified_issuer,
    validation,
)
from proxy.policy.model import AuthProvider, Policy, Route
from proxy.request import HandshakeRequest


class TokenGuard(OfflineGuard):
    name = "token"

    async def check(self, context: HandshakeContext) -> Rejection | None:
        return await check_token(context)

    def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
        """ "auth" when the session's provider is no longer one of the route's (or the route now needs a
        token at all), or its token's iss or aud no longer satisfies the provider; "claims" when its
        claims no longer satisfy the provider's required claims. The signature is not judged again: the
        token itself is not kept, and its expiry has a timer of its own."""
        if not route.auth:
            return None
        identity = session.identity
        if identity is None or identity.provider not in route.auth:
            return "auth"
        provider = policy.provider(identity.provider)
        if not issuer_and_audience_hold(identity.claims, provider):
            return "auth"
        if claims_allowed(identity.claims, provider.required_claims) is not None:
            return "claims"
        return None

    async def explain(self, context: HandshakeContext, given: ExplainInput) -> Explained:
        route = context.route
        providers = context.policy.route_providers(route)
        if given.claims is None and providers:
            provider = _verifying_provider(context.request, providers)
            if provider is not None and provider.secret is None and provider.secret_env is not None:
                return Explained(
                    "not evaluated",
                    f"the secret in {provider.secret_env} is not set here: set it to verify the "
                    "token, or pass --claims to judge its claims",
                    undecided=True,
                )
        if given.claims is None:
            explained = await super().explain(context, given)
        else:
            verdict = judge_claims(context, given.claims)
            passed = self.passed(context) if verdict is None else ""
            explained = Explained.of(verdict, passed, "token (claims given)")
        if explained.rejection is not None and len(providers) > 1 and context.token_provider is None:
            # Why none of the route's providers took the token: what each would have needed.
            wanted = "; ".join(f"{provider.name}: {_issuer_text(provider)}" for provider in providers)
            return replace(explained, detail=f"{explained.detail} (providers {wanted})")
        return explained

    def passed(self, context: HandshakeContext) -> str:
        if not context.route.auth:
            return "open route (auth: none)"
        identity = context.identity
        if identity is None:
            return ""
        return f"subject {identity.subject!r} via {identity.source}, provider {identity.provider!r}"


def _verifying_provider(
    request: HandshakeRequest, providers: tuple[AuthProvider, ...]
) -> AuthProvider | None:
    """The provider that would verify the request's token, chosen by its iss as the check chooses (None
    without a token, or with two: the check says why)."""
    try:
        found = find_route_token(request, providers)
    except Rejection:
        return None
    if found is None:
        return None
    return providers[0] if len(providers) == 1 else provider_by_issuer(unverified_issuer(found[0]), providers)


def _issuer_text(provider: AuthProvider) -> str:
    if provider.issuer is None:
        return "any other iss"
    keyed = ", by kid from its JWKS" if provider.jwks_url is not None else ""
    return f"iss {provider.issuer!r}{keyed}"


def issuer_and_audience_hold(claims: dict[str, Any], provider: AuthProvider) -> bool:
    """Whether claims a provider once verified still satisfy its ``issuer`` and ``audiences`` (as PyJWT
    checks them: ``aud`` a string or a list holding one of the audiences)."""
    if provider.issuer is not None and claims.get("iss") != provider.issuer:
        return False
    if provider.audiences:
        audience = claims.get("aud")
        held = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
        if not any(item in provider.audiences for item in held):
            return False
    return True


class RevocationGuard(OfflineGuard):
    name = "revocation"

    def check(self, context: HandshakeContext) -> Rejection | None:
        return check_revocation(context)

    def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
        identity = session.identity
        return "revoked" if identity is not None and is_revoked(identity, policy) else None

    def passed(self, context: HandshakeContext) -> str:
        return ""


def judge_claims(context: HandshakeContext, claims: dict[str, Any]) -> Rejection | None:
    """The token step for claims given instead of a token: PyJWT's own claim checks (exp, nbf, iat, iss,
    aud, required claims, leeway) on the claims as if a valid signature carried them, then the route's
    claim rules. On a pass the context holds the identity the claims describe."""
    providers = context.policy.route_providers(context.route)
    if not providers:
        return None
    provider = provider_by_issuer(claims.get("iss"), providers)
    if provider is None:
        return Rejection(401, "auth_invalid", "token issuer matches no provider of this route")
    context.token_provider = provider.name
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
