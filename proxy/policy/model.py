"""Frozen, typed policy objects with units already converted, and the declaration of every policy key.

Everything here is built once by :mod:`proxy.policy.load` and then only read. Sizes are bytes (``int``),
durations are seconds (``float``), rates are events per second (``float``). Hot paths read plain attributes.

Each field is a policy key (:func:`~proxy.policy.declare.key`: YAML name, kind, default, bounds, help,
where it may appear) or derived from keys (:func:`~proxy.policy.declare.derived`). The loader, ``wsgate
schema`` and the README's policy reference are built from these declarations; adding a key is adding a
field here (and, when it needs one, the line of code that uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Literal

from proxy.policy import kinds
from proxy.policy.declare import (
    POLICY,
    POLICY_AND_ROUTE,
    PROVIDER,
    ROUTE,
    Scope,
    derived,
    key,
)
from proxy.policy.values import (
    Address,
    ClaimRule,
    FirewallRule,
    IPAddress,
    IPNetwork,
    OriginPattern,
    SubjectPattern,
    Upstream,
    host_matches,
)

__all__ = [
    "Address",
    "AuthProvider",
    "CertificatePair",
    "ClaimRule",
    "Compression",
    "Firewall",
    "FirewallRule",
    "ForwardClientCertificate",
    "HealthCheck",
    "IPAddress",
    "IPNetwork",
    "LimiterSettings",
    "Limits",
    "Listen",
    "LogSettings",
    "MessageRate",
    "MessageRules",
    "OriginPattern",
    "Policy",
    "RedisLimiter",
    "Revocation",
    "Route",
    "SubjectPattern",
    "TlsListen",
    "Upstream",
    "UpstreamPool",
    "UpstreamTls",
]

_WIDE = "is policy-wide; set it under the top-level limits"


def _ping(value: float) -> str | None:
    # a timer per side of every session: faster than this costs CPU and finds dead peers no sooner
    return "must be 0 (off) or at least 100ms" if 0 < value < 0.1 else None


def _above_zero(value: float) -> str | None:
    return "must be above zero" if value <= 0 else None


@dataclass(frozen=True, slots=True)
class CertificatePair:
    """One certificate of the client listener, with the names SNI picks it by."""

    cert_file: Path = key(
        name="cert", kind=kinds.FILE, help="PEM certificate chain", scopes=POLICY, required=True
    )
    key_file: Path = key(name="key", kind=kinds.FILE, help="PEM private key", scopes=POLICY, required=True)
    #: The certificate's SAN dNSNames, lower case (``*.example.com`` included): what SNI is matched with.
    #: Not compared: a certificate renewed in place with other names is the same listener (a reload, not
    #: a restart); the listener reads the names again from the file whenever it loads it.
    names: tuple[str, ...] = derived("the certificate's subjectAltName dNSNames", (), compare=False)


@dataclass(frozen=True, slots=True)
class TlsListen:
    """TLS for the client listener (wss://): one certificate (``cert``/``key``) or several chosen by SNI
    (``certificates``), and whether clients present certificates of their own (mTLS)."""

    cert_file: Path | None = key(
        None,
        name="cert",
        kind=kinds.FILE,
        help="PEM certificate chain (or set certificates instead)",
        scopes=POLICY,
    )
    key_file: Path | None = key(
        None, name="key", kind=kinds.FILE, help="PEM private key of cert", scopes=POLICY
    )
    certificates: tuple[CertificatePair, ...] = key(
        (),
        kind=kinds.section_list(CertificatePair),
        help="[{cert, key}, ...] chosen by SNI from their SAN names; the first also without SNI or a match",
        scopes=POLICY,
    )
    min_version: Literal["1.2", "1.3"] = key(
        "1.2", kind=kinds.TLS_VERSION, help="oldest TLS version accepted", scopes=POLICY
    )
    client_ca: Path | None = key(
        None,
        kind=kinds.CA_FILE,
        help="PEM bundle of the CAs client certificates are verified against (needs client_auth)",
        scopes=POLICY,
    )
    #: none: no certificate asked for; optional: asked, verified when presented; required: the TLS
    #: handshake fails without a verified one. A presented certificate that does not verify always fails it.
    client_auth: Literal["none", "optional", "required"] = key(
        "none",
        kind=kinds.choice("none", "optional", "required"),
        help="client certificates: none, optional (verified when sent), required (else no TLS handshake)",
        scopes=POLICY,
    )
    #: The certificates served, the default first: ``cert``/``key``, or ``certificates``.
    pairs: tuple[CertificatePair, ...] = derived("cert and key, or certificates", ())


@dataclass(frozen=True, slots=True)
class Listen:
    """The client listener."""

    address: Address = key(
        kind=kinds.ADDRESS,
        help="where clients connect",
        scopes=POLICY,
        required=True,
        default_text="0.0.0.0:8080",
    )
    tls: TlsListen | None = key(
        None, kind=kinds.section(TlsListen), help="serve wss:// with this certificate", scopes=POLICY
    )
    #: Every connection starts with a PROXY protocol v1/v2 header giving the real peer (behind a TCP LB).
    proxy_protocol: bool = key(
        False,
        kind=kinds.BOOL,
        help="every connection starts with a PROXY protocol v1/v2 header (behind a TCP load balancer)",
        scopes=POLICY,
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound and timeout, already in bytes and seconds.

    The policy-level ``limits`` are the defaults; a route's ``limits`` set the keys that may be set per
    route (declared with the ROUTE scope), and :attr:`Route.limits` holds the merged result.
    A timeout of ``0`` means "no timeout".
    """

    max_message_bytes: int = key(
        1024 * 1024,
        name="max_message_size",
        kind=kinds.SIZE,
        help="larger message: close 1009 to its sender, 1001 to the other side",
        scopes=POLICY_AND_ROUTE,
        minimum=1,
        maximum=1024**3,
        bounds="must be between 1B and 1GiB",
    )
    #: Frames per message, empty ones included; 0: derived from the message size (:meth:`fragments_allowed`).
    max_fragments: int = key(
        0,
        kind=kinds.COUNT,
        help="frames per message, empty ones included; more: 1009",
        scopes=POLICY_AND_ROUTE,
        default_text="max(1024, max_message_size / 256)",
    )
    max_header_bytes: int = key(
        16 * 1024,
        kind=kinds.SIZE,
        help="larger upgrade request: 431 (read before a route is known)",
        scopes=POLICY,
        minimum=1024,
        maximum=1024**2,
        bounds="must be between 1KiB and 1MiB",
        misplaced=_WIDE,
    )
    #: No data message either way for this long closes the session (0: never). Pings do not count: dead
    #: peers are found by keepalive, so a quiet but healthy session is not cut by default.
    idle_timeout: float = key(
        0.0,
        kind=kinds.DURATION,
        help="no data message either way this long: close 1001 idle timeout (0: off)",
        scopes=POLICY_AND_ROUTE,
    )
    #: Keepalive: a side quiet for ``ping_interval`` is pinged, and cut if no pong within ``ping_timeout``
    #: (ping_interval 0: no pings; ping_timeout 0: pings, e.g. for NATs, but no answer required).
    ping_interval: float = key(
        20.0,
        kind=kinds.DURATION,
        help="a side quiet this long is pinged (0: no pings; else at least 100ms)",
        scopes=POLICY_AND_ROUTE,
        check=_ping,
    )
    ping_timeout: float = key(
        20.0,
        kind=kinds.DURATION,
        help="no pong this long after a ping: 1011 keepalive timeout, socket cut (0: not awaited)",
        scopes=POLICY_AND_ROUTE,
        check=_ping,
    )
    handshake_timeout: float = key(
        10.0,
        kind=kinds.DURATION,
        help="TLS and the upgrade request must arrive within this, else 408 (before a route is known)",
        scopes=POLICY,
        check=_above_zero,
        misplaced=_WIDE,
    )
    upstream_connect_timeout: float = key(
        5.0,
        kind=kinds.DURATION,
        help="TCP, TLS and the upstream's 101 within this, else 502",
        scopes=POLICY_AND_ROUTE,
        check=_above_zero,
    )
    close_timeout: float = key(
        5.0,
        kind=kinds.DURATION,
        help="how long a side gets to answer a close frame before its socket is cut",
        scopes=POLICY_AND_ROUTE,
        check=_above_zero,
    )
    drain_timeout: float = key(
        30.0,
        kind=kinds.DURATION,
        help="graceful stop: how long sessions get after close 1001 (process-wide)",
        scopes=POLICY,
        misplaced=_WIDE,
    )
    #: Handshakes per second per client IP and the burst allowed above it (None: unlimited).
    handshakes_per_ip: float | None = key(
        None,
        kind=kinds.RATE,
        help="handshakes per client IP, above it 429 rate_limited with Retry-After (unset: unlimited)",
        scopes=POLICY_AND_ROUTE,
    )
    handshake_burst: int = key(
        1,
        kind=kinds.COUNT,
        help="handshakes allowed at once above handshakes_per_ip",
        scopes=POLICY_AND_ROUTE,
    )
    #: Concurrent sessions per client IP, and per token subject (None: unlimited).
    connections_per_ip: int | None = key(
        None,
        kind=kinds.COUNT,
        help="sessions at once per client IP, above it 429 conn_limit (unset: unlimited)",
        scopes=POLICY_AND_ROUTE,
    )
    connections_per_subject: int | None = key(
        None,
        kind=kinds.COUNT,
        help="sessions at once per token subject, above it 429 conn_limit (unset: unlimited)",
        scopes=POLICY_AND_ROUTE,
    )
    #: Client messages per second per session with a burst; client bytes per second with a burst.
    messages_per_connection: float | None = key(
        None,
        kind=kinds.RATE,
        help="client messages (pings, pongs and closes included) per session; over it: on_rate_limit",
        scopes=POLICY_AND_ROUTE,
    )
    message_burst: int = key(
        1,
        kind=kinds.COUNT,
        help="messages allowed at once above messages_per_connection",
        scopes=POLICY_AND_ROUTE,
    )
    bytes_per_connection: float | None = key(
        None,
        kind=kinds.BYTE_RATE,
        help="client bytes per session; over it: on_rate_limit",
        scopes=POLICY_AND_ROUTE,
    )
    byte_burst: int = key(
        0,
        kind=kinds.SIZE,
        help="bytes allowed at once above bytes_per_connection",
        scopes=POLICY_AND_ROUTE,
        default_text="max(one second of bytes_per_connection, max_message_size)",
    )
    #: What a session over its message or byte rate gets: closed with 1008, or its message dropped.
    on_rate_limit: Literal["close", "drop"] = key(
        "close",
        kind=kinds.choice("close", "drop"),
        help="over a message or byte rate: close 1008 rate limit exceeded, or drop the message and count it",
        scopes=POLICY_AND_ROUTE,
    )
    #: Per-IP limits count an IPv6 client by this prefix: one host usually holds a whole /64, and could
    #: otherwise take a fresh address for every handshake. 128 counts each address on its own.
    ipv6_prefix: int = key(
        64,
        kind=kinds.COUNT,
        help="per-IP limits count an IPv6 client by this prefix (128: each address on its own)",
        scopes=POLICY,
        minimum=16,
        maximum=128,
        bounds="must be a prefix length between 16 and 128",
        misplaced=_WIDE,
    )
    #: Client connections held at once, process-wide: in their TLS handshake, sending their upgrade request,
    #: being judged, and live sessions. A client arriving above it gets 503 ``overloaded``.
    max_connections: int = key(
        10_000,
        kind=kinds.COUNT,
        help="client connections held at once, all routes together (process-wide); above it 503 overloaded",
        scopes=POLICY,
        misplaced=_WIDE,
    )

    def fragments_allowed(self, max_message_bytes: int) -> int:
        """Frames a message of at most ``max_message_bytes`` may come in: ``max_fragments``, or by default
        ``max(1024, max_message_bytes // 256)`` as aiohttp does -- a fragment costs the relay a frame's
        work and the receiver a frame, so a sender needs fragments of 256 bytes on average at the size
        limit, and small limits still allow 1024."""
        return self.max_fragments or max(1024, max_message_bytes // 256)


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How a wss:// upstream's certificate is verified, and the client certificate wsgate presents."""

    ca_file: Path | None = key(
        None,
        kind=kinds.CA_FILE,
        help="CA bundle to verify the upstream with (default: the system's)",
        scopes=ROUTE,
    )
    insecure_skip_verify: bool = key(
        False, kind=kinds.BOOL, help="do not verify the upstream's certificate (tests only)", scopes=ROUTE
    )
    cert_file: Path | None = key(
        None,
        name="cert",
        kind=kinds.FILE,
        help="PEM client certificate (chain) presented to an upstream that asks for one; needs key",
        scopes=ROUTE,
    )
    key_file: Path | None = key(
        None, name="key", kind=kinds.FILE, help="PEM private key of cert", scopes=ROUTE
    )


#: How a pool picks the endpoint of a new session (see :mod:`proxy.pool`).
Balance = Literal["round_robin", "least_connections", "hash_client_ip", "hash_subject"]


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """An active check of every endpoint of a pool, HAProxy style: ``fall`` failed checks in a row take an
    endpoint out, ``rise`` passed ones bring it back."""

    interval: float = key(
        5.0,
        kind=kinds.DURATION,
        help="time between two checks of one endpoint",
        scopes=ROUTE,
        minimum=0.1,
        bounds="must be at least 100ms",
    )
    timeout: float = key(
        2.0,
        kind=kinds.DURATION,
        help="one check (connect, TLS, answer) within this, else it failed; at most interval",
        scopes=ROUTE,
        check=_above_zero,
        default_text="2s, or interval if shorter",
    )
    path: str | None = key(
        None,
        kind=kinds.REQUEST_TARGET,
        help="HTTP GET of this path, 2xx/3xx: passed (unset: a WebSocket handshake, 101: passed)",
        scopes=ROUTE,
    )
    rise: int = key(
        2, kind=kinds.COUNT, help="passed checks in a row that bring an endpoint back", scopes=ROUTE
    )
    fall: int = key(
        3, kind=kinds.COUNT, help="failed checks in a row that take an endpoint out", scopes=ROUTE
    )


@dataclass(frozen=True, slots=True)
class UpstreamPool:
    """Where a route's sessions go: one endpoint (``upstream: URL``) or several, with how one is picked
    and, optionally, an active health check. Health itself is runtime state (:mod:`proxy.pool`)."""

    endpoints: tuple[Upstream, ...] = key(
        kind=kinds.UPSTREAM_URLS,
        help="the endpoints, all ws:// or all wss://, each path replacing the route's as a single URL's does",
        scopes=ROUTE,
        required=True,
    )
    balance: Balance = key(
        "round_robin",
        kind=kinds.choice("round_robin", "least_connections", "hash_client_ip", "hash_subject"),
        help="how a session's endpoint is picked (hash_*: the same client or subject stays on one endpoint)",
        scopes=ROUTE,
    )
    health_check: HealthCheck | None = key(
        None,
        kind=kinds.section(HealthCheck),
        help="check every endpoint actively (unset: health is judged from connects alone)",
        scopes=ROUTE,
    )

    @property
    def secure(self) -> bool:
        """Whether the endpoints are wss:// (the loader makes them all one or the other)."""
        return self.endpoints[0].secure

    @property
    def url(self) -> str:
        """The pool as people read it: its one URL, or its endpoints' labels joined."""
        if len(self.endpoints) == 1:
            return self.endpoints[0].url
        return ", ".join(endpoint.label for endpoint in self.endpoints)


@dataclass(frozen=True, slots=True)
class Compression:
    """Whether permessage-deflate (RFC 7692) is negotiated on each hop; each hop is negotiated on its own.
    Read at the handshake: a reload changes it for new sessions only."""

    client: bool = key(True, kind=kinds.BOOL, help="accept a client's permessage-deflate offer", scopes=ROUTE)
    upstream: bool = key(True, kind=kinds.BOOL, help="offer permessage-deflate to the upstream", scopes=ROUTE)


@dataclass(frozen=True, slots=True)
class MessageRules:
    """What one direction of a route may send, checked per message by the relay.

    ``max_message_bytes`` is the route's limit unless the direction overrides it. ``schema`` is the JSON
    Schema document (already read from ``schema_file``); the relay compiles it once.
    """

    max_message_bytes: int = key(
        kind=kinds.SIZE,
        name="max_message_size",
        help="this direction's own message size limit (default: the route's)",
        scopes=ROUTE,
        minimum=1,
        bounds="must be at least 1B",
        default_text="limits.max_message_size",
    )
    types: frozenset[int] = key(
        frozenset({1, 2}), kind=kinds.MESSAGE_TYPES, help="message types allowed; other: 1003", scopes=ROUTE
    )
    utf8: bool = key(
        True,
        kind=kinds.BOOL,
        help="text must be valid UTF-8, else 1007 (default: true for client, false for upstream)",
        scopes=ROUTE,
    )
    json: bool = key(False, kind=kinds.BOOL, help="text must be one JSON document, else 1007", scopes=ROUTE)
    schema_file: Path | None = key(
        None,
        kind=kinds.SCHEMA_FILE,
        help="text must validate against this JSON Schema, else 1008",
        scopes=ROUTE,
    )
    schema: dict[str, object] | None = derived("schema_file's document", None, repr=False, hash=False)
    #: "close": the offender is closed (1003/1007/1008); "drop": the message is dropped and counted.
    on_violation: Literal["close", "drop"] = key(
        "close",
        kind=kinds.choice("close", "drop"),
        help="a broken rule: close the offender, or drop the message and count it",
        scopes=ROUTE,
    )

    @property
    def inspects_content(self) -> bool:
        """Whether a message's bytes must be seen whole (so fragmented messages are coalesced)."""
        return self.utf8 or self.json or self.schema is not None


@dataclass(frozen=True, slots=True)
class MessageRate:
    """Per-connection rate of client messages: a token bucket of messages and one of bytes."""

    messages_per_second: float | None = derived("limits.messages_per_connection", None)
    message_burst: int = derived("limits.message_burst", 1)
    bytes_per_second: float | None = derived("limits.bytes_per_connection", None)
    byte_burst: int = derived("limits.byte_burst", 0)
    on_limit: Literal["close", "drop"] = derived("limits.on_rate_limit", "close")


@dataclass(frozen=True, slots=True)
class Firewall:
    """Rules read top to bottom; the first whose network holds the IP decides, else ``default_allow``."""

    rules: tuple[FirewallRule, ...] = key(
        (),
        kind=kinds.FIREWALL_RULES,
        help="read top to bottom; the first that holds the IP decides",
        scopes=POLICY_AND_ROUTE,
    )
    default_allow: bool = key(
        True,
        name="default",
        kind=kinds.flag("allow", "deny"),
        help="for an IP no rule holds",
        scopes=POLICY_AND_ROUTE,
    )

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
class ForwardClientCertificate:
    """Upstream headers carrying the client's verified certificate; a client's own copies are dropped."""

    subject_header: str | None = key(
        None,
        name="subject",
        kind=kinds.FORWARDED_HEADER,
        help="header for the certificate's subject (RFC 4514), e.g. X-Client-Subject",
        scopes=ROUTE,
    )
    sha256_header: str | None = key(
        None,
        name="sha256",
        kind=kinds.FORWARDED_HEADER,
        help="header for the sha256 of the certificate (hex of its DER), e.g. X-Client-Cert-Sha256",
        scopes=ROUTE,
    )

    @property
    def headers(self) -> tuple[str, ...]:
        """The header names set (lower case): what is always stripped from the client's request."""
        return tuple(name.lower() for name in (self.subject_header, self.sha256_header) if name)


@dataclass(frozen=True, slots=True)
class Route:
    """One path (on one host, or any) the gateway serves and the upstream behind it."""

    path: str = key(kind=kinds.ROUTE_PATH, help="the request path served", scopes=ROUTE, required=True)
    #: Names of the auth providers, in the order the policy lists them; empty for ``auth: none`` (open
    #: route). With several, a token's ``iss`` (then its ``kid``) chooses the one that verifies it.
    auth: tuple[str, ...] = key(
        kind=kinds.AUTH_NAMES,
        help="the auth provider checking tokens, a list of them (a token's iss, then kid, picks one), "
        "or none for an open route",
        scopes=ROUTE,
        required=True,
        hint=" (use 'auth: none' for an open route)",
    )
    upstream: UpstreamPool = key(
        kind=kinds.section_or(UpstreamPool, kinds.UPSTREAM_URL),
        help="where sessions go: a URL whose path replaces the route's (nginx proxy_pass style), or a pool",
        scopes=ROUTE,
        required=True,
    )
    limits: Limits = key(
        kind=kinds.section(Limits, Scope.ROUTE),
        help="this route's own limits (see limits)",
        scopes=ROUTE,
        default_text="the policy's limits",
    )
    match: Literal["exact", "prefix"] = key(
        "exact",
        kind=kinds.choice("exact", "prefix"),
        help="prefix also serves path/... (never pathfoo)",
        scopes=ROUTE,
    )
    #: Normalized: lower case, no trailing dot, IPv6 without brackets; ``*.`` + domain for a wildcard.
    host: str | None = key(
        None,
        kind=kinds.ROUTE_HOST,
        help="Host served (any port): exact, or *.example.com for one more label (unset: any host)",
        scopes=ROUTE,
    )
    upstream_tls: UpstreamTls | None = key(
        None, kind=kinds.section(UpstreamTls), help="verification of a wss:// upstream", scopes=ROUTE
    )
    compression: Compression = key(
        kind=kinds.section(Compression),
        help="permessage-deflate on each hop",
        scopes=ROUTE,
        default_factory=lambda: Compression(),
    )
    #: Message rules per direction (None: frame syntax and ``max_message_size`` only), client message rate.
    client_rules: MessageRules | None = key(
        None,
        name="messages.client",
        kind=kinds.section(MessageRules),
        help="what clients may send",
        scopes=ROUTE,
    )
    upstream_rules: MessageRules | None = key(
        None,
        name="messages.upstream",
        kind=kinds.section(MessageRules),
        help="what the upstream may send",
        scopes=ROUTE,
    )
    message_rate: MessageRate | None = derived(
        "limits.messages_per_connection and bytes_per_connection", None
    )
    #: Route firewall, applied after the policy's; both must allow.
    firewall: Firewall | None = key(
        None,
        kind=kinds.section(Firewall),
        help="applied after the policy's firewall; both must allow",
        scopes=ROUTE,
    )
    #: Browser origins allowed (empty: any); whether a handshake without Origin (non-browser) passes.
    origins: tuple[OriginPattern, ...] = key(
        (),
        kind=kinds.ORIGINS,
        help="browser origins allowed (https://app.example.com, https://*.example.com)",
        scopes=ROUTE,
    )
    allow_missing_origin: bool = key(
        True,
        kind=kinds.BOOL,
        help="whether a handshake without Origin (not a browser) passes origins",
        scopes=ROUTE,
    )
    #: Claims copied into upstream request headers (claim, header name); a client's own are dropped.
    forward_claims: tuple[tuple[str, str], ...] = key(
        (),
        kind=kinds.FORWARD_CLAIMS,
        help="claims copied into upstream headers (a client's own are dropped)",
        scopes=ROUTE,
    )
    #: Whether the token (Authorization header, token cookie) reaches the upstream.
    forward_token: bool = key(
        False,
        kind=kinds.BOOL,
        help="whether the Authorization header and token cookie reach the upstream",
        scopes=ROUTE,
    )
    #: Whether a verified client certificate is needed (listen.tls.client_auth optional or required).
    client_certificate: Literal["none", "required"] = key(
        "none",
        kind=kinds.choice("none", "required"),
        help="required: a handshake without a verified client certificate gets 403 client_certificate",
        scopes=ROUTE,
    )
    client_subjects: tuple[SubjectPattern, ...] = key(
        (),
        kind=kinds.CLIENT_SUBJECTS,
        help="certificate subjects allowed (CN=alice,O=Example exactly, or CN=*.svc.example.com); "
        "others 403 client_certificate; implies client_certificate: required",
        scopes=ROUTE,
    )
    forward_client_certificate: ForwardClientCertificate | None = key(
        None,
        kind=kinds.section(ForwardClientCertificate),
        help="{subject: Header, sha256: Header}: the verified certificate in upstream headers "
        "(a client's own copies are always dropped)",
        scopes=ROUTE,
    )
    #: The ``Limits`` fields this route's own ``limits`` set: its rates and caps are its own buckets.
    own_limits: frozenset[str] = derived("the keys of the route's limits", frozenset())
    #: Every header name (lower case) the gateway sets for any route of the policy: forwarded claims and
    #: client certificate headers. A client's copies are dropped on every route, not only on the routes
    #: that set them, since routes commonly share an upstream that cannot tell who set them.
    gateway_set_headers: frozenset[str] = derived(
        "forward_claims and forward_client_certificate headers of every route", frozenset()
    )

    @property
    def requires_certificate(self) -> bool:
        """Whether a handshake needs a verified client certificate (``client_subjects`` imply one)."""
        return self.client_certificate == "required" or bool(self.client_subjects)

    @property
    def label(self) -> str:
        """How logs and ``explain`` name the route: its path, after its host when it has one."""
        return f"{self.host}{self.path}" if self.host is not None else self.path

    def serves_host(self, host: str | None) -> bool:
        """Whether a request for ``host`` (normalized, see :func:`~proxy.policy.values.request_host`) may
        use this route: any host when the route names none."""
        if self.host is None:
            return True
        return host is not None and host_matches(self.host, host)

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

    def upstream_target(self, request_path: str, query: str, endpoint: Upstream | None = None) -> str:
        """The request target sent to ``endpoint`` (default: the pool's first), nginx ``proxy_pass`` style.

        An upstream URL without a path gets the client's path unchanged; one with a path gets that path, plus
        whatever followed the route's prefix. The upstream URL's query comes first, then the client's.
        """
        upstream = endpoint if endpoint is not None else self.upstream.endpoints[0]
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

    level: Literal["debug", "info", "warning", "error"] = key(
        "info",
        kind=kinds.choice("debug", "info", "warning", "error"),
        help="least severe level written",
        scopes=POLICY,
    )
    #: ``auto``: readable text when stdout is a terminal, JSON lines otherwise.
    format: Literal["auto", "json", "text"] = key(
        "auto",
        kind=kinds.choice("auto", "json", "text"),
        help="json lines, readable text, or auto: text on a terminal, json otherwise",
        scopes=POLICY,
    )
    #: Warnings and errors are also appended here (JSON lines), when set.
    error_file: Path | None = key(
        None,
        kind=kinds.NEW_FILE,
        help="warnings and errors are also appended here (JSON lines)",
        scopes=POLICY,
    )


_REVOCATION_SCOPES = frozenset({Scope.POLICY, Scope.PROVIDER})


@dataclass(frozen=True, slots=True)
class Revocation:
    """Token subjects and ids refused at the handshake, and closed (1008) on reload when live.

    The policy-wide list holds for the tokens of every provider; a provider's own (``auth.NAME.revoked``)
    only for its tokens, so an id revoked on one issuer leaves another issuer's token of the same id alone.
    """

    subjects: frozenset[str] = key(
        frozenset(), kind=kinds.STRING_SET, help="token subjects (sub) refused", scopes=_REVOCATION_SCOPES
    )
    token_ids: frozenset[str] = key(
        frozenset(), kind=kinds.STRING_SET, help="token ids (jti) refused", scopes=_REVOCATION_SCOPES
    )


@dataclass(frozen=True, slots=True)
class AuthProvider:
    """How one token issuer is checked. Exactly one key source is set: ``secret``, ``public_key`` or
    ``jwks_url``; the loader guarantees ``algorithms`` fit it (no HMAC with an RSA/EC key, never ``none``).

    ``secret`` is None with ``secret_env`` set only in a policy loaded for ``check`` or ``explain`` where
    the variable is not set (``serve`` refuses such a policy).
    """

    name: str = derived("its key under auth")
    algorithms: tuple[str, ...] = key(
        kind=kinds.ALGORITHM_LIST,
        help="accepted algorithms (HS*, RS*, PS*, ES*, EdDSA; never none)",
        scopes=PROVIDER,
        required=True,
    )
    issuer: str | None = key(None, kind=kinds.STRING, help="required iss", scopes=PROVIDER)
    audiences: tuple[str, ...] = key(
        (), kind=kinds.STRINGS, help="aud must hold one of these", scopes=PROVIDER
    )
    #: HMAC secret, read from the environment variable ``secret_env`` at load time.
    secret: bytes | None = derived("the environment variable secret_env", None, repr=False)
    secret_env: str | None = key(
        None,
        kind=kinds.STRING,
        help="environment variable holding the HMAC secret (at least 32 bytes)",
        scopes=PROVIDER,
    )
    #: A PEM public key (bytes), read from ``public_key_file`` at load time.
    public_key: bytes | None = derived("the file public_key_file", None, repr=False)
    public_key_file: Path | None = key(
        None, kind=kinds.FILE, help="PEM public key (RSA, EC or Ed25519/Ed448)", scopes=PROVIDER
    )
    jwks_url: str | None = key(
        None, kind=kinds.HTTP_URL, help="JWKS document with the signing keys", scopes=PROVIDER
    )
    jwks_cache_ttl: float = key(
        300.0, kind=kinds.DURATION, help="JWKS refetched when older than this", scopes=PROVIDER
    )
    jwks_min_refresh: float = key(
        30.0, kind=kinds.DURATION, help="at most one refetch per this for an unknown kid", scopes=PROVIDER
    )
    jwks_timeout: float = key(
        5.0, kind=kinds.DURATION, help="a JWKS fetch's timeout (0: the default)", scopes=PROVIDER
    )
    leeway: float = key(
        0.0, kind=kinds.DURATION, help="clock skew allowed on exp, nbf and iat", scopes=PROVIDER
    )
    require_exp: bool = key(True, kind=kinds.BOOL, help="a token without exp is refused", scopes=PROVIDER)
    token_sources: tuple[Literal["header", "query", "cookie", "subprotocol"], ...] = key(
        ("header",),
        kind=kinds.TOKEN_SOURCE_LIST,
        help="where the token is looked for, in order: header, query, cookie, subprotocol",
        scopes=PROVIDER,
    )
    query_parameter: str = key(
        "access_token", kind=kinds.STRING, help="query parameter of the query source", scopes=PROVIDER
    )
    cookie_name: str = key(
        "access_token", kind=kinds.STRING, help="cookie of the cookie source", scopes=PROVIDER
    )
    subprotocol_prefix: str = key(
        "bearer.",
        kind=kinds.STRING,
        help="Sec-WebSocket-Protocol entry prefix of the subprotocol source",
        scopes=PROVIDER,
    )
    required_claims: tuple[ClaimRule, ...] = key(
        (),
        kind=kinds.CLAIMS,
        help="claims that must hold one of the values, else 403 claims",
        scopes=PROVIDER,
    )
    max_token_bytes: int = key(
        8 * 1024, kind=kinds.SIZE, help="a larger token is refused unparsed", scopes=PROVIDER
    )
    revoked: Revocation = key(
        kind=kinds.section(Revocation),
        help="this provider's tokens refused (besides the policy-wide revoked)",
        scopes=PROVIDER,
        default_factory=lambda: Revocation(),
    )


@dataclass(frozen=True, slots=True)
class RedisLimiter:
    """The Redis that replicas (and workers) share limiter state through."""

    url: str = key(
        kind=kinds.REDIS_URL,
        help="redis:// or rediss:// (TLS) URL, with the database number as its path",
        scopes=POLICY,
        required=True,
    )
    key_prefix: str = key(
        "wsgate:", kind=kinds.STRING, help="prefix of every key and channel wsgate uses", scopes=POLICY
    )
    timeout: float = key(
        0.05,
        kind=kinds.DURATION,
        help="a decision Redis has not answered within this follows on_error",
        scopes=POLICY,
        minimum=0.001,
        maximum=10.0,
        bounds="must be between 1ms and 10s",
    )
    #: The password, read from the environment variable ``password_env`` at load time.
    password: str | None = derived("the environment variable password_env", None, repr=False)
    password_env: str | None = key(
        None, kind=kinds.STRING, help="environment variable holding the Redis password", scopes=POLICY
    )
    ca_file: Path | None = key(
        None, kind=kinds.CA_FILE, help="CA bundle verifying a rediss:// server", scopes=POLICY
    )
    lease_ttl: float = key(
        30.0,
        kind=kinds.DURATION,
        help="a connection slot not refreshed for this long is free again (a replica that died)",
        scopes=POLICY,
        minimum=1.0,
        maximum=3600.0,
        bounds="must be between 1s and 1h",
    )


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    """Where handshake rates and connection caps are counted: in this process, or in a shared Redis."""

    redis: RedisLimiter | None = key(
        None,
        kind=kinds.section(RedisLimiter),
        help="share rates and caps with every replica through Redis (default: in this process)",
        scopes=POLICY,
    )
    on_error: Literal["allow", "deny"] = key(
        "allow",
        kind=kinds.choice("allow", "deny"),
        help="a decision Redis cannot make in time: allow (fail open) or deny (fail closed, 503)",
        scopes=POLICY,
    )


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole policy file, valid and ready to serve."""

    version: int = key(
        1, kind=kinds.VERSION, help="the policy format; this wsgate reads 1", scopes=POLICY, required=True
    )
    listen: Listen = key(
        Listen(Address("0.0.0.0", 8080)),
        kind=kinds.section(Listen),
        help="the client listener",
        scopes=POLICY,
    )
    admin: Address = key(
        Address("127.0.0.1", 9090),
        kind=kinds.ADDRESS,
        name="admin.address",
        help="the admin listener: metrics, health, policy",
        scopes=POLICY,
        required=True,
    )
    admin_token_env: str | None = key(
        None,
        kind=kinds.STRING,
        name="admin.token_env",
        help="environment variable holding the bearer token of /sessions (unset: those endpoints are 404)",
        scopes=POLICY,
    )
    #: The bearer token, read from the environment variable ``admin.token_env`` at load time.
    admin_token: str | None = derived("the environment variable admin.token_env", None, repr=False)
    limiter: LimiterSettings = key(
        kind=kinds.section(LimiterSettings),
        help="where rates and connection caps are counted",
        scopes=POLICY,
        default_factory=lambda: LimiterSettings(),
    )
    #: Peers whose X-Forwarded-For is believed.
    trusted_proxies: tuple[IPNetwork, ...] = key(
        (), kind=kinds.NETWORKS, help="peers whose X-Forwarded-For is believed", scopes=POLICY
    )
    auth: tuple[AuthProvider, ...] = key(
        (),
        kind=kinds.section_map(AuthProvider, "provider names to providers"),
        help="token providers by name",
        scopes=POLICY,
    )
    firewall: Firewall = key(
        kind=kinds.section(Firewall),
        help="CIDR rules for every route",
        scopes=POLICY,
        default_factory=lambda: Firewall(),
    )
    limits: Limits = key(
        kind=kinds.section(Limits, Scope.POLICY),
        help="every bound and timeout",
        scopes=POLICY,
        default_factory=lambda: Limits(),
    )
    routes: tuple[Route, ...] = key(
        (),
        kind=kinds.section_list(Route),
        help="the paths served (at least one)",
        scopes=POLICY,
        required=True,
    )
    revoked: Revocation = key(
        kind=kinds.section(Revocation),
        help="tokens refused, and live sessions closed on reload",
        scopes=POLICY,
        default_factory=lambda: Revocation(),
    )
    log: LogSettings = key(
        kind=kinds.section(LogSettings),
        help="how wsgate logs",
        scopes=POLICY,
        default_factory=lambda: LogSettings(),
    )
    #: The file it came from (None when parsed from a string), and the sha256 of its bytes.
    source: Path | None = derived("the file read", None)
    sha256: str = derived("the file's bytes", "")
    #: What the loader warns about, as ``file:line: key: message``: a key that does nothing, and (for
    #: ``check`` and ``explain``) a secret's environment variable not set, which ``serve`` refuses.
    warnings: tuple[str, ...] = derived("the loader", ())

    def provider(self, name: str) -> AuthProvider:
        """The auth provider called ``name`` (the loader guarantees every route's provider exists)."""
        for provider in self.auth:
            if provider.name == name:
                return provider
        raise KeyError(name)

    def route_providers(self, route: Route) -> tuple[AuthProvider, ...]:
        """The providers of ``route``, in its list's order (empty for an open route)."""
        return tuple(self.provider(name) for name in route.auth)

    def match_route(self, request_path: str, host: str | None = None) -> Route | None:
        """The route for a request: routes for an exact host first, then for a wildcard host, then routes
        without a host; within each tier an exact path first, then the longest matching prefix.

        ``host`` is the request's normalized host (:func:`~proxy.policy.values.request_host`); with None
        only routes without a host match. A host's routes that serve no matching path fall through to the
        next tier.
        """
        exact: list[Route] = []
        wildcard: list[Route] = []
        anyhost: list[Route] = []
        for route in self.routes:
            if route.host is None:
                anyhost.append(route)
            elif route.serves_host(host):
                (wildcard if route.host.startswith("*.") else exact).append(route)
        for tier in (exact, wildcard, anyhost):
            found = _match_path(tier, request_path)
            if found is not None:
                return found
        return None


def _match_path(routes: list[Route], request_path: str) -> Route | None:
    """Among ``routes``, the exact route for the path first, then the longest matching prefix."""
    best: Route | None = None
    for route in routes:
        if not route.matches(request_path):
            continue
        if route.match == "exact":
            return route
        if best is None or len(route.path) > len(best.path):
            best = route
    return best
