"""The token and revocation guards as registry entries.

:mod:`proxy.guards.token` finds and verifies tokens; these guards put that to work at the handshake, judge
live sessions again when the policy changes, and say what ``wsgate explain`` prints.
"""

from __future__ import annotations

import os
from typing import Any

import jwt

from proxy.errors import Rejection
from proxy.guards.base import Explained, ExplainInput, LiveSession, OfflineGuard
from proxy.guards.context import HandshakeContext, Identity
from proxy.guards.token import (
    check_revocation,
    check_token,
    claims_allowed,
    find_token,
    is_revoked,
    rejection_for,
    validation,
)
from proxy.policy.model import Policy, Route


class TokenGuard(OfflineGuard):
    name = "token"

    async def check(self, context: HandshakeContext) -> Rejection | None:
        return await check_token(context)

    def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
        """ "auth" when the route now needs another provider's token (or one at all), "claims" when the
        token's claims no longer satisfy the provider's required claims."""
        if route.auth is None:
            return None
        identity = session.identity
        if identity is None or identity.provider != route.auth:
            return "auth"
        if claims_allowed(identity.claims, policy.provider(route.auth).required_claims) is not None:
            return "claims"
        return None

    async def explain(self, context: HandshakeContext, given: ExplainInput) -> Explained:
        route = context.route
        if given.claims is None and route.auth is not None:
            provider = context.policy.provider(route.auth)
            unverifiable = provider.secret is None and provider.secret_env is not None
            if unverifiable and find_token(context.request, provider) is not None:
                return Explained(
                    "not evaluated",
                    f"the secret in {provider.secret_env} is not set here: set it to verify the "
                    "token, or pass --claims to judge its claims",
                    undecided=True,
                )
        if given.claims is None:
            return await super().explain(context, given)
        verdict = judge_claims(context, given.claims)
        return Explained.of(verdict, self.passed(context) if verdict is None else "", "token (claims given)")

    def passed(self, context: HandshakeContext) -> str:
        if context.route.auth is None:
            return "open route (auth: none)"
        identity = context.identity
        return "" if identity is None else f"subject {identity.subject!r} via {identity.source}"


class RevocationGuard(OfflineGuard):
    name = "revocation"

    def check(self, context: HandshakeContext) -> Rejection | None:
        return check_revocation(context)

    def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
        identity = session.identity
        return "revoked" if identity is not None and is_revoked(identity, policy.revoked) else None

    def passed(self, context: HandshakeContext) -> str:
        return ""


def judge_claims(context: HandshakeContext, claims: dict[str, Any]) -> Rejection | None:
    """The token step for claims given instead of a token: PyJWT's own claim checks (exp, nbf, iat, iss,
    aud, required claims, leeway) on the claims as if a valid signature carried them, then the route's
    claim rules. On a pass the context holds the identity the claims describe."""
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
