"""Origin allowlists: the defence against cross-site WebSocket hijacking.

Browsers always send ``Origin`` on a WebSocket handshake; a page on another site can open a WebSocket to us
with the user's cookies, and only the Origin tells us so.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """``https://app.example.com`` (exact) or ``https://*.example.com`` (any subdomain, not the apex)."""

    scheme: str
    host: str
    port: int | None
    wildcard: bool

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


def origin_allowed(origin: str, patterns: tuple[OriginPattern, ...]) -> bool:
    """Whether an ``Origin`` header value fits any pattern; ``null`` and junk never do."""
    try:
        split = urlsplit(origin.strip())
        port = split.port
    except ValueError:
        return False
    host = (split.hostname or "").lower()
    if not host or split.scheme not in ("http", "https"):
        return False
    return any(pattern.matches(split.scheme, host, port) for pattern in patterns)
