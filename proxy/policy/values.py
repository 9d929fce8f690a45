"""Small values a policy key is parsed into: addresses, upstream URLs, firewall rules, claim rules, origins.

Their fields are derived from one key's text (``0.0.0.0:8080``, ``wss://chat:8443/ws``, ``allow:
10.0.0.0/8``); the keys themselves are declared in :mod:`proxy.policy.model`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.policy.declare import derived

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


def url_host(host: str) -> str:
    """A host as a URL or a Host header writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on. ``host`` is an IP literal or name, without IPv6 brackets."""

    host: str = derived("host:port")
    port: int = derived("host:port")

    def __str__(self) -> str:
        return f"{url_host(self.host)}:{self.port}"


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
        return f"{'wss' if self.secure else 'ws'}://{url_host(self.host)}:{self.port}{self.path}"


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


@dataclass(frozen=True, slots=True)
class SubjectPattern:
    """A ``client_subjects`` entry: ``CN=<glob>`` (the certificate's one common name fits the glob, ``*``
    standing for one or more characters other than a dot, as a host wildcard stands for one label) or a
    whole RFC 4514 subject (``CN=alice,O=Example``: the
    certificate's subject is exactly that, attribute for attribute, in that order).

    Only the CN form is a glob: a whole subject compares exactly, so no ``*`` can stretch over a comma
    into another attribute.
    """

    text: str = derived("a client_subjects entry")
    #: The CN glob as a regular expression source (None for a whole subject).
    common_name: str | None = derived("a client_subjects entry of the form CN=...")
    #: The whole subject as RFC 4514 text, normalized by parsing (None for a CN glob).
    subject: str | None = derived("a client_subjects entry with more than a CN")

    @classmethod
    def parse(cls, text: str) -> SubjectPattern:
        """Parse an allow list entry.

        Raises:
            ValueError: not an RFC 4514 subject (attribute names upper case: CN, O, OU, C...).
        """
        try:
            name = x509.Name.from_rfc4514_string(text.strip())
        except ValueError:
            raise ValueError(
                "expected an RFC 4514 subject like CN=alice,O=Example (no spaces after commas) "
                f"or a CN glob like CN=*.svc, got {text!r}"
            ) from None
        attributes = list(name)
        if not attributes:
            raise ValueError(f"an empty subject matches no certificate: {text!r}")
        if len(attributes) == 1 and attributes[0].oid == NameOID.COMMON_NAME:
            glob = str(attributes[0].value)
            return cls(
                text, "".join("[^.]+" if part == "*" else re.escape(part) for part in _stars(glob)), None
            )
        return cls(text, None, name.rfc4514_string())

    def matches(self, subject: str, common_names: tuple[str, ...]) -> bool:
        """Whether a verified certificate with this RFC 4514 ``subject`` and these CNs fits. A certificate
        with several CNs fits no CN glob: which of them would name the client is anyone's guess."""
        if self.common_name is not None:
            return len(common_names) == 1 and re.fullmatch(self.common_name, common_names[0]) is not None
        return subject == self.subject


def _stars(glob: str) -> list[str]:
    """``a*b`` -> ``["a", "*", "b"]``: the glob's literal parts and its stars."""
    return [part for part in re.split(r"(\*)", glob) if part]


_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


#: RFC 3986 reg-name characters (unreserved, pct-encoded, sub-delims): what a Host may name besides an IP.
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]*")


def request_host(header: str | None) -> str | None:
    """The host a ``Host`` header names, as routes are matched against it: without its port, lower case,
    without a trailing dot; an IPv6 literal (``[::1]:8080``) without its brackets, in its short form.
    None for no header or an empty one.

    Raises:
        ValueError: not ``uri-host [":" port]`` (RFC 9110 section 7.2): a bracketed name that is not an
            IPv6 address, a port that is not digits, characters no host name holds. RFC 9112 section 3.2
            answers these 400, and so does the gateway: a Host it cannot read must not pick a route.
    """
    if header is None:
        return None
    text = header.strip(" \t")
    if not text:
        return None
    if text.startswith("["):
        literal, closed, rest = text[1:].partition("]")
        if not closed or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            raise ValueError(f"invalid Host {header[:100]!r}")
        try:
            address = ip_address(literal)
        except ValueError:
            raise ValueError(f"invalid Host {header[:100]!r}: brackets hold an IPv6 address") from None
        if address.version != 6:
            raise ValueError(f"invalid Host {header[:100]!r}: brackets hold an IPv6 address")
        return str(address)
    host, colon, port = text.rpartition(":") if ":" in text else (text, "", "")
    if (colon and not _is_port(port)) or not _REG_NAME.fullmatch(host):
        raise ValueError(f"invalid Host {header[:100]!r}")
    return host.lower().rstrip(".") or None


def _is_port(text: str) -> bool:
    return text == "" or (text.isascii() and text.isdigit())


def routing_host(target: str, header: str | None) -> str | None:
    """The host a request is routed by: the authority of an absolute-form target (``GET
    http://a.example.com/ws``), which RFC 9112 section 3.2.2 says wins over the Host header, or else the
    Host header's (see :func:`request_host`).

    Raises:
        ValueError: the host that decides is not valid.
    """
    if not target.startswith("/") and "://" in target:
        return request_host(urlsplit(target).netloc.rpartition("@")[2])
    return request_host(header)


def certificate_dns_names(pem: bytes) -> tuple[str, ...]:
    """A PEM certificate's SAN dNSNames, lower case, without a trailing dot (``*.example.com`` kept).

    Raises:
        ValueError: not a PEM certificate.
    """
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(name.lower().rstrip(".") for name in alternative.value.get_values_for_type(x509.DNSName))


def parse_route_host(text: str) -> str:
    """A route's ``host``, normalized as :func:`request_host` normalizes the header: ``chat.example.com``,
    ``*.example.com`` (one label, never the apex or deeper) or an IP address (IPv6 in brackets).

    Raises:
        ValueError: a port, a misplaced wildcard, or not a host name.
    """
    host = text.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ip_address(host[1:-1]))
        except ValueError:
            raise ValueError(f"not an IPv6 address: {text!r}") from None
    if ":" in host:
        try:
            ip_address(host)
        except ValueError:
            raise ValueError(f"a host has no port (routes match any port): {text!r}") from None
        raise ValueError(f"put an IPv6 address in brackets, like [::1]: {text!r}")
    host = host.rstrip(".")
    rest = host[2:] if host.startswith("*.") else host
    if "*" in rest:
        raise ValueError(f"a wildcard is the whole first label, like *.example.com: {text!r}")
    if not rest or not all(_LABEL.match(label) for label in rest.split(".")):
        raise ValueError(f"not a host name: {text!r}")
    return host


def host_matches(pattern: str, host: str) -> bool:
    """Whether a normalized request host fits a route's host: equal, or ``*.example.com`` for exactly one
    more label (``a.example.com``; not ``example.com``, not ``a.b.example.com``)."""
    if not pattern.startswith("*."):
        return host == pattern
    label, dot, parent = host.partition(".")
    return bool(label) and bool(dot) and parent == pattern[2:]
