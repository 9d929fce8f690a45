"""Firewall: ordered CIDR rules, first match wins, then the default."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class FirewallRule:
    """``allow`` or ``deny`` one network."""

    allow: bool
    network: IPNetwork


@dataclass(frozen=True, slots=True)
class Firewall:
    """Rules read top to bottom; the first whose network holds the IP decides, else ``default_allow``."""

    rules: tuple[FirewallRule, ...] = ()
    default_allow: bool = True

    def allows(self, ip: IPAddress) -> bool:
        """Whether the first matching rule (or the default) allows ``ip``."""
        for rule in self.rules:
            if ip.version == rule.network.version and ip in rule.network:
                return rule.allow
        return self.default_allow

    def allows_text(self, ip: str) -> bool:
        """Like :meth:`allows` for an IP as text; an unparsable IP only passes a default-allow firewall
        without rules (it can match no network)."""
        try:
            return self.allows(ip_address(ip))
        except ValueError:
            return self.default_allow and not self.rules
