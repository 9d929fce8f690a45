"""What the guards of one handshake share: the request, the route, and what earlier guards learnt."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from proxy.guards.slots import LimiterSlots
from proxy.limiter import Limiter
from proxy.policy.model import IPAddress, Policy, Route
from proxy.request import HandshakeRequest

if TYPE_CHECKING:
    from proxy.guards.token import TokenVerifier


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the client is."""

    provider: str
    subject: str | None
    token_id: str | None
    #: Wall-clock time (UNIX seconds) at which the session must end, ``exp`` + leeway; None without ``exp``.
    expires_at: float | None
    fingerprint: str
    source: str
    claims: dict[str, Any]


@dataclass(slots=True)
class HandshakeContext:
    """One handshake in the pipeline. Guards read it and add to it (identity, limiter slots taken)."""

    request: HandshakeRequest
    policy: Policy
    route: Route
    limiter: Limiter
    #: Token verifiers by provider name (they keep their caches across handshakes).
    verifiers: dict[str, TokenVerifier]
    client_ip: str
    #: Limiter slots the caps take; owned past the handshake by whoever runs it (see LimiterSlots).
    slots: LimiterSlots
    client_address: IPAddress | None = None
    identity: Identity | None = None
    #: Fingerprint of a token that was refused, for the rejection's log line.
    token_fingerprint: str | None = None
    #: The provider chosen for the token (on a route with several, by its iss or kid), for log lines.
    token_provider: str | None = None

    def __post_init__(self) -> None:
        self.client_address = _client_address(self.client_ip)


@lru_cache(maxsize=4096)
def _client_address(client_ip: str) -> IPAddress | None:
    """The client IP parsed, once per address seen (the same clients come back; bounded whatever comes)."""
    try:
        return ip_address(client_ip)
    except ValueError:
        return None
