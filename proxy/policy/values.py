"""Small values a policy key is parsed into: addresses, upstream URLs, firewall rules, claim rules, origins.

Their fields are derived from one key's text (``0.0.0.0:8080``, ``wss://chat:8443/ws``, ``allow:
10.0.0.0/8``); the keys themselves are declared in :mod:`proxy.policy.model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from urllib.parse import urlsplit

from proxy.policy.declare import derived

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on. ``host`` is an IP literal or name, without IPv6 brackets."""

    host: str = derived("host:port")
    port: int = derived("host:port")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """One place a route's sessions go (an endpoint of its pool): a ws:// or wss:// URL split into what the
    connector needs."""

    url: str = derived("the route's upstream URL")
    secure: bool = derived("the URL's scheme, wss://")
    host: str = derived("the URL's host")
    port: int = derived("the URL's port, or 80/443")
    #: Path of the URL, or "" when the URL has none (then the client's path is sent as it is).
    path: str = derived("the URL's path")
    #: Query of the URL without "?", merged before the client's query.
    query: str = derived("the URL's query")
    #: For wss://: a CA bundle to verify the upstream with instead of the system's, or no verification
    #: at all (tests only). Copied from the route's ``upstream_tls`` for the connector.
    ca_file: Path | None = derived("routes[].upstream_tls.ca_file", None)
    insecure_skip_verify: bool = derived("routes[].upstream_tls.insecure_skip_verify", False)
    #: For wss://: the client certificate (and its key) wsgate presents to an upstream that asks for one.
    cert_file: Path | None = derived("routes[].upstream_tls.cert", None)
    key_file: Path | None = derived("routes[].upstream_tls.key", None)

    @property
    def label(self) -> str:
        """The endpoint as metrics and logs name it: scheme, host, port and path, never its query (which
        may carry a secret). Two endpoints of one pool never share a label (the loader refuses that)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.secure else 'ws'}://{host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class ClaimRule:
    """A required claim: its value must equal one of ``allowed``; a list claim, or a space-separated
    string such as OAuth's ``scope``, must contain one of them."""

    claim: str = derived("a key of required_claims")
    allowed: tuple[str | int | bool, ...] = derived("its value or list of values")


@dataclass(frozen=True, slots=True)
class FirewallRule:
    """``allow`` or ``deny`` one network."""

    allow: bool = derived("the rule's word, allow or deny")
    network: IPNetwork = derived("the rule's CIDR")


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """``https://app.example.com`` (exact) or ``https://*.example.com`` (any subdomain, not the apex)."""

    scheme: str = derived("an origins entry")
    host: str = derived("an origins entry")
    port: int | None = derived("an origins entry")
    wildcard: bool = derived("an origins entry starting *.")

    @classmethod
    def parse(cls, text: str) -> OriginPattern:
        """Parse an allowlist entry.

        Raises:
            ValueError: not ``scheme://host[:port]`` with scheme http or https and nothing after the host.
        """
        split = urlsplit(text.strip())
        if split.scheme not in ("http", "https"):
            raise ValueError(f"expected an origin like https://app.example.com, got {text!r}")
        if split.path not in ("", "/") or split.query or split.fragment or split.username:
            raise ValueError(f"an origin has no path, query or user: {text!r}")
        host = (split.hostname or "").lower()
        wildcard = host.startswith("*.")
        if wildcard:
            host = host[2:]
        if not host or "*" in host:
            raise ValueError(f"expected an origin like https://*.example.com, got {text!r}")
        return cls(split.scheme, host, split.port, wildcard)

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        """Whether a parsed Origin fits this pattern (ports compared with scheme defaults applied)."""
        if scheme != self.scheme or _port(scheme, port) != _port(self.scheme, self.port):
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def _port(scheme: str, port: int | None) -> int:
    if port is not None:
        return port
    return 443 if scheme == "https" else 80
