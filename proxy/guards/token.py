"""The token guard: find the JWT a provider accepts, verify it with PyJWT, check required claims.

Guarantees: ``alg: none`` and any algorithm outside the provider's allowlist are refused before a key is
touched; the key comes only from the policy (secret, PEM file, or the provider's own JWKS) -- ``jku``,
``jwk``, ``x5u`` and ``kid`` in a token never name a location, ``kid`` is only a dictionary key; an
oversized token is refused unparsed; a verified token is cached by its SHA-256 until its ``exp`` so a
reconnect storm does not verify RSA signatures again. The raw token is never logged: only
:func:`fingerprint`.

A route may name several providers. Each looks for the token in its own places; they must agree on one
token (two different ones are a 400). The provider is then *chosen*, never tried in turn: by the token's
``iss`` (read unverified, only to choose), and among JWKS providers of one issuer by the ``kid`` their key
sets hold; the chosen provider verifies the token fully, as if it were the route's only one.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qsl

import jwt
from jwt.algorithms import get_default_algorithms

from proxy.errors import Rejection
from proxy.guards.context import HandshakeContext, Identity
from proxy.guards.jwks import JwksKeys
from proxy.headers import cookie_value, subprotocol_list
from proxy.policy.model import AuthProvider, ClaimRule, Policy
from proxy.request import HandshakeRequest

_CHALLENGE = 'Bearer realm="wsgate"'


def fingerprint(token: str) -> str:
    """First 12 hex digits of the token's SHA-256: enough to correlate log lines, useless to replay."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def token_digest(token: str) -> bytes:
    """The key of a verified-token cache: the token's SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


def _unauthorized(reason: str, detail: str, error: str = "invalid_token") -> Rejection:
    return Rejection(401, reason, detail, (("WWW-Authenticate", f'{_CHALLENGE}, error="{error}"'),))


def find_token(request: HandshakeRequest, provider: AuthProvider) -> tuple[str, str] | None:
    """The first token found in the provider's ``token_sources`` order, with the source's name."""
    for source in provider.token_sources:
        token = token_at(request, provider, source)
        if token:
            return token, source
    return None


def token_at(request: HandshakeRequest, provider: AuthProvider, source: str) -> str | None:
    """The token in one of the provider's places (``source``); None or "" when that place holds none."""
    if source == "header":
        value = request.header("authorization")
        if value is not None:
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
        return None
    if source == "query":
        for name, value in parse_qsl(request.query, keep_blank_values=False):
            if name == provider.query_parameter:
                return value
        return None
    if source == "cookie":
        # The upstream request drops this cookie by the same split (headers.without_cookie).
        return cookie_value(request.headers, provider.cookie_name)
    # subprotocol: the upstream is offered the same list without every entry with the prefix.
    prefix = provider.subprotocol_prefix
    entry = next((entry for entry in subprotocol_list(request.headers) if entry.startswith(prefix)), "")
    return entry[len(prefix) :]


def find_route_token(
    request: HandshakeRequest, providers: tuple[AuthProvider, ...]
) -> tuple[str, dict[str, str]] | None:
    """The one token of a route's providers, and where each provider that found it did (name ->
    source); None when no provider finds one. Each provider finds its token as :func:`find_token` does.

    Raises:
        Rejection: 400 ``bad_request`` when two providers find different tokens: the gateway does not
            guess which one the client meant.
    """
    token: str | None = None
    found_by: dict[str, str] = {}
    for provider in providers:
        found = find_token(request, provider)
        if found is None:
            continue
        if token is not None and found[0] != token:
            first = next(iter(found_by.values()))
            raise Rejection(
                400,
                "bad_request",
                f"two different tokens ({first} and {found[1]}): send one",
                (("WWW-Authenticate", f'{_CHALLENGE}, error="invalid_request"'),),
            )
        token = found[0]
        found_by[provider.name] = found[1]
    return None if token is None else (token, found_by)


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
        self._validation = validation(provider)
        self._algorithms = list(provider.algorithms)
        #: A public key as PyJWT uses it, per algorithm: loaded from its PEM once, not at every token.
        self._public_keys: dict[str, Any] = _prepared_keys(provider)
        #: The key every algorithm of the provider uses, when there is one (a secret, or a public key of
        #: one type for all): then a token is parsed once in the common case. None for JWKS (keys by kid).
        self._key: Any = provider.secret
        if provider.public_key is not None and len({type(key) for key in self._public_keys.values()}) == 1:
            self._key = next(iter(self._public_keys.values()))

    async def verify(self, token: str, source: str) -> Identity:
        """Verify a token found in ``source``.

        Raises:
            Rejection: 401 ``auth_invalid``/``auth_expired`` (with ``WWW-Authenticate``), 403 ``claims``.
        """
        provider = self.provider
        if len(token) > provider.max_token_bytes:
            raise _unauthorized("auth_invalid", f"token larger than {provider.max_token_bytes} bytes")
        digest = token_digest(token)
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

    def verified_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of ``token`` if this provider verified it and still holds it in its cache."""
        cached = self._cache.get(token_digest(token))
        return cached.claims if cached is not None else None

    async def _decode(self, token: str) -> dict[str, Any]:
        if self._key is not None:
            # One parse of the token for the common case; any error is judged again below, step by step,
            # so that a refused token is refused with the same reason as it always was.
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, self._key, algorithms=self._algorithms, **self._validation
                )
            except jwt.PyJWTError:
                pass
            else:
                _check_dates(claims)
                return claims
        return await self._decode_step_by_step(token)

    async def _decode_step_by_step(self, token: str) -> dict[str, Any]:
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
            keys = [self._public_keys.get(algorithm, provider.public_key)]
        else:
            assert self.jwks is not None
            kid = header.get("kid")
            keys = await self.jwks.candidates(kid if isinstance(kid, str) else None, algorithm)
            if not keys:
                raise _unauthorized("auth_invalid", "no key for this token (unknown kid)")
        error: jwt.PyJWTError | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(token, key, algorithms=[algorithm], **self._validation)
            except jwt.InvalidSignatureError as bad_signature:
                error = bad_signature
                continue
            except jwt.PyJWTError as invalid:
                error = invalid
                break
            _check_dates(claims)
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


def _prepared_keys(provider: AuthProvider) -> dict[str, Any]:
    """The provider's public key loaded for each of its algorithms (PyJWT would load the PEM again for
    every token it verifies). An algorithm whose key does not load is left out: verification then hands
    PyJWT the PEM, which refuses it as it always did."""
    if provider.public_key is None:
        return {}
    algorithms = get_default_algorithms()
    prepared: dict[str, Any] = {}
    for name in provider.algorithms:
        try:
            prepared[name] = algorithms[name].prepare_key(provider.public_key)
        except (KeyError, ValueError, TypeError, jwt.PyJWTError):
            continue
    return prepared


def _check_dates(claims: dict[str, Any]) -> None:
    """RFC 7519 section 2: ``exp``, ``nbf`` and ``iat`` are NumericDates, JSON numbers. PyJWT also takes a
    numeric string such as ``"1796000000"``; the gateway refuses it, or such an ``exp`` would be checked
    once and then never again (the session's expiry timer and the verified-token cache read numbers).

    Raises:
        Rejection: 401 ``auth_invalid``.
    """
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _unauthorized("auth_invalid", f"claim {name!r} is not a number (RFC 7519 NumericDate)")


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


async def choose_verifier(token: str, verifiers: list[TokenVerifier]) -> TokenVerifier:
    """The verifier of the provider whose token this is, among a route's (in its list's order).

    One provider: that one. Several: the token's ``iss``, read from the unverified payload only to
    choose, picks the provider of that issuer (or the route's one provider without an issuer, which
    takes the tokens no other issuer claims); among JWKS providers sharing the issuer, the first whose
    key set holds the token's ``kid``. Whatever is chosen then verifies the whole token itself.

    Raises:
        Rejection: 401 ``auth_invalid`` when no provider is the token's (its detail never holds the
            token, nor what the client wrote in it).
    """
    if len(verifiers) == 1:
        return verifiers[0]
    for verifier in verifiers:
        # A token a provider verified before (on this route or another) carries a known iss: when that iss
        # alone chooses this provider here, the unverified decoding below is spared (a reconnect storm).
        verified = verifier.verified_claims(token)
        if verified is not None and _by_issuer(verified.get("iss"), verifiers) == [verifier]:
            return verifier
    largest = max(verifier.provider.max_token_bytes for verifier in verifiers)
    if len(token) > largest:
        raise _unauthorized("auth_invalid", f"token larger than {largest} bytes")
    try:
        header = jwt.get_unverified_header(token)
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _unauthorized("auth_invalid", "malformed token") from None
    chosen = _by_issuer(payload.get("iss"), verifiers)
    if not chosen:
        raise _unauthorized("auth_invalid", "token issuer matches no provider of this route")
    if len(chosen) == 1:
        return chosen[0]
    # Several JWKS providers of one issuer (the loader allows no other kind to share one): the kid.
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise _unauthorized("auth_invalid", "token has no kid to pick one of its issuer's providers")
    for verifier in chosen:
        assert verifier.jwks is not None
        if await verifier.jwks.holds(kid):
            return verifier
    raise _unauthorized("auth_invalid", "no key for this token (unknown kid)")


def _by_issuer(issuer: object, verifiers: list[TokenVerifier]) -> list[TokenVerifier]:
    """The verifiers an ``iss`` leaves to choose from: those of that issuer, else the one without."""
    chosen = [verifier for verifier in verifiers if verifier.provider.issuer == issuer]
    return chosen or [verifier for verifier in verifiers if verifier.provider.issuer is None]


async def check_token(context: HandshakeContext) -> Rejection | None:
    """The token guard: pass on an open route; else find the token, choose its provider, verify it, and
    record the client's identity (and, for a refusal, the token's fingerprint and provider)."""
    route = context.route
    if not route.auth:
        return None
    verifiers = [context.verifiers[name] for name in route.auth]
    try:
        found = find_route_token(context.request, tuple(verifier.provider for verifier in verifiers))
    except Rejection as rejection:
        return rejection
    if found is None:
        return Rejection(
            401, "auth_missing", "a bearer token is required", (("WWW-Authenticate", _CHALLENGE),)
        )
    token, found_by = found
    try:
        verifier = await choose_verifier(token, verifiers)
        context.token_provider = verifier.provider.name
        source = found_by.get(verifier.provider.name)
        if source is None:
            where = next(iter(found_by.values()))
            raise _unauthorized(
                "auth_invalid", f"token sent in the {where}, where its provider does not look"
            )
        context.identity = await verifier.verify(token, source)
    except Rejection as rejection:
        context.token_fingerprint = fingerprint(token)
        return rejection
    return None


def is_revoked(identity: Identity, policy: Policy) -> bool:
    """Whether the policy lists the token's subject or id, policy-wide or under the token's provider (a
    provider's list leaves other providers' tokens alone). Used at the handshake and again for live
    sessions on reload."""
    lists = [policy.revoked]
    lists += [provider.revoked for provider in policy.auth if provider.name == identity.provider]
    return any(
        (identity.subject is not None and identity.subject in revoked.subjects)
        or (identity.token_id is not None and identity.token_id in revoked.token_ids)
        for revoked in lists
    )


def check_revocation(context: HandshakeContext) -> Rejection | None:
    """401 ``revoked`` for a token whose subject or id the policy (or its provider) lists."""
    identity = context.identity
    if identity is not None and is_revoked(identity, context.policy):
        return _unauthorized("revoked", "token revoked")
    return None


def provider_by_issuer(issuer: object, providers: tuple[AuthProvider, ...]) -> AuthProvider | None:
    """The provider an ``iss`` picks among a route's, as :func:`choose_verifier` picks it before any kid
    is looked at: the first of that issuer, else the one without an issuer, else None."""
    for provider in providers:
        if provider.issuer is not None and provider.issuer == issuer:
            return provider
    return next((provider for provider in providers if provider.issuer is None), None)


def unverified_issuer(token: str) -> object:
    """The ``iss`` of a token's payload, unverified (None when it has none or does not parse): only for
    choosing where ``wsgate explain`` puts a token and which provider it names."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return None
