"""YAML policy files -> :class:`~proxy.policy.model.Policy`.

The YAML is composed into nodes (not loaded into dicts) so every value keeps its line: each error is a
:class:`~proxy.errors.PolicyError` naming the file, the line and the key path, e.g.
``policies/x.yaml:14: routes[1].upstream: expected ws:// or wss:// URL, got 'http://x'``.
Unknown keys, duplicate keys, wrong types, bad units and bad URLs are all refused; nothing is ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import os
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import fastjsonschema
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from proxy.errors import PolicyError
from proxy.policy.model import (
    LIMIT_KEYS,
    ROUTE_LIMIT_KEYS,
    Address,
    AuthProvider,
    ClaimRule,
    Firewall,
    FirewallRule,
    IPNetwork,
    Limits,
    Listen,
    LogSettings,
    MessageRate,
    MessageRules,
    OriginPattern,
    Policy,
    Revocation,
    Route,
    TlsListen,
    Upstream,
)
from proxy.policy.units import parse_byte_rate, parse_duration, parse_rate, parse_size

T = TypeVar("T")
D = TypeVar("D")

_HMAC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256", "ES384", "ES512", "ES256K"),
    "OKP": ("EdDSA",),
}
_ALGORITHMS = frozenset(_HMAC) | {alg for family in _ASYMMETRIC.values() for alg in family}
_TOKEN_SOURCES = ("header", "query", "cookie", "subprotocol")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_RESERVED_HEADERS = frozenset(
    {
        "host", "connection", "upgrade", "content-length", "transfer-encoding", "te", "trailer", "keep-alive",
        "authorization", "cookie", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
        "x-forwarded-uri", "x-request-id", "forwarded",
    }
)  # fmt: skip


class _Source:
    """The file being read: where errors point and relative paths start."""

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.name = str(file) if file is not None else "<policy>"
        self.base = file.parent if file is not None else Path.cwd()

    def fail(self, node: yaml.Node | None, path: str, message: str) -> NoReturn:
        line = node.start_mark.line + 1 if node is not None else None
        raise PolicyError(self.name, line, path, message)


def _scalar(node: yaml.Node) -> Any:
    """The value of a YAML node as the safe loader builds it.

    Raises:
        yaml.constructor.ConstructorError: the node's explicit tag does not fit its value (``!!timestamp
            soon``, ``!!bool maybe``, ``!!int`` with no value), with the node's line. PyYAML's
            constructors raise whatever their parsing raised (AttributeError, IndexError, KeyError...).
    """
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except (AttributeError, LookupError, TypeError, ValueError, ArithmeticError):
        shown = f" {node.value!r}" if isinstance(node, yaml.ScalarNode) else ""
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read{shown} as {tag}", node.start_mark
        ) from None


class _Map:
    """A YAML mapping with its keys checked: no duplicates, no unknown keys."""

    def __init__(self, source: _Source, node: yaml.Node, path: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            source.fail(node, path, "expected a mapping")
        self.source = source
        self.node = node
        self.path = path
        self.items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                source.fail(key_node, path, "keys must be strings")
            if key in self.items:
                first = self.items[key][0].start_mark.line + 1
                source.fail(key_node, self.child(key), f"duplicate key {key!r} (first at line {first})")
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                source.fail(
                    key_node, self.child(key),
                    f"unknown key {key!r}{suggestion}; expected one of: {', '.join(sorted(allowed))}",
                )  # fmt: skip
            self.items[key] = (key_node, value_node)

    def child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def node_of(self, key: str) -> yaml.Node:
        return self.items[key][1]

    def get(self, key: str, read: Callable[[_Source, yaml.Node, str], T], default: D) -> T | D:
        """The value of ``key`` read with ``read``, or ``default`` when absent."""
        if key not in self.items:
            return default
        return read(self.source, self.items[key][1], self.child(key))

    def require(self, key: str, read: Callable[[_Source, yaml.Node, str], T], hint: str = "") -> T:
        if key not in self.items:
            self.source.fail(self.node, self.path, f"missing {key!r}{hint}")
        return read(self.source, self.items[key][1], self.child(key))


# -- scalar readers: (source, node, path) -> value ------------------------------------------------


def _str(source: _Source, node: yaml.Node, path: str) -> str:
    value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, str) or not value:
        source.fail(node, path, "expected a non-empty string")
    return value


def _bool(source: _Source, node: yaml.Node, path: str) -> bool:
    value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, bool):
        source.fail(node, path, "expected true or false")
    return value


def _positive_int(source: _Source, node: yaml.Node, path: str) -> int:
    value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        source.fail(node, path, "expected a whole number of at least 1")
    return value


def _unit(parse: Callable[[object], T]) -> Callable[[_Source, yaml.Node, str], T]:
    def read(source: _Source, node: yaml.Node, path: str) -> T:
        value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
        try:
            return parse(value)
        except ValueError as error:
            source.fail(node, path, str(error))

    return read


_size = _unit(parse_size)
_duration = _unit(parse_duration)
_rate = _unit(parse_rate)
_byte_rate = _unit(parse_byte_rate)


def _choice(*choices: str) -> Callable[[_Source, yaml.Node, str], str]:
    def read(source: _Source, node: yaml.Node, path: str) -> str:
        value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if value not in choices:
            source.fail(node, path, f"expected one of: {', '.join(choices)}")
        return str(value)

    return read


def _items(source: _Source, node: yaml.Node, path: str) -> Iterator[tuple[yaml.Node, str]]:
    """The elements of a YAML list, each with its path (``routes[2]``)."""
    if not isinstance(node, yaml.SequenceNode):
        source.fail(node, path, "expected a list")
    for index, item in enumerate(node.value):
        yield item, f"{path}[{index}]"


def _str_list(source: _Source, node: yaml.Node, path: str) -> tuple[str, ...]:
    if isinstance(node, yaml.ScalarNode):
        return (_str(source, node, path),)
    return tuple(_str(source, item, item_path) for item, item_path in _items(source, node, path))


def _file(source: _Source, node: yaml.Node, path: str) -> Path:
    file = Path(_str(source, node, path))
    if not file.is_absolute():
        file = source.base / file
    if not file.is_file() or not os.access(file, os.R_OK):
        source.fail(node, path, f"file not found or not readable: {file}")
    return file


def _network(source: _Source, node: yaml.Node, path: str) -> IPNetwork:
    text = _str(source, node, path)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        source.fail(node, path, f"expected a CIDR like 10.0.0.0/8 or 2001:db8::/32, got {text!r}")


def _networks(source: _Source, node: yaml.Node, path: str) -> tuple[IPNetwork, ...]:
    if isinstance(node, yaml.ScalarNode):
        return (_network(source, node, path),)
    return tuple(_network(source, item, item_path) for item, item_path in _items(source, node, path))


def _address(source: _Source, node: yaml.Node, path: str) -> Address:
    text = _str(source, node, path)
    host, separator, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        source.fail(node, path, f"put an IPv6 address in brackets, like [::1]:8080, got {text!r}")
    if not separator or not host or not port_text.isdigit() or int(port_text) > 65535:
        source.fail(node, path, f"expected host:port, like 0.0.0.0:8080 or [::]:8080, got {text!r}")
    return Address(host, int(port_text))


# -- sections ---------------------------------------------------------------------------------------


def _listen(source: _Source, node: yaml.Node, path: str) -> Listen:
    section = _Map(source, node, path, ("address", "tls", "proxy_protocol"))
    return Listen(
        address=section.require("address", _address),
        tls=section.get("tls", _tls, None),
        proxy_protocol=section.get("proxy_protocol", _bool, False),
    )


def _tls(source: _Source, node: yaml.Node, path: str) -> TlsListen:
    section = _Map(source, node, path, ("cert", "key", "min_version"))
    min_version = "1.2"
    if "min_version" in section:
        value_node = section.node_of("min_version")
        value = str(_scalar(value_node)) if isinstance(value_node, yaml.ScalarNode) else ""
        if value not in ("1.2", "1.3"):
            source.fail(value_node, section.child("min_version"), 'expected "1.2" or "1.3"')
        min_version = value
    cert_file = section.require("cert", _file)
    key_file = section.require("key", _file)
    try:  # a pair that does not load would otherwise surface only when the listener starts
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as error:
        source.fail(
            section.node_of("cert"),
            section.child("cert"),
            f"cannot load the certificate and key: {error.strerror or error}",
        )
    return TlsListen(
        cert_file=cert_file,
        key_file=key_file,
        min_version="1.3" if min_version == "1.3" else "1.2",
    )


def _admin(source: _Source, node: yaml.Node, path: str) -> Address:
    return _Map(source, node, path, ("address",)).require("address", _address)


def _log(source: _Source, node: yaml.Node, path: str) -> LogSettings:
    section = _Map(source, node, path, ("level", "format", "error_file"))
    error_file = None
    if "error_file" in section:
        error_file = Path(section.get("error_file", _str, ""))
        if not error_file.is_absolute():
            error_file = source.base / error_file
        if not error_file.parent.is_dir():
            source.fail(
                section.node_of("error_file"),
                section.child("error_file"),
                f"directory does not exist: {error_file.parent}",
            )
    level: str = section.get("level", _choice("debug", "info", "warning", "error"), "info")
    log_format: str = section.get("format", _choice("auto", "json", "text"), "auto")
    return LogSettings(level, log_format, error_file)  # type: ignore[arg-type]  # _choice checked them


def _limits(source: _Source, node: yaml.Node, path: str, base: Limits, keys: frozenset[str] | None) -> Limits:
    section = _Map(source, node, path, tuple(LIMIT_KEYS))
    readers: dict[str, Callable[[_Source, yaml.Node, str], Any]] = {
        "max_message_size": _size,
        "max_fragments": _positive_int,
        "max_header_bytes": _size,
        "idle_timeout": _duration,
        "ping_interval": _duration,
        "ping_timeout": _duration,
        "handshake_timeout": _duration,
        "upstream_connect_timeout": _duration,
        "close_timeout": _duration,
        "drain_timeout": _duration,
        "handshakes_per_ip": _rate,
        "handshake_burst": _positive_int,
        "connections_per_ip": _positive_int,
        "connections_per_subject": _positive_int,
        "messages_per_connection": _rate,
        "message_burst": _positive_int,
        "bytes_per_connection": _byte_rate,
        "byte_burst": _size,
        "on_rate_limit": _choice("close", "drop"),
        "ipv6_prefix": _positive_int,
        "max_connections": _positive_int,
    }
    changes: dict[str, Any] = {}
    for key in section.items:
        if keys is not None and key not in keys:
            source.fail(
                section.items[key][0], section.child(key), "is policy-wide; set it under the top-level limits"
            )
        value = section.get(key, readers[key], None)
        _check_limit(source, section.node_of(key), section.child(key), key, value)
        changes[LIMIT_KEYS[key]] = value
    limits = replace(base, **changes)
    if limits.bytes_per_connection is not None and limits.byte_burst < 1:
        limits = replace(limits, byte_burst=max(int(limits.bytes_per_connection), limits.max_message_bytes))
    return limits


def _check_limit(source: _Source, node: yaml.Node, path: str, key: str, value: Any) -> None:
    if key == "max_message_size" and not 1 <= value <= 1024**3:
        source.fail(node, path, "must be between 1B and 1GiB")
    if key == "max_header_bytes" and not 1024 <= value <= 1024**2:
        source.fail(node, path, "must be between 1KiB and 1MiB")
    if key in ("handshake_timeout", "upstream_connect_timeout", "close_timeout") and value <= 0:
        source.fail(node, path, "must be above zero")
    if key == "ipv6_prefix" and not 16 <= value <= 128:
        source.fail(node, path, "must be a prefix length between 16 and 128")
    if key in ("ping_interval", "ping_timeout") and 0 < value < 0.1:
        # a timer per side of every session: faster than this costs CPU and finds dead peers no sooner
        source.fail(node, path, "must be 0 (off) or at least 100ms")


def _upstream(source: _Source, node: yaml.Node, path: str) -> Upstream:
    url = _str(source, node, path)
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError:
        source.fail(node, path, f"expected ws:// or wss:// URL, got {url!r}")
    if split.scheme not in ("ws", "wss") or not split.hostname:
        source.fail(node, path, f"expected ws:// or wss:// URL, got {url!r}")
    if split.username or split.password:
        source.fail(node, path, "upstream URL must not contain a user or password")
    if split.fragment or url.endswith("#"):
        source.fail(node, path, "upstream URL must not contain a fragment")
    secure = split.scheme == "wss"
    return Upstream(
        url=url,
        secure=secure,
        host=split.hostname,
        port=port if port is not None else (443 if secure else 80),
        path=split.path,
        query=split.query,
    )


def _upstream_tls(source: _Source, node: yaml.Node, path: str) -> tuple[Path | None, bool]:
    section = _Map(source, node, path, ("ca_file", "insecure_skip_verify"))
    ca_file = section.get("ca_file", _file, None)
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(ca_file))
        except (ssl.SSLError, OSError) as error:
            source.fail(
                section.node_of("ca_file"),
                section.child("ca_file"),
                f"not a PEM CA bundle: {error.strerror or error}",
            )
    return ca_file, section.get("insecure_skip_verify", _bool, False)


def _firewall(source: _Source, node: yaml.Node, path: str) -> Firewall:
    section = _Map(source, node, path, ("default", "rules"))
    default = section.get("default", _choice("allow", "deny"), "allow")
    rules: list[FirewallRule] = []
    if "rules" in section:
        for item, item_path in _items(source, section.node_of("rules"), section.child("rules")):
            rule = _Map(source, item, item_path, ("allow", "deny"))
            if len(rule.items) != 1:
                source.fail(item, item_path, "each rule is one 'allow: CIDR' or 'deny: CIDR'")
            action = next(iter(rule.items))
            for network in rule.get(action, _networks, ()):
                rules.append(FirewallRule(action == "allow", network))
    return Firewall(tuple(rules), default_allow=default == "allow")


def _origins(source: _Source, node: yaml.Node, path: str) -> tuple[OriginPattern, ...]:
    patterns = []
    for item, item_path in _items(source, node, path):
        try:
            patterns.append(OriginPattern.parse(_str(source, item, item_path)))
        except ValueError as error:
            source.fail(item, item_path, str(error))
    return tuple(patterns)


def _forward_claims(source: _Source, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(node, yaml.MappingNode):
        source.fail(node, path, "expected a mapping of claim: Header-Name")
    pairs = []
    for key_node, value_node in node.value:
        claim = _str(source, key_node, path)
        header = _str(source, value_node, f"{path}.{claim}")
        if not _HEADER_NAME.match(header) or header.lower() in _RESERVED_HEADERS:
            source.fail(value_node, f"{path}.{claim}", f"{header!r} cannot carry a claim")
        pairs.append((claim, header))
    return tuple(pairs)


def _message_rules(source: _Source, node: yaml.Node, path: str, base: MessageRules) -> MessageRules:
    section = _Map(
        source, node, path, ("types", "max_message_size", "utf8", "json", "schema_file", "on_violation")
    )
    types = base.types
    if "types" in section:
        names = section.get("types", _str_list, ())
        unknown = [name for name in names if name not in ("text", "binary")]
        if unknown or not names:
            source.fail(section.node_of("types"), section.child("types"), "expected a list of: text, binary")
        types = frozenset(1 if name == "text" else 2 for name in names)
    schema_file = section.get("schema_file", _file, None)
    schema = None
    if schema_file is not None:
        try:
            schema = json.loads(schema_file.read_text(encoding="utf-8"))
            fastjsonschema.compile(schema)
        except (ValueError, fastjsonschema.JsonSchemaDefinitionException) as error:
            source.fail(
                section.node_of("schema_file"), section.child("schema_file"), f"not a JSON Schema: {error}"
            )
    max_bytes = section.get("max_message_size", _size, base.max_message_bytes)
    if max_bytes < 1:
        source.fail(
            section.node_of("max_message_size"), section.child("max_message_size"), "must be at least 1B"
        )
    return MessageRules(
        max_message_bytes=max_bytes,
        types=types,
        utf8=section.get("utf8", _bool, base.utf8),
        json=section.get("json", _bool, base.json),
        schema_file=schema_file,
        schema=schema,
        on_violation="drop"
        if section.get("on_violation", _choice("close", "drop"), "close") == "drop"
        else "close",
    )


_ROUTE_KEYS = (
    "path", "match", "upstream", "upstream_tls", "auth", "limits", "firewall", "origins",
    "allow_missing_origin", "forward_claims", "forward_token", "messages",
)  # fmt: skip


def _route(
    source: _Source, node: yaml.Node, path: str, limits: Limits, providers: dict[str, AuthProvider]
) -> Route:
    section = _Map(source, node, path, _ROUTE_KEYS)
    route_path = section.require("path", _str)
    if not route_path.startswith("/") or any(char in route_path for char in "?# \t"):
        source.fail(
            section.node_of("path"),
            section.child("path"),
            "expected a path starting with / (no ? # or spaces)",
        )
    auth = section.require("auth", _str, " (use 'auth: none' for an open route)")
    if auth != "none" and auth not in providers:
        defined = ", ".join(sorted(providers)) or "none defined"
        source.fail(
            section.node_of("auth"), section.child("auth"), f"unknown auth provider {auth!r} ({defined})"
        )
    upstream = section.require("upstream", _upstream)
    if "upstream_tls" in section:
        ca_file, insecure = section.get("upstream_tls", _upstream_tls, (None, False))
        if not upstream.secure:
            source.fail(
                section.node_of("upstream_tls"), section.child("upstream_tls"), "only for a wss:// upstream"
            )
        upstream = replace(upstream, ca_file=ca_file, insecure_skip_verify=insecure)
    route_limits = limits
    own_limits: frozenset[str] = frozenset()
    if "limits" in section:
        route_limits = _limits(
            source, section.node_of("limits"), section.child("limits"), limits, ROUTE_LIMIT_KEYS
        )
        read = _Map(source, section.node_of("limits"), section.child("limits"), tuple(ROUTE_LIMIT_KEYS))
        own_limits = frozenset(LIMIT_KEYS[key] for key in read.items)
    client_rules = MessageRules(max_message_bytes=route_limits.max_message_bytes)
    upstream_rules: MessageRules | None = None
    if "messages" in section:
        messages = _Map(
            source, section.node_of("messages"), section.child("messages"), ("client", "upstream")
        )
        if "client" in messages:
            client_rules = _message_rules(
                source, messages.node_of("client"), messages.child("client"), client_rules
            )
        if "upstream" in messages:
            plain = MessageRules(max_message_bytes=route_limits.max_message_bytes, utf8=False)
            upstream_rules = _message_rules(
                source, messages.node_of("upstream"), messages.child("upstream"), plain
            )
    rate = None
    if route_limits.messages_per_connection is not None or route_limits.bytes_per_connection is not None:
        rate = MessageRate(
            messages_per_second=route_limits.messages_per_connection,
            message_burst=route_limits.message_burst,
            bytes_per_second=route_limits.bytes_per_connection,
            byte_burst=route_limits.byte_burst,
            on_limit=route_limits.on_rate_limit,
        )
    origins = section.get("origins", _origins, ())
    return Route(
        path=route_path,
        match="prefix" if section.get("match", _choice("exact", "prefix"), "exact") == "prefix" else "exact",
        upstream=upstream,
        auth=None if auth == "none" else auth,
        limits=route_limits,
        own_limits=own_limits,
        client_rules=client_rules,
        upstream_rules=upstream_rules,
        message_rate=rate,
        firewall=section.get("firewall", _firewall, None),
        origins=origins,
        allow_missing_origin=section.get("allow_missing_origin", _bool, True),
        forward_claims=section.get("forward_claims", _forward_claims, ()),
        forward_token=section.get("forward_token", _bool, False),
    )


_PROVIDER_KEYS = (
    "issuer", "audiences", "algorithms", "secret_env", "public_key_file", "jwks_url", "jwks_cache_ttl",
    "jwks_min_refresh", "jwks_timeout", "leeway", "require_exp", "token_sources", "query_parameter",
    "cookie_name", "subprotocol_prefix", "required_claims", "max_token_bytes",
)  # fmt: skip


def _provider(source: _Source, node: yaml.Node, path: str, name: str) -> AuthProvider:
    section = _Map(source, node, path, _PROVIDER_KEYS)
    algorithms = section.require("algorithms", _str_list)
    algorithms_node = section.node_of("algorithms")
    for algorithm in algorithms:
        if algorithm.lower() == "none":
            source.fail(algorithms_node, section.child("algorithms"), "'none' is never accepted")
        if algorithm not in _ALGORITHMS:
            known = ", ".join(sorted(_ALGORITHMS))
            source.fail(
                algorithms_node,
                section.child("algorithms"),
                f"unknown algorithm {algorithm!r}; known: {known}",
            )
    key_sources = [key for key in ("secret_env", "public_key_file", "jwks_url") if key in section]
    if len(key_sources) != 1:
        source.fail(node, path, "set exactly one of secret_env, public_key_file, jwks_url")
    key_source = key_sources[0]
    hmac = [alg for alg in algorithms if alg in _HMAC]
    if key_source == "secret_env" and len(hmac) != len(algorithms):
        source.fail(
            algorithms_node, section.child("algorithms"), "secret_env keys only verify HS256/HS384/HS512"
        )
    if key_source != "secret_env" and hmac:
        source.fail(
            algorithms_node, section.child("algorithms"),
            f"{hmac[0]} with a public key would let the key be used as an HMAC secret (algorithm confusion)",
        )  # fmt: skip
    secret = public_key = None
    if key_source == "secret_env":
        variable = section.get("secret_env", _str, "")
        value = os.environ.get(variable)
        if not value:
            source.fail(
                section.node_of("secret_env"),
                section.child("secret_env"),
                f"environment variable {variable} is not set",
            )
        secret = value.encode()
        if len(secret) < 32:
            source.fail(
                section.node_of("secret_env"), section.child("secret_env"),
                f"the secret in {variable} is {len(secret)} bytes; HMAC needs at least 32",
            )  # fmt: skip
    elif key_source == "public_key_file":
        key_file = section.get("public_key_file", _file, Path())
        public_key = key_file.read_bytes()
        _check_public_key(
            source,
            section.node_of("public_key_file"),
            section.child("public_key_file"),
            public_key,
            algorithms,
        )
    jwks_url = section.get("jwks_url", _str, None)
    if jwks_url is not None and urlsplit(jwks_url).scheme not in ("http", "https"):
        source.fail(
            section.node_of("jwks_url"), section.child("jwks_url"), "expected an http:// or https:// URL"
        )
    sources = section.get("token_sources", _str_list, ("header",))
    for token_source in sources:
        if token_source not in _TOKEN_SOURCES:
            source.fail(
                section.node_of("token_sources"),
                section.child("token_sources"),
                f"expected some of: {', '.join(_TOKEN_SOURCES)}",
            )
    return AuthProvider(
        name=name,
        algorithms=algorithms,
        issuer=section.get("issuer", _str, None),
        audiences=section.get("audiences", _str_list, ()),
        secret=secret,
        secret_env=section.get("secret_env", _str, None),
        public_key=public_key,
        public_key_file=section.get("public_key_file", _file, None),
        jwks_url=jwks_url,
        jwks_cache_ttl=section.get("jwks_cache_ttl", _duration, 300.0),
        jwks_min_refresh=section.get("jwks_min_refresh", _duration, 30.0),
        jwks_timeout=section.get("jwks_timeout", _duration, 5.0) or 5.0,
        leeway=section.get("leeway", _duration, 0.0),
        require_exp=section.get("require_exp", _bool, True),
        token_sources=tuple(sources),  # type: ignore[arg-type]
        query_parameter=section.get("query_parameter", _str, "access_token"),
        cookie_name=section.get("cookie_name", _str, "access_token"),
        subprotocol_prefix=section.get("subprotocol_prefix", _str, "bearer."),
        required_claims=section.get("required_claims", _claims, ()),
        max_token_bytes=section.get("max_token_bytes", _size, 8 * 1024),
    )


def _check_public_key(
    source: _Source, node: yaml.Node, path: str, pem: bytes, algorithms: tuple[str, ...]
) -> None:
    try:
        key = load_pem_public_key(pem)
    except ValueError:
        source.fail(node, path, "not a PEM public key (a private key or certificate does not belong here)")
    if isinstance(key, rsa.RSAPublicKey):
        family = "RSA"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        family = "EC"
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        family = "OKP"
    else:
        source.fail(node, path, "unsupported public key type")
    wrong = [alg for alg in algorithms if alg not in _ASYMMETRIC[family]]
    if wrong:
        source.fail(node, path, f"a {family} key cannot verify {', '.join(wrong)}")


def _claims(source: _Source, node: yaml.Node, path: str) -> tuple[ClaimRule, ...]:
    if not isinstance(node, yaml.MappingNode):
        source.fail(node, path, "expected a mapping of claim: value or [values]")
    rules = []
    for key_node, value_node in node.value:
        claim = _str(source, key_node, path)
        values = (
            [value_node]
            if isinstance(value_node, yaml.ScalarNode)
            else [item for item, _ in _items(source, value_node, f"{path}.{claim}")]
        )
        allowed = []
        for value in values:
            scalar = _scalar(value) if isinstance(value, yaml.ScalarNode) else None
            if not isinstance(scalar, str | int | bool):
                source.fail(
                    value, f"{path}.{claim}", "expected a string, number or boolean (or a list of them)"
                )
            allowed.append(scalar)
        rules.append(ClaimRule(claim, tuple(allowed)))
    return tuple(rules)


def _revoked(source: _Source, node: yaml.Node, path: str) -> Revocation:
    section = _Map(source, node, path, ("subjects", "token_ids"))
    return Revocation(
        subjects=frozenset(section.get("subjects", _str_list_or_empty, ())),
        token_ids=frozenset(section.get("token_ids", _str_list_or_empty, ())),
    )


def _str_list_or_empty(source: _Source, node: yaml.Node, path: str) -> tuple[str, ...]:
    if isinstance(node, yaml.SequenceNode) and not node.value:
        return ()
    return _str_list(source, node, path)


# -- the file ---------------------------------------------------------------------------------------

_TOP_KEYS = (
    "version",
    "listen",
    "admin",
    "trusted_proxies",
    "auth",
    "firewall",
    "limits",
    "routes",
    "revoked",
    "log",
)


def parse_policy(text: str | bytes, source: Path | None = None) -> Policy:
    """Parse a policy document.

    Raises:
        PolicyError: the first problem found, with file, line and key path.
    """
    origin = _Source(source)
    raw = text.encode("utf-8") if isinstance(text, str) else text
    try:
        root = yaml.compose(raw, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        message = f"invalid YAML: {error.problem or error.context}"
        if error.context and error.context_mark is not None and error.problem:
            message += f" ({error.context} at line {error.context_mark.line + 1})"
        raise PolicyError(origin.name, line, "", message) from None
    except yaml.YAMLError as error:
        raise PolicyError(origin.name, None, "", f"invalid YAML: {error}") from None
    except RecursionError:
        raise PolicyError(origin.name, None, "", "invalid YAML: the document is nested too deeply") from None
    try:
        return _parse_root(origin, root, raw, source)
    except yaml.MarkedYAMLError as error:  # a tag the safe loader cannot build, e.g. !!binary garbage
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(origin.name, line, "", f"invalid YAML value: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise PolicyError(origin.name, None, "", f"invalid YAML value: {error}") from None
    except RecursionError:
        raise PolicyError(origin.name, None, "", "the document is nested too deeply") from None


def _parse_root(origin: _Source, root: yaml.Node | None, raw: bytes, source: Path | None) -> Policy:
    if root is None:
        raise PolicyError(origin.name, None, "", "the policy is empty")
    top = _Map(origin, root, "", _TOP_KEYS)
    version_node = top.items["version"][1] if "version" in top else None
    version = _scalar(version_node) if isinstance(version_node, yaml.ScalarNode) else None
    if version_node is None:
        origin.fail(root, "version", "missing 'version: 1'")
    if version != 1:
        origin.fail(
            version_node, "version", f"unsupported policy version {version!r}; this wsgate reads version 1"
        )
    listen = top.get("listen", _listen, Listen(Address("0.0.0.0", 8080)))
    admin = top.get("admin", _admin, Address("127.0.0.1", 9090))
    if admin == listen.address and admin.port != 0:
        if "admin" in top:
            origin.fail(top.node_of("admin"), "admin.address", "must differ from listen.address")
        origin.fail(
            top.node_of("listen"), "listen.address", f"must differ from admin.address ({admin} by default)"
        )
    limits = Limits()
    if "limits" in top:
        limits = _limits(origin, top.node_of("limits"), "limits", limits, None)
    providers: dict[str, AuthProvider] = {}
    if "auth" in top:
        auth_node = top.node_of("auth")
        if not isinstance(auth_node, yaml.MappingNode):
            origin.fail(auth_node, "auth", "expected a mapping of provider names to providers")
        names = _Map(
            origin,
            auth_node,
            "auth",
            tuple(_scalar(k) for k, _ in auth_node.value if isinstance(k, yaml.ScalarNode)),
        )
        for name, (_key_node, provider_node) in names.items.items():
            providers[name] = _provider(origin, provider_node, f"auth.{name}", name)
    if "routes" not in top:
        origin.fail(root, "routes", "missing 'routes' (at least one route)")
    routes: list[Route] = []
    seen: dict[tuple[str, str], int] = {}
    for item, item_path in _items(origin, top.node_of("routes"), "routes"):
        route = _route(origin, item, item_path, limits, providers)
        key = (route.path, route.match)
        line = item.start_mark.line + 1
        if key in seen:
            path_node = _Map(origin, item, item_path, _ROUTE_KEYS).node_of("path")
            origin.fail(
                path_node,
                f"{item_path}.path",
                f"duplicate route path {route.path!r} (first at line {seen[key]})",
            )
        seen[key] = line
        routes.append(route)
    if not routes:
        origin.fail(top.node_of("routes"), "routes", "at least one route is needed")
    return Policy(
        version=1,
        listen=listen,
        admin=admin,
        limits=limits,
        routes=tuple(routes),
        trusted_proxies=top.get("trusted_proxies", _networks, ()),
        firewall=top.get("firewall", _firewall, Firewall()),
        auth=tuple(providers.values()),
        revoked=top.get("revoked", _revoked, Revocation()),
        log=top.get("log", _log, LogSettings()),
        source=source,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file.

    Raises:
        PolicyError: the file cannot be read, or its first problem.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as error:
        raise PolicyError(file, None, "", f"cannot read: {error.strerror or error}") from None
    return parse_policy(raw, file)
