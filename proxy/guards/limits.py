"""Handshake-time limits: handshakes per second per IP, concurrent sessions per IP and per subject.

Slots taken here are recorded on the context; the pipeline gives them back when a later guard refuses
the handshake, and the gateway when the session ends.
"""

from __future__ import annotations

import ipaddress
import math

from proxy.errors import Rejection
from proxy.guards.context import HandshakeContext


def address_key(context: HandshakeContext) -> str:
    """The limiter's name for the client's address: the IP itself, or its IPv6 network of
    ``limits.ipv6_prefix`` bits."""
    address = context.client_address
    prefix = context.policy.limits.ipv6_prefix
    if address is None or address.version == 4 or prefix >= 128:
        return context.client_ip
    return f"{ipaddress.ip_network((address, prefix), strict=False)}"


async def check_handshake_rate(context: HandshakeContext) -> Rejection | None:
    """429 ``rate_limited`` with ``Retry-After`` once an IP exceeds ``handshakes_per_ip`` and its burst."""
    limits = context.policy.limits
    if limits.handshakes_per_ip is None:
        return None
    wait = await context.limiter.hit(
        f"hs:{address_key(context)}", limits.handshakes_per_ip, limits.handshake_burst
    )
    if wait <= 0:
        return None
    retry_after = str(max(1, math.ceil(wait)))
    return Rejection(
        429, "rate_limited", "too many handshakes from this address", (("Retry-After", retry_after),)
    )


async def check_connections_per_ip(context: HandshakeContext) -> Rejection | None:
    """429 ``conn_limit`` when the IP already has ``connections_per_ip`` sessions."""
    cap = context.policy.limits.connections_per_ip
    if cap is None:
        return None
    key = f"ip:{address_key(context)}"
    if not await context.limiter.acquire(key, cap):
        return Rejection(429, "conn_limit", f"at most {cap} connections per address", (("Retry-After", "1"),))
    context.slots.append(key)
    return None


async def check_connections_per_subject(context: HandshakeContext) -> Rejection | None:
    """429 ``conn_limit`` when the token's subject already has ``connections_per_subject`` sessions."""
    cap = context.route.limits.connections_per_subject
    identity = context.identity
    if cap is None or identity is None or identity.subject is None:
        return None
    key = f"sub:{identity.provider}:{identity.subject}"
    if not await context.limiter.acquire(key, cap):
        return Rejection(429, "conn_limit", f"at most {cap} connections per user", (("Retry-After", "1"),))
    context.slots.append(key)
    return None
