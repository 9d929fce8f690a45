"""JWKS: a provider's signing keys fetched asynchronously from its ``jwks_url`` and cached.

Guarantees: the event loop is never blocked (aiohttp, not PyJWT's urllib client); the set is refetched
when older than ``jwks_cache_ttl``, and for an unknown ``kid`` at most once per ``jwks_min_refresh``; a
failed fetch keeps the last good set; concurrent handshakes share one fetch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt

from proxy import logs
from proxy.algorithms import KEY_TYPE_ALGORITHMS


class JwksKeys:
    """The cached key set of one provider."""

    def __init__(
        self,
        provider: str,
        url: str,
        ttl: float,
        min_refresh: float,
        timeout: float,
        on_refresh: Callable[[str, str], None] | None = None,
    ) -> None:
        self.provider = provider
        self.url = url
        self.ttl = ttl
        self.min_refresh = min_refresh
        self.timeout = timeout
        self._on_refresh = on_refresh
        self._keys: list[dict[str, Any]] = []
        self._verifiers: dict[tuple[int, str], jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._attempted_at = -float("inf")
        self._inflight: asyncio.Future[None] | None = None

    @property
    def fetched(self) -> bool:
        """Whether a fetch was attempted (or is under way)."""
        return self._inflight is not None or self._attempted_at > -float("inf")

    async def candidates(self, kid: str | None, algorithm: str) -> list[jwt.PyJWK]:
        """Keys that may verify a token with this ``kid`` and ``alg`` header, refetching as promised."""
        await self._current()
        found = self._select(kid, algorithm)
        if not found and kid is not None and time.monotonic() - self._attempted_at >= self.min_refresh:
            await self.refresh()
            found = self._select(kid, algorithm)
        return found

    async def holds(self, kid: str) -> bool:
        """Whether the set has a key with this ``kid``: how a route picks one of several providers of
        one issuer. An unknown kid refetches the set as :meth:`candidates` does (at most once per
        ``jwks_min_refresh``), so a key published since the last fetch is found."""
        await self._current()
        if not self._has(kid) and time.monotonic() - self._attempted_at >= self.min_refresh:
            await self.refresh()
        return self._has(kid)

    def _has(self, kid: str) -> bool:
        return any(key.get("kid") == kid for key in self._keys)

    async def _current(self) -> None:
        """Wait for a fetch under way, or fetch when the set is older than its TTL."""
        if self._inflight is not None:
            # A fetch is under way (first fetch, TTL or unknown kid): wait for its keys rather than
            # judging the token by the set it is replacing.
            await asyncio.shield(self._inflight)
        now = time.monotonic()
        if now - self._fetched_at > self.ttl and now - self._attempted_at >= min(self.min_refresh, self.ttl):
            await self.refresh()

    def _select(self, kid: str | None, algorithm: str) -> list[jwt.PyJWK]:
        selected = []
        for index, key in enumerate(self._keys):
            if kid is not None and key.get("kid") != kid:
                continue
            if algorithm not in KEY_TYPE_ALGORITHMS.get(str(key.get("kty")), ()):
                continue
            if key.get("alg") not in (None, algorithm) or key.get("use") not in (None, "sig"):
                continue
            verifier = self._verifiers.get((index, algorithm))
            if verifier is None:
                try:
                    verifier = jwt.PyJWK(key, algorithm=algorithm)
                except jwt.PyJWTError:
                    continue
                self._verifiers[(index, algorithm)] = verifier
            selected.append(verifier)
        return selected

    async def refresh(self) -> None:
        """Fetch the set now (sharing a fetch already under way); on failure keep the last good set."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.get_running_loop().create_future()
        self._attempted_at = time.monotonic()
        try:
            keys = await self._fetch()
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            logs.event(
                "jwks.refresh_failed",
                provider=self.provider,
                url=self.url,
                error=str(error) or type(error).__name__,
                kept_keys=len(self._keys),
            )
            self._report("error")
        else:
            self._keys = keys
            self._verifiers = {}
            self._fetched_at = time.monotonic()
            logs.event("jwks.refreshed", provider=self.provider, keys=len(keys))
            self._report("success")
        finally:
            self._inflight.set_result(None)
            self._inflight = None

    async def _fetch(self) -> list[dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as client, client.get(self.url) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            body = json.loads(await response.read())
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list):
            raise ValueError("not a JWK set: no 'keys' list")
        return [key for key in keys if isinstance(key, dict)]

    def _report(self, result: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh(self.provider, result)
