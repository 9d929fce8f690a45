"""Frozen, typed policy objects with units already converted.

Everything here is built once by :mod:`proxy.policy.load` and then only read. Sizes are bytes (``int``),
durations are seconds (``float``), rates are events per second (``float``). Hot paths read plain attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on. ``host`` is an IP literal or name, without IPv6 brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsListen:
    """TLS for the client listener (wss://)."""

    cert_file: Path
    key_file: Path
    min_version: Literal["1.2", "1.3"] = "1.2"


@dataclass(frozen=True, slots=True)
class Listen:
    """The client listener."""

    address: Address
    tls: TlsListen | None = None
    #: Every connection starts with a PROXY protocol v1/v2 header giving the real peer (behind a TCP LB).
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound and timeout, already in bytes and seconds.

    The policy-level ``limits`` are the defaults; a route's ``limits`` override the keys that make sense per
    route (see :data:`ROUTE_LIMIT_KEYS`), and :attr:`Route.limits` holds the merged result.
    A timeout of ``0`` means "no timeout".
    """

    max_message_bytes: int = 1024 * 1024
    #: Frames per message, empty ones included; 0: derived from the message size (:meth:`fragments_allowed`).
    max_fragments: int = 0
    max_header_bytes: int = 16 * 1024
    #: No data message either way for this long closes the session (0: never). Pings do not count: dead
    #: peers are found by keepalive, so a quiet but healthy session is not cut by default.
    idle_timeout: float = 0.0
    #: Keepalive: a side quiet for ``ping_interval`` is pinged, and cut if no pong within ``ping_timeout``
    #: (ping_interval 0: no pings; ping_timeout 0: pings, e.g. for NATs, but no answer required).
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    handshake_timeout: float = 10.0
    upstream_connect_timeout: float = 5.0
    close_timeout: float = 5.0
    drain_timeout: float = 30.0
    #: Handshakes per second per client IP and the burst allowed above it (None: unlimited).
    handshakes_per_ip: float | None = None
    handshake_burst: int = 1
    #: Concurrent sessions per client IP, and per token subject (None: unlimited).
    connections_per_ip: int | None = None
    connections_per_subject: int | None = None
    #: Client messages per second per session with a burst; client bytes per second with a burst.
    messages_per_connection: float | None = None
    message_burst: int = 1
    bytes_per_connection: float | None = None
    byte_burst: int = 0
    #: What a session over its message or byte rate gets: closed with 1008, or its message dropped.
    on_rate_limit: Literal["close", "drop"] = "close"
    #: Per-IP limits count an IPv6 client by this prefix: one host usually holds a whole /64, and could
    #: otherwise take a fresh address for every handshake. 128 counts each address on its own.
    ipv6_prefix: int = 64
    #: Client connections held at once, process-wide: in their TLS handshake, sending their upgrade request,
    #: being judged, and live sessions. A client arriving above it gets 503 ``overloaded``.
    max_connections: int = 10_000

    def fragments_allowed(self, max_message_bytes: int) -> int:
        """Frames a message of at most ``max_message_bytes`` may come in: ``max_fragments``, or by default
        ``max(1024, max_message_bytes // 256)`` as aiohttp does -- a fragment costs the relay a frame's
        work and the receiver a frame, so a sender needs fragments of 256 bytes on average at the size
        limit, and small limits still allow 1024."""
        return self.max_fragments or max(1024, max_message_bytes // 256)


#: YAML key under ``limits`` -> field of :class:`Limits`.
LIMIT_KEYS: dict[str, str] = {
    "max_message_size": "max_message_bytes",
    "max_fragments": "max_fragments",
    "max_header_bytes": "max_header_bytes",
    "idle_timeout": "idle_timeout",
    "ping_interval": "ping_interval",
    "ping_timeout": "ping_timeout",
    "handshake_timeout": "handshake_timeout",
    "upstream_connect_timeout": "upstream_connect_timeout",
    "close_timeout": "close_timeout",
    "drain_timeout": "drain_timeout",
    "handshakes_per_ip": "handshakes_per_ip",
    "handshake_burst": "handshake_burst",
    "connections_per_ip": "connections_per_ip",
    "connections_per_subject": "connections_per_subject",
    "messages_per_connection": "messages_per_connection",
    "message_burst": "message_burst",
    "bytes_per_connection": "bytes_per_connection",
    "byte_burst": "byte_burst",
    "on_rate_limit": "on_rate_limit",
    "ipv6_prefix": "ipv6_prefix",
    "max_connections": "max_connections",
}

#: The ``limits`` keys a route may override; the others act before a route is known or are process-wide.
ROUTE_LIMIT_KEYS: frozenset[str] = frozenset(
    {
        "max_message_size",
        "max_fragments",
        "idle_timeout",
        "ping_interval",
        "ping_timeout",
        "upstream_connect_timeout",
        "close_timeout",
        "handshakes_per_ip",
        "handshake_burst",
        "connections_per_ip",
        "connections_per_subject",
        "messages_per_connection",
        "message_burst",
        "bytes_per_connection",
        "byte_burst",
        "on_rate_limit",
    }
)


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a route's sessions go: a ws:// or wss:// URL split into what the connector needs."""

    url: str
    secure: bool
    host: str
    port: int
    #: Path of the URL, or "" when the URL has none (then the client's path is sent as it is).
    path: str
    #: Query of the URL without "?", merged before the client's query.
    query: str
    #: For wss://: a CA bundle to verify the upstream with instead of the system's, or no verification
    #: at all (tests only).
    ca_file: Path | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """One path the gateway serves and the upstream behind it."""

    path: str
    match: Literal["exact", "prefix"]
    upstream: Upstream
    #: Name of the auth provider, or None for ``auth: none`` (open route).
    auth: str | None
    limits: Limits
    #: Names of the :class:`Limits` fields the route's own ``limits`` section set. A per-handshake rate or
    #: cap listed here is the route's own bucket, on top of the policy-wide one.
    own_limits: frozenset[str] = frozenset()
    #: Message rules per direction (None: frame syntax and ``max_message_size`` only), client message rate.
    client_rules: MessageRules | None = None
    upstream_rules: MessageRules | None = None
    message_rate: MessageRate | None = None
    #: Route firewall, applied after the policy's; both must allow.
    firewall: Firewall | None = None
    #: Browser origins allowed (empty: any); whether a handshake without Origin (non-browser) passes.
    origins: tuple[OriginPattern, ...] = ()
    allow_missing_origin: bool = True
    #: Claims copied into upstream request headers (claim, header name); a client's own are dropped.
    forward_claims: tuple[tuple[str, str], ...] = ()
    #: Whether the token (Authorization header, token cookie) reaches the upstream.
    forward_token: bool = False

    def matches(self, request_path: str) -> bool:
        """Whether ``request_path`` (no query) belongs to this route.

        A prefix route ``/chat`` matches ``/chat`` and ``/chat/...`` but never ``/chatroom``.
        """
        if self.match == "exact":
            return request_path == self.path
        if request_path == self.path:
            return True
        prefix = self.path if self.path.endswith("/") else self.path + "/"
        return request_path.startswith(prefix)

    def upstream_target(self, request_path: str, query: str) -> str:
        """The request target sent upstream, nginx ``proxy_pass`` style.

        An upstream URL without a path gets the client's path unchanged; one with a path gets that path, plus
        whatever followed the route's prefix. The upstream URL's query comes first, then the client's.
        """
        upstream = self.upstream
        if not upstream.path:
            path = request_path
        elif self.match == "prefix" and request_path != self.path:
            rest = request_path[len(self.path) :]
            path = upstream.path.rstrip("/") + "/" + rest.lstrip("/")
        else:
            path = upstream.path
        joined = "&".join(part for part in (upstream.query, query) if part)
        return f"{path}?{joined}" if joined else path


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Where and how much wsgate logs; the command line's ``--log-format``/``--log-level`` win."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    #: ``auto``: readable text when stdout is a terminal, JSON lines otherwise.
    format: Literal["auto", "json", "text"] = "auto"
    #: Warnings and errors are also appended here (JSON lines), when set.
    error_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole policy file, valid and ready to serve."""

    version: int
    listen: Listen
    admin: Address
    limits: Limits
    routes: tuple[Route, ...]
    #: Peers whose X-Forwarded-For is believed.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    firewall: Firewall = field(default_factory=lambda: Firewall())
    auth: tuple[AuthProvider, ...] = ()
    revoked: Revocation = field(default_factory=lambda: Revocation())
    log: LogSettings = field(default_factory=lambda: LogSettings())
    #: The file it came from (None when parsed from a string), and the sha256 of its bytes.
    source: Path | None = None
    sha256: str = ""

    def provider(self, name: str) -> AuthProvider:
        """The auth provider called ``name`` (the loader guarantees every route's provider exists)."""
        for provider in self.auth:
            if provider.name == name:
                return provider
        raise KeyError(name)

    def match_route(self, request_path: str) -> Route | None:
        """The route for a request path: an exact route first, then the longest matching prefix."""
        best: Route | None = None
        for route in self.routes:
            if not route.matches(request_path):
                continue
            if route.match == "exact":
                return route
            if best is None or len(route.path) > len(best.path):
                best = route
        return best


# -- security guards ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimRule:
    """A required claim: its value must equal one of ``allowed``; a list claim, or a space-separated
    string such as OAuth's ``scope``, must contain one of them."""

    claim: str
    allowed: tuple[str | int | bool, ...]


@dataclass(frozen=True, slots=True)
class AuthProvider:
    """How one token issuer is checked. Exactly one key source is set: ``secret``, ``public_key`` or
    ``jwks_url``; the loader guarantees ``algorithms`` fit it (no HMAC with an RSA/EC key, never ``none``)."""

    name: str
    algorithms: tuple[str, ...]
    issuer: str | None = None
    audiences: tuple[str, ...] = ()
    #: HMAC secret, read from the environment variable ``secret_env`` at load time.
    secret: bytes | None = field(default=None, repr=False)
    secret_env: str | None = None
    #: A PEM public key (bytes), read from ``public_key_file`` at load time.
    public_key: bytes | None = field(default=None, repr=False)
    public_key_file: Path | None = None
    jwks_url: str | None = None
    jwks_cache_ttl: float = 300.0
    jwks_min_refresh: float = 30.0
    jwks_timeout: float = 5.0
    leeway: float = 0.0
    require_exp: bool = True
    token_sources: tuple[Literal["header", "query", "cookie", "subprotocol"], ...] = ("header",)
    query_parameter: str = "access_token"
    cookie_name: str = "access_token"
    subprotocol_prefix: str = "bearer."
    required_claims: tuple[ClaimRule, ...] = ()
    max_token_bytes: int = 8 * 1024


@dataclass(frozen=True, slots=True)
class MessageRules:
    """What one direction of a route may send, checked per message by the relay.

    ``max_message_bytes`` is the route's limit unless the direction overrides it. ``schema`` is the JSON
    Schema document (already read from ``schema_file``); the relay compiles it once.
    """

    max_message_bytes: int
    types: frozenset[int] = frozenset({1, 2})
    utf8: bool = True
    json: bool = False
    schema_file: Path | None = None
    schema: dict[str, object] | None = field(default=None, repr=False, hash=False)
    #: "close": the offender is closed (1003/1007/1008); "drop": the message is dropped and counted.
    on_violation: Literal["close", "drop"] = "close"

    @property
    def inspects_content(self) -> bool:
        """Whether a message's bytes must be seen whole (so fragmented messages are coalesced)."""
        return self.utf8 or self.json or self.schema is not None


@dataclass(frozen=True, slots=True)
class MessageRate:
    """Per-connection rate of client messages: a token bucket of messages and one of bytes."""

    messages_per_second: float | None = None
    message_burst: int = 1
    bytes_per_second: float | None = None
    byte_burst: int = 0
    on_limit: Literal["close", "drop"] = "close"


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


@dataclass(frozen=True, slots=True)
class Revocation:
    """Token subjects and ids refused at the handshake, and closed (1008) on reload when live."""

    subjects: frozenset[str] = frozenset()
    token_ids: frozenset[str] = frozenset()
