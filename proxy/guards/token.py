"""The token guard: find the JWT a provider accepts, verify it with PyJWT, check required claims.

Guarantees: ``alg: none`` and any algorithm outside the provider's allowlist are refused before a key is
touched; the key comes only from the policy (secret, PEM file, or the provider's own JWKS) -- ``jku``,
``jwk``, ``x5u`` and ``kid`` in a token never name a location, ``kid`` is only a dictionary key; an
oversized token is refused unparsed; a verified token is cached by its SHA-256 until its ``exp`` so a
reconnect storm does not verify RSA signatures again. The raw token is never logged: only
:func:`fingerprint`.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qsl

import jwt

from proxy.errors import Rejection
from proxy.guards.context import HandshakeContext, Identity
from proxy.guards.jwks import JwksKeys
from proxy.headers import cookie_value, subprotocol_list
from proxy.policy.model import AuthProvider, ClaimRule, Revocation
from proxy.request import HandshakeRequest

_CHALLENGE = 'Bearer realm="wsgate"'


def fingerprint(token: str) -> str:
    """First 12 hex digits of the token's SHA-256: enough to correlate log lines, useless to replay."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def _unauthorized(reason: str, detail: str, error: str = "invalid_token") -> Rejection:
    return Rejection(401, reason, detail, (("WWW-Authenticate", f'{_CHALLENGE}, error="{error}"'),))


def find_token(request: HandshakeRequest, provider: AuthProvider) -> tuple[str, str] | None:
    """The first token found in the provider's ``token_sources`` order, with the source's name."""
    for source in provider.token_sources:
        token: str | None = None
        if source == "header":
            value = request.header("authorization")
            if value is not None:
                scheme, _, credentials = value.strip().partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    token = credentials.strip()
        elif source == "query":
            for name, value in parse_qsl(request.query, keep_blank_values=False):
                if name == provider.query_parameter:
                    token = value
                    break
        elif source == "cookie":
            # The upstream request drops this cookie by the same split (headers.without_cookie).
            token = cookie_value(request.headers, provider.cookie_name)
        elif source == "subprotocol":
            # The upstream is offered the same list without every entry with the prefix.
            prefix = provider.subprotocol_prefix
            entry = next(
                (entry for entry in subprotocol_list(request.headers) if entry.startswith(prefix)), ""
            )
            token = entry[len(prefix) :]
        if token:
            return token, source
    return None


def claims_allowed(claims: dict[str, Any], rules: tuple[ClaimRule, ...]) -> ClaimRule | None:
    """The first required claim the token does not satisfy, or None."""
    for rule in rules:
        value = claims.get(rule.claim)
        if isinstance(value, list):
            present = value
        elif isinstance(value, str) and " " in value:
            present = value.split()
        else:
            present = [value]
        if not any(item in rule.allowed for item in present if item is not None):
            return rule
    return None


class TokenVerifier:
    """Verification for one provider, with its key source and its cache of verified tokens."""

    CACHE_SIZE = 10_000

    def __init__(self, provider: AuthProvider, jwks: JwksKeys | None = None) -> None:
        self.provider = provider
        self.jwks = jwks
        self._cache: OrderedDict[bytes, Identity] = OrderedDict()

    async def verify(self, token: str, source: str) -> Identity:
        """Verify a token found in ``source``.

        Raises:
            Rejection: 401 ``auth_invalid``/``auth_expired`` (with ``WWW-Authenticate``), 403 ``claims``.
        """
        provider = self.provider
        if len(token) > provider.max_token_bytes:
            raise _unauthorized("auth_invalid", f"token larger than {provider.max_token_bytes} bytes")
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached.expires_at is None or cached.expires_at > time.time():
                self._cache.move_to_end(digest)
                return cached
            del self._cache[digest]
            raise _unauthorized("auth_expired", "token expired")
        claims = await self._decode(token)
        broken = claims_allowed(claims, provider.required_claims)
        if broken is not None:
            raise Rejection(403, "claims", f"claim {broken.claim!r} does not allow this route")
        identity = self._identity(token, source, claims)
        self._cache[digest] = identity
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return identity

    async def _decode(self, token: str) -> dict[str, Any]:
        provider = self.provider
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthorized("auth_invalid", "malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in provider.algorithms:
            raise _unauthorized("auth_invalid", f"token algorithm {algorithm!r} not allowed")
        keys: list[Any]
        if provider.secret is not None:
            keys = [provider.secret]
        elif provider.public_key is not None:
            keys = [provider.public_key]
        else:
            assert self.jwks is not None
            kid = header.get("kid")
            keys = await self.jwks.candidates(kid if isinstance(kid, str) else None, algorithm)
            if not keys:
                raise _unauthorized("auth_invalid", "no key for this token (unknown kid)")
        error: jwt.PyJWTError | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=[algorithm], **validation(provider)
                )
            except jwt.InvalidSignatureError as bad_signature:
                error = bad_signature
                continue
            except jwt.PyJWTError as invalid:
                error = invalid
                break
            return claims
        raise rejection_for(error)

    def _identity(self, token: str, source: str, claims: dict[str, Any]) -> Identity:
        exp = claims.get("exp")
        subject = claims.get("sub")
        token_id = claims.get("jti")
        return Identity(
            provider=self.provider.name,
            subject=str(subject) if subject is not None else None,
            token_id=str(token_id) if token_id is not None else None,
            expires_at=float(exp) + self.provider.leeway if isinstance(exp, int | float) else None,
            fingerprint=fingerprint(token),
            source=source,
            claims=claims,
        )


def validation(provider: AuthProvider) -> dict[str, Any]:
    """PyJWT's claim checks for a provider: required claims, issuer, audiences, leeway."""
    required = ["exp"] if provider.require_exp else []
    if provider.issuer is not None:
        required.append("iss")
    if provider.audiences:
        required.append("aud")
    return {
        "audience": list(provider.audiences) or None,
        "issuer": provider.issuer,
        "leeway": provider.leeway,
        "options": {"require": required, "verify_aud": bool(provider.audiences)},
    }


def rejection_for(error: jwt.PyJWTError | None) -> Rejection:
    """The 401 a verification error earns (``auth_expired`` or ``auth_invalid``), with a short reason."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return _unauthorized("auth_expired", "token expired")
    if isinstance(error, jwt.ImmatureSignatureError):
        return _unauthorized("auth_invalid", "token not yet valid")
    if isinstance(error, jwt.InvalidIssuerError):
        return _unauthorized("auth_invalid", "token issuer not accepted")
    if isinstance(error, jwt.InvalidAudienceError):
        return _unauthorized("auth_invalid", "token audience not accepted")
    if isinstance(error, jwt.MissingRequiredClaimError):
        return _unauthorized("auth_invalid", f"token lacks the {error.claim!r} claim")
    if isinstance(error, jwt.InvalidSignatureError):
        return _unauthorized("auth_invalid", "token signature does not verify")
    if isinstance(error, jwt.InvalidAlgorithmError | jwt.InvalidKeyError):
        return _unauthorized("auth_invalid", "token algorithm does not fit the key")
    return _unauthorized("auth_invalid", "malformed token")


async def check_token(context: HandshakeContext) -> Rejection | None:
    """The token guard: pass on an open route; else find, verify and record the client's identity."""
    if context.route.auth is None:
        return None
    verifier: TokenVerifier = context.verifiers[context.route.auth]
    found = find_token(context.request, verifier.provider)
    if found is None:
        return Rejection(
            401, "auth_missing", "a bearer token is required", (("WWW-Authenticate", _CHALLENGE),)
        )
    token, source = found
    try:
        context.identity = await verifier.verify(token, source)
    except Rejection as rejection:
        context.token_fingerprint = fingerprint(token)
        return rejection
    return None


def is_revoked(identity: Identity, revoked: Revocation) -> bool:
    """Whether the policy lists the token's subject or id. Used at the handshake and again for live
    sessions on reload."""
    return (identity.subject is not None and identity.subject in revoked.subjects) or (
        identity.token_id is not None and identity.token_id in revoked.token_ids
    )


def check_revocation(context: HandshakeContext) -> Rejection | None:
    """401 ``revoked`` for a token whose subject or id the policy lists."""
    identity = context.identity
    if identity is not None and is_revoked(identity, context.policy.revoked):
        return _unauthorized("revoked", "token revoked")
    return None
