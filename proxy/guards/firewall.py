"""The firewall guard: the policy's CIDR rules, then the route's; decided before any token is parsed."""

from __future__ import annotations

from proxy.errors import Rejection
from proxy.guards.context import HandshakeContext


def check_firewall(context: HandshakeContext) -> Rejection | None:
    """403 ``firewall`` unless both the policy's and the route's firewall allow the client IP."""
    ip = context.client_address
    route_firewall = context.route.firewall
    if ip is None:
        allowed = context.policy.firewall.allows_text(context.client_ip) and (
            route_firewall is None or route_firewall.allows_text(context.client_ip)
        )
    else:
        allowed = context.policy.firewall.allows(ip) and (route_firewall is None or route_firewall.allows(ip))
    if allowed:
        return None
    return Rejection(403, "firewall", "client address not allowed")
