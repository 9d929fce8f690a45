"""The firewall guard: the policy's CIDR rules, then the route's; decided before any token is parsed."""

from __future__ import annotations

from proxy.errors import Rejection
from proxy.guards.base import LiveSession, OfflineGuard
from proxy.guards.context import HandshakeContext
from proxy.policy.model import IPAddress, Policy, Route


def firewall_allows(policy: Policy, route: Route, client_ip: str, address: IPAddress | None = None) -> bool:
    """Whether both the policy's and the route's firewall allow ``client_ip`` (``address`` is its parsed
    form, when the caller has it). Used at the handshake and again for live sessions on reload."""
    route_firewall = route.firewall
    if address is None:
        return policy.firewall.allows_text(client_ip) and (
            route_firewall is None or route_firewall.allows_text(client_ip)
        )
    return policy.firewall.allows(address) and (route_firewall is None or route_firewall.allows(address))


class FirewallGuard(OfflineGuard):
    name = "firewall"

    def check(self, context: HandshakeContext) -> Rejection | None:
        """403 ``firewall`` unless both the policy's and the route's firewall allow the client IP."""
        if firewall_allows(context.policy, context.route, context.client_ip, context.client_address):
            return None
        return Rejection(403, "firewall", "client address not allowed")

    def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
        return None if firewall_allows(policy, route, session.client_ip) else "firewall"

    def passed(self, context: HandshakeContext) -> str:
        return ""
