"""The kinds of value a policy key holds: how each is read from a YAML node, shown in the reference, and
described in JSON Schema. A key's declaration (:mod:`proxy.policy.model`) names its kind."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import fastjsonschema
import yaml

from proxy.algorithms import ALGORITHMS
from proxy.policy.declare import Kind, Scope
from proxy.policy.nodes import Section, Source, items, scalar, scalar_or_none
from proxy.policy.units import (
    BYTE_RATE_PATTERN,
    DURATION_PATTERN,
    RATE_PATTERN,
    SIZE_PATTERN,
    format_duration,
    format_rate,
    format_size,
    parse_byte_rate,
    parse_duration,
    parse_rate,
    parse_size,
)
from proxy.policy.values import (
    Address,
    ClaimRule,
    FirewallRule,
    IPNetwork,
    OriginPattern,
    SubjectPattern,
    Upstream,
    parse_route_host,
)

T = TypeVar("T")

TOKEN_SOURCES = ("header", "query", "cookie", "subprotocol")
#: What a request target may hold as it is written (RFC 9112 3.2: no spaces, no controls).
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
#: Headers a claim may not be written into: the handshake's own, the token's, and those the gateway sets.
RESERVED_HEADERS = frozenset(
    {
        "host", "connection", "upgrade", "content-length", "transfer-encoding", "te", "trailer", "keep-alive",
        "authorization", "cookie", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
        "x-forwarded-uri", "x-request-id", "forwarded",
    }
)  # fmt: skip


# -- readers: (source, node, path) -> value ---------------------------------------------------------


def read_str(source: Source, node: yaml.Node, path: str) -> str:
    value = scalar_or_none(node)
    if not isinstance(value, str) or not value:
        source.fail(node, path, "expected a non-empty string")
    return value


def read_bool(source: Source, node: yaml.Node, path: str) -> bool:
    value = scalar_or_none(node)
    if not isinstance(value, bool):
        source.fail(node, path, "expected true or false")
    return value


def read_count(source: Source, node: yaml.Node, path: str) -> int:
    value = scalar_or_none(node)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        source.fail(node, path, "expected a whole number of at least 1")
    return value


def _unit(parse: Callable[[object], T]) -> Callable[[Source, yaml.Node, str], T]:
    def read(source: Source, node: yaml.Node, path: str) -> T:
        try:
            return parse(scalar_or_none(node))
        except ValueError as error:
            source.fail(node, path, str(error))

    return read


def read_str_list(source: Source, node: yaml.Node, path: str) -> tuple[str, ...]:
    if isinstance(node, yaml.ScalarNode):
        return (read_str(source, node, path),)
    return tuple(read_str(source, item, item_path) for item, item_path in items(source, node, path))


def read_str_set(source: Source, node: yaml.Node, path: str) -> frozenset[str]:
    if isinstance(node, yaml.SequenceNode) and not node.value:
        return frozenset()
    return frozenset(read_str_list(source, node, path))


def read_file(source: Source, node: yaml.Node, path: str) -> Path:
    file = Path(read_str(source, node, path))
    if not file.is_absolute():
        file = source.base / file
    if not file.is_file() or not os.access(file, os.R_OK):
        source.fail(node, path, f"file not found or not readable: {file}")
    return file


def read_new_file(source: Source, node: yaml.Node, path: str) -> Path:
    file = Path(read_str(source, node, path))
    if not file.is_absolute():
        file = source.base / file
    if not file.parent.is_dir():
        source.fail(node, path, f"directory does not exist: {file.parent}")
    return file


def read_network(source: Source, node: yaml.Node, path: str) -> IPNetwork:
    text = read_str(source, node, path)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        source.fail(node, path, f"expected a CIDR like 10.0.0.0/8 or 2001:db8::/32, got {text!r}")


def read_networks(source: Source, node: yaml.Node, path: str) -> tuple[IPNetwork, ...]:
    if isinstance(node, yaml.ScalarNode):
        return (read_network(source, node, path),)
    return tuple(read_network(source, item, item_path) for item, item_path in items(source, node, path))


def read_address(source: Source, node: yaml.Node, path: str) -> Address:
    text = read_str(source, node, path)
    host, separator, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        source.fail(node, path, f"put an IPv6 address in brackets, like [::1]:8080, got {text!r}")
    if not separator or not host or not port_text.isdigit() or int(port_text) > 65535:
        source.fail(node, path, f"expected host:port, like 0.0.0.0:8080 or [::]:8080, got {text!r}")
    return Address(host, int(port_text))


def read_upstream(source: Source, node: yaml.Node, path: str) -> Upstream:
    url = read_str(source, node, path)
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
    if not _VISIBLE_ASCII.fullmatch(split.path + split.query):
        # it is written into the request line as it is
        source.fail(node, path, "upstream URL path and query must be visible ASCII (percent-encode the rest)")
    secure = split.scheme == "wss"
    return Upstream(
        url=url,
        secure=secure,
        host=split.hostname,
        port=port if port is not None else (443 if secure else 80),
        path=split.path,
        query=split.query,
    )


def read_upstream_list(source: Source, node: yaml.Node, path: str) -> tuple[Upstream, ...]:
    """A pool's endpoints: at least one, all ws:// or all wss:// (one ``upstream_tls`` verifies them
    all), no endpoint twice (compared by :attr:`Upstream.label`: ``ws://a`` is ``ws://a:80``)."""
    endpoints: list[Upstream] = []
    first_line: dict[str, int] = {}
    for item, item_path in items(source, node, path):
        endpoint = read_upstream(source, item, item_path)
        if endpoints and endpoint.secure != endpoints[0].secure:
            source.fail(item, item_path, "mixes ws:// and wss:// endpoints; a pool is all one or the other")
        if endpoint.label in first_line:
            source.fail(
                item,
                item_path,
                f"duplicate endpoint {endpoint.label} (first at line {first_line[endpoint.label]})",
            )
        first_line[endpoint.label] = item.start_mark.line + 1
        endpoints.append(endpoint)
    if not endpoints:
        source.fail(node, path, "name at least one endpoint")
    return tuple(endpoints)


def read_http_url(source: Source, node: yaml.Node, path: str) -> str:
    url = read_str(source, node, path)
    if urlsplit(url).scheme not in ("http", "https"):
        source.fail(node, path, "expected an http:// or https:// URL")
    return url


def read_redis_url(source: Source, node: yaml.Node, path: str) -> str:
    url = read_str(source, node, path)
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        source.fail(node, path, f"expected a redis:// or rediss:// URL, got {url!r}")
    if split.scheme not in ("redis", "rediss") or not split.hostname:
        source.fail(node, path, f"expected a redis:// or rediss:// URL, got {url!r}")
    if split.password:
        source.fail(node, path, "the URL must not hold a password: set password_env")
    if split.query or split.fragment:
        # redis-py would read options from it: a password, or ssl_cert_reqs=none turning TLS checks off
        source.fail(node, path, "the URL must not carry options (?...): use the limiter.redis keys")
    database = split.path.lstrip("/")
    if database and not database.isdigit():
        source.fail(node, path, f"the URL's path is the database number, got {split.path!r}")
    return url


def read_ca_file(source: Source, node: yaml.Node, path: str) -> Path:
    ca_file = read_file(source, node, path)
    try:
        ssl.create_default_context(cafile=str(ca_file))
    except (ssl.SSLError, OSError) as error:
        source.fail(node, path, f"not a PEM CA bundle: {error.strerror or error}")
    return ca_file


def read_route_path(source: Source, node: yaml.Node, path: str) -> str:
    route_path = read_str(source, node, path)
    if not route_path.startswith("/") or any(char in route_path for char in "?# \t"):
        source.fail(node, path, "expected a path starting with / (no ? # or spaces)")
    return route_path


def read_auth_names(source: Source, node: yaml.Node, path: str) -> tuple[str, ...]:
    """``none`` (an open route: no names), one provider name, or a list of distinct names without
    ``none``. Whether the names exist, and can be told apart, is the loader's to check."""
    if isinstance(node, yaml.ScalarNode):
        name = read_str(source, node, path)
        return () if name == "none" else (name,)
    names: list[str] = []
    for item, item_path in items(source, node, path):
        name = read_str(source, item, item_path)
        if name == "none":
            source.fail(item, item_path, "'none' cannot be one of several providers: write 'auth: none'")
        if name in names:
            source.fail(item, item_path, f"provider {name!r} is listed twice")
        names.append(name)
    if not names:
        source.fail(node, path, "name at least one provider, or write 'auth: none' for an open route")
    return tuple(names)


def read_request_target(source: Source, node: yaml.Node, path: str) -> str:
    target = read_str(source, node, path)
    if not target.startswith("/") or "#" in target or not _VISIBLE_ASCII.fullmatch(target):
        source.fail(
            node, path, "expected a path starting with / (a query may follow; visible ASCII, no # or spaces)"
        )
    return target


def read_tls_version(source: Source, node: yaml.Node, path: str) -> str:
    value = str(scalar(node)) if isinstance(node, yaml.ScalarNode) else ""
    if value not in ("1.2", "1.3"):
        source.fail(node, path, 'expected "1.2" or "1.3"')
    return value


def read_version(source: Source, node: yaml.Node, path: str) -> int:
    version = scalar_or_none(node)
    if version != 1:
        source.fail(node, path, f"unsupported policy version {version!r}; this wsgate reads version 1")
    return 1


def read_algorithms(source: Source, node: yaml.Node, path: str) -> tuple[str, ...]:
    algorithms = read_str_list(source, node, path)
    if not algorithms:
        source.fail(node, path, "name at least one algorithm")
    for algorithm in algorithms:
        if algorithm.lower() == "none":
            source.fail(node, path, "'none' is never accepted")
        if algorithm not in ALGORITHMS:
            source.fail(
                node, path, f"unknown algorithm {algorithm!r}; known: {', '.join(sorted(ALGORITHMS))}"
            )
    return algorithms


def read_token_sources(source: Source, node: yaml.Node, path: str) -> tuple[str, ...]:
    sources = read_str_list(source, node, path)
    for token_source in sources:
        if token_source not in TOKEN_SOURCES:
            source.fail(node, path, f"expected some of: {', '.join(TOKEN_SOURCES)}")
    return sources


def read_message_types(source: Source, node: yaml.Node, path: str) -> frozenset[int]:
    names = read_str_list(source, node, path)
    if not names or any(name not in ("text", "binary") for name in names):
        source.fail(node, path, "expected a list of: text, binary")
    return frozenset(1 if name == "text" else 2 for name in names)


def read_schema_file(source: Source, node: yaml.Node, path: str) -> Path:
    schema_file = read_file(source, node, path)
    try:
        fastjsonschema.compile(json.loads(schema_file.read_text(encoding="utf-8")))
    except (ValueError, fastjsonschema.JsonSchemaDefinitionException) as error:
        source.fail(node, path, f"not a JSON Schema: {error}")
    return schema_file


def read_origins(source: Source, node: yaml.Node, path: str) -> tuple[OriginPattern, ...]:
    patterns = []
    for item, item_path in items(source, node, path):
        try:
            patterns.append(OriginPattern.parse(read_str(source, item, item_path)))
        except ValueError as error:
            source.fail(item, item_path, str(error))
    return tuple(patterns)


def read_forward_claims(source: Source, node: yaml.Node, path: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(node, yaml.MappingNode):
        source.fail(node, path, "expected a mapping of claim: Header-Name")
    pairs = []
    for key_node, value_node in node.value:
        claim = read_str(source, key_node, path)
        header = read_str(source, value_node, f"{path}.{claim}")
        if not HEADER_NAME.fullmatch(header) or header.lower() in RESERVED_HEADERS:
            source.fail(value_node, f"{path}.{claim}", f"{header!r} cannot carry a claim")
        pairs.append((claim, header))
    return tuple(pairs)


def read_route_host(source: Source, node: yaml.Node, path: str) -> str:
    try:
        return parse_route_host(read_str(source, node, path))
    except ValueError as error:
        source.fail(node, path, str(error))


def read_subject_patterns(source: Source, node: yaml.Node, path: str) -> tuple[SubjectPattern, ...]:
    patterns = []
    for item, item_path in items(source, node, path):
        try:
            patterns.append(SubjectPattern.parse(read_str(source, item, item_path)))
        except ValueError as error:
            source.fail(item, item_path, str(error))
    if not patterns:
        source.fail(node, path, "an empty list admits no certificate; name at least one subject")
    return tuple(patterns)


def read_forwarded_header(source: Source, node: yaml.Node, path: str) -> str:
    header = read_str(source, node, path)
    if not HEADER_NAME.fullmatch(header) or header.lower() in RESERVED_HEADERS:
        source.fail(node, path, f"{header!r} cannot carry a certificate's value")
    return header


def read_claims(source: Source, node: yaml.Node, path: str) -> tuple[ClaimRule, ...]:
    if not isinstance(node, yaml.MappingNode):
        source.fail(node, path, "expected a mapping of claim: value or [values]")
    rules = []
    for key_node, value_node in node.value:
        claim = read_str(source, key_node, path)
        values = (
            [value_node]
            if isinstance(value_node, yaml.ScalarNode)
            else [item for item, _ in items(source, value_node, f"{path}.{claim}")]
        )
        allowed = []
        for value in values:
            value_scalar = scalar_or_none(value)
            if not isinstance(value_scalar, str | int | bool):
                source.fail(
                    value, f"{path}.{claim}", "expected a string, number or boolean (or a list of them)"
                )
            allowed.append(value_scalar)
        rules.append(ClaimRule(claim, tuple(allowed)))
    return tuple(rules)


def read_firewall_rules(source: Source, node: yaml.Node, path: str) -> tuple[FirewallRule, ...]:
    rules: list[FirewallRule] = []
    for item, item_path in items(source, node, path):
        rule = Section(source, item, item_path, ("allow", "deny"))
        if len(rule.items) != 1:
            source.fail(item, item_path, "each rule is one 'allow: CIDR' or 'deny: CIDR'")
        action = next(iter(rule.items))
        for network in rule.get(action, read_networks, ()):
            rules.append(FirewallRule(action == "allow", network))
    return tuple(rules)


# -- kinds ------------------------------------------------------------------------------------------

_STRING = {"type": "string", "minLength": 1}
_STRINGS = {"anyOf": [_STRING, {"type": "array", "items": _STRING}]}
_CIDRS = {"anyOf": [_STRING, {"type": "array", "items": _STRING}]}


def choice(*words: str) -> Kind:
    """One of ``words``."""

    def read(source: Source, node: yaml.Node, path: str) -> str:
        value = scalar_or_none(node)
        if value not in words:
            source.fail(node, path, f"expected one of: {', '.join(words)}")
        return str(value)

    return Kind(" / ".join(words), read, {"enum": list(words)})


def flag(yes: str, no: str) -> Kind:
    """One of two words, read as True (``yes``) or False (``no``)."""
    words = choice(yes, no)
    assert words.read is not None
    read_word = words.read

    def read(source: Source, node: yaml.Node, path: str) -> bool:
        return bool(read_word(source, node, path) == yes)

    return Kind(words.name, read, words.schema, show=lambda value: yes if value else no)


def section(cls: type, scope: Scope | None = None) -> Kind:
    """A nested mapping whose keys ``cls`` declares (only those allowed in ``scope``, when given)."""
    return Kind("mapping", section=cls, scope=scope, show=lambda value: "")


def section_or(cls: type, scalar: Kind) -> Kind:
    """A value of kind ``scalar`` (its short form), or a nested mapping whose keys ``cls`` declares; the
    section's reader (in the loader) takes both forms."""
    return Kind(f"{scalar.name}, or a mapping", section=cls, schema=scalar.schema, show=lambda value: "")


def section_list(cls: type) -> Kind:
    """A list of mappings whose keys ``cls`` declares."""
    return Kind("list of mappings", section=cls, many="list", show=lambda value: "")


def section_map(cls: type, what: str) -> Kind:
    """A mapping of names to mappings whose keys ``cls`` declares (``what``: "names to providers")."""
    return Kind(f"mapping of {what}", section=cls, many="map", show=lambda value: "")


VERSION = Kind("1", read_version, {"const": 1})
STRING = Kind("string", read_str, _STRING)
BOOL = Kind("boolean", read_bool, {"type": "boolean"})
COUNT = Kind("whole number", read_count, {"type": "integer", "minimum": 1})
SIZE = Kind(
    "size",
    _unit(parse_size),
    {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}]},
    show=format_size,
)
DURATION = Kind(
    "duration",
    _unit(parse_duration),
    {"anyOf": [{"const": 0}, {"type": "string", "pattern": DURATION_PATTERN}]},
    show=format_duration,
)
RATE = Kind("rate", _unit(parse_rate), {"type": "string", "pattern": RATE_PATTERN}, show=format_rate)
BYTE_RATE = Kind(
    "byte rate",
    _unit(parse_byte_rate),
    {"type": "string", "pattern": BYTE_RATE_PATTERN},
    show=lambda value: f"{format_size(int(value))}/s",
)
STRINGS = Kind("string or list", read_str_list, _STRINGS)
STRING_SET = Kind("list of strings", read_str_set, _STRINGS)
FILE = Kind("file", read_file, _STRING)
NEW_FILE = Kind("file (may not exist yet)", read_new_file, _STRING)
CA_FILE = Kind("PEM file", read_ca_file, _STRING)
SCHEMA_FILE = Kind("JSON Schema file", read_schema_file, _STRING)
ADDRESS = Kind(
    "host:port", read_address, {"type": "string", "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):[0-9]{1,5}$"}
)
NETWORKS = Kind("CIDR or list", read_networks, _CIDRS)
UPSTREAM_URL = Kind("ws:// or wss:// URL", read_upstream, {"type": "string", "pattern": "^wss?://[^#]+$"})
UPSTREAM_URLS = Kind(
    "list of ws:// or wss:// URLs",
    read_upstream_list,
    {"type": "array", "items": {"type": "string", "pattern": "^wss?://[^#]+$"}, "minItems": 1},
)
REDIS_URL = Kind(
    "redis:// or rediss:// URL", read_redis_url, {"type": "string", "pattern": "^rediss?://[^:@/]"}
)
HTTP_URL = Kind("http(s):// URL", read_http_url, {"type": "string", "pattern": "^https?://"})
ROUTE_PATH = Kind("path", read_route_path, {"type": "string", "pattern": "^/[^?# \t]*$"})
AUTH_NAMES = Kind(
    "provider name, list of names, or none",
    read_auth_names,
    {"anyOf": [_STRING, {"type": "array", "items": _STRING, "minItems": 1, "uniqueItems": True}]},
    show=lambda value: ", ".join(value) if value else "none",
)
REQUEST_TARGET = Kind(
    "path[?query]", read_request_target, {"type": "string", "pattern": "^/[\\x21\\x22\\x24-\\x7e]*$"}
)
TLS_VERSION = Kind('"1.2" / "1.3"', read_tls_version, {"enum": ["1.2", "1.3", 1.2, 1.3]})
ALGORITHM_LIST = Kind(
    "algorithms",
    read_algorithms,
    {
        "anyOf": [
            {"enum": sorted(ALGORITHMS)},
            {"type": "array", "items": {"enum": sorted(ALGORITHMS)}, "minItems": 1},
        ]
    },
)
TOKEN_SOURCE_LIST = Kind(
    "token sources",
    read_token_sources,
    {"anyOf": [{"enum": list(TOKEN_SOURCES)}, {"type": "array", "items": {"enum": list(TOKEN_SOURCES)}}]},
)
MESSAGE_TYPES = Kind(
    "text / binary (or a list)",
    read_message_types,
    {
        "anyOf": [
            {"enum": ["text", "binary"]},
            {"type": "array", "items": {"enum": ["text", "binary"]}, "minItems": 1},
        ]
    },
    show=lambda value: ", ".join(name for code, name in ((1, "text"), (2, "binary")) if code in value),
)
ROUTE_HOST = Kind(
    "host name or *.domain",
    read_route_host,
    {"type": "string", "pattern": r"^(\*\.)?[^*:/ ]+$|^\[[0-9A-Fa-f:.]+\]$"},
)
CLIENT_SUBJECTS = Kind(
    "list of subjects (RFC 4514, or CN=glob)",
    read_subject_patterns,
    {"type": "array", "items": {"type": "string", "pattern": "="}, "minItems": 1},
)
FORWARDED_HEADER = Kind(
    "header name", read_forwarded_header, {"type": "string", "pattern": HEADER_NAME.pattern}
)
ORIGINS = Kind(
    "list of origins", read_origins, {"type": "array", "items": {"type": "string", "pattern": "^https?://"}}
)
_CLAIM_VALUE = {"type": ["string", "integer", "boolean"]}
CLAIMS = Kind(
    "claim: value or [values]",
    read_claims,
    {
        "type": "object",
        "additionalProperties": {"anyOf": [_CLAIM_VALUE, {"type": "array", "items": _CLAIM_VALUE}]},
    },
)
FORWARD_CLAIMS = Kind(
    "claim: Header-Name",
    read_forward_claims,
    {"type": "object", "additionalProperties": {"type": "string", "pattern": HEADER_NAME.pattern}},
)
FIREWALL_RULES = Kind(
    "list of {allow: CIDR} / {deny: CIDR}",
    read_firewall_rules,
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"allow": _CIDRS, "deny": _CIDRS},
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
        },
    },
)
