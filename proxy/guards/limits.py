"""Handshake-time limits: handshakes per second per IP, concurrent sessions per IP and per subject.

Each limit has up to two levels. The policy-wide one is shared by every route (keys ``hs:{ip}``,
``ip:{ip}``, ``sub:{provider}:{subject}``). A route that sets the limit in its own ``limits`` section also
has its own bucket, keyed by route and client (``hs:{route}#{ip}``, ``ip:{route}#{ip}``,
``sub:{route}#{provider}:{subject}``). Both apply where both are set; the route's is checked first, so a
handshake its route refuses costs nothing of the policy-wide budget.

A shared limiter (Redis) that cannot decide in time under ``limiter.on_error: deny`` raises
:class:`~proxy.errors.LimiterUnavailable`; the guards answer it 503 ``limiter_unavailable``.

Slots are taken through the context's :class:`~proxy.guards.slots.LimiterSlots`, which gives them back when
a later guard refuses the handshake, or when the session ends.
"""

from __future__ import annotations

import ipaddress
import math
from abc import abstractmethod
from collections.abc import Callable
from typing import NamedTuple

from proxy.errors import LIMITER_UNAVAILABLE, LimiterUnavailable, Rejection
from proxy.guards.base import TrafficGuard
from proxy.guards.context import HandshakeContext
from proxy.policy.model import Limits, Policy, Route

#: Why rates and caps leave live sessions alone on reload.
_FUTURE_ONLY = "they bound future handshakes, not past ones"


def address_key(context: HandshakeContext) -> str:
    """The limiter's name for the client's address: the IP itself, or its IPv6 network of
    ``limits.ipv6_prefix`` bits."""
    address = context.client_address
    prefix = context.policy.limits.ipv6_prefix
    if address is None or address.version == 4 or prefix >= 128:
        return context.client_ip
    return f"{ipaddress.ip_network((address, prefix), strict=False)}"


class Level(NamedTuple):
    """One level of a limit: whose it is, and the limits that hold its value."""

    #: Inserted into the limiter key: "" for the policy-wide level, "{route.path}#" for the route's own
    #: (a route path holds no "#", so one route's keys never meet another's, whatever follows).
    scope: str
    limits: Limits
    #: Appended to the refusal's detail: "" or " on this route".
    where: str


#: Keys that give a route its own bucket of a limit besides the limit's own key: a route that sets only
#: ``handshake_burst`` gets its own bucket at the policy's rate with that burst.
_ALSO_OWN: dict[str, frozenset[str]] = {"handshakes_per_ip": frozenset({"handshake_burst"})}


def levels(route: Route, policy: Policy, field: str) -> list[Level]:
    """The levels of limit ``field`` (a :class:`Limits` field) that apply to ``route``, its own first."""
    found = []
    own = field in route.own_limits or not _ALSO_OWN.get(field, frozenset()).isdisjoint(route.own_limits)
    if own and getattr(route.limits, field) is not None:
        found.append(Level(f"{route.path}#", route.limits, " on this route"))
    if getattr(policy.limits, field) is not None:
        found.append(Level("", policy.limits, ""))
    return found


def _describe(route: Route, policy: Policy, field: str, value: Callable[[Limits], str], then: str) -> str:
    """Every level of a limit as ``wsgate explain`` prints it; ``value`` formats one level's value."""
    found = levels(route, policy, field)
    if not found:
        return "no limit set"
    both = len(found) > 1
    parts = [value(level.limits) + (level.where or (" policy-wide" if both else "")) for level in found]
    return "; ".join([*parts, then])


def _over_cap(detail: str) -> Rejection:
    return Rejection(429, "conn_limit", detail, (("Retry-After", "1"),))


def _rate_text(limits: Limits) -> str:
    return f"{limits.handshakes_per_ip:g}/s, burst {limits.handshake_burst}"


def _cap_text(field: str) -> Callable[[Limits], str]:
    return lambda limits: f"at most {getattr(limits, field)}"


class HandshakeRateGuard(TrafficGuard):
    name = "handshakes per IP"
    not_rejudged = _FUTURE_ONLY

    async def check(self, context: HandshakeContext) -> Rejection | None:
        """429 ``rate_limited`` with ``Retry-After`` once an IP exceeds ``handshakes_per_ip`` and its
        burst."""
        found = levels(context.route, context.policy, "handshakes_per_ip")
        if not found:
            return None
        address = address_key(context)
        for scope, limits, where in found:
            rate = limits.handshakes_per_ip
            assert rate is not None  # levels() found it set
            try:
                wait = await context.limiter.hit(f"hs:{scope}{address}", rate, limits.handshake_burst)
            except LimiterUnavailable:
                return LIMITER_UNAVAILABLE()
            if wait > 0:
                retry_after = str(max(1, math.ceil(wait)))
                detail = f"too many handshakes from this address{where}"
                return Rejection(429, "rate_limited", detail, (("Retry-After", retry_after),))
        return None

    def configured(self, route: Route, policy: Policy) -> str:
        return _describe(route, policy, "handshakes_per_ip", _rate_text, "depends on traffic")


class _CapGuard(TrafficGuard):
    """Concurrent sessions per client (a cap's limiter slots are held until the session ends): the cap of
    ``field`` at each of its levels, counted under :meth:`counted`."""

    not_rejudged = _FUTURE_ONLY
    #: The :class:`Limits` field holding the cap, the limiter key's prefix, and what one count is of (for
    #: the refusal's detail).
    field: str
    key_prefix: str
    per: str

    @abstractmethod
    def counted(self, context: HandshakeContext) -> str | None:
        """The limiter key's client part, or None when this handshake has nothing to count."""

    async def check(self, context: HandshakeContext) -> Rejection | None:
        """429 ``conn_limit`` when the client already holds the cap's sessions at any level."""
        found = levels(context.route, context.policy, self.field)
        client = self.counted(context) if found else None
        if client is None:
            return None
        for scope, limits, where in found:
            cap = getattr(limits, self.field)
            try:
                taken = await context.slots.acquire(f"{self.key_prefix}:{scope}{client}", cap)
            except LimiterUnavailable:
                return LIMITER_UNAVAILABLE()
            if not taken:
                return _over_cap(f"at most {cap} connections per {self.per}{where}")
        return None

    def configured(self, route: Route, policy: Policy) -> str:
        return _describe(route, policy, self.field, _cap_text(self.field), "depends on live sessions")


class ConnectionsPerIpGuard(_CapGuard):
    name = "connections per IP"
    field = "connections_per_ip"
    key_prefix = "ip"
    per = "address"

    def counted(self, context: HandshakeContext) -> str | None:
        return address_key(context)


class ConnectionsPerSubjectGuard(_CapGuard):
    name = "connections per subject"
    field = "connections_per_subject"
    key_prefix = "sub"
    per = "user"

    def counted(self, context: HandshakeContext) -> str | None:
        identity = context.identity
        if identity is None or identity.subject is None:
            return None
        return f"{identity.provider}:{identity.subject}"
