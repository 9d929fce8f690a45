"""YAML policy files -> :class:`~proxy.policy.model.Policy`.

The YAML is composed into nodes (not loaded into dicts) so every value keeps its line: each error is a
:class:`~proxy.errors.PolicyError` naming the file, the line and the key path, e.g.
``policies/x.yaml:14: routes[1].upstream: expected ws:// or wss:// URL, got 'http://x'``.
Unknown keys, duplicate keys, wrong types, bad units and bad URLs are all refused; nothing is ignored.

Which keys a section takes, how each is read, its default and its bounds come from the declarations in
:mod:`proxy.policy.model` (:func:`read_keys`); this module adds what spans several keys or other files:
one key source per provider, algorithms that fit the key, a certificate that loads with its key, routes
naming providers that exist, a route's limits over the policy's.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from proxy.algorithms import HMAC_ALGORITHMS, KEY_TYPE_ALGORITHMS
from proxy.errors import PolicyError
from proxy.policy.declare import Declared, Kind, Scope, declarations
from proxy.policy.kinds import read_upstream
from proxy.policy.model import (
    Address,
    AuthProvider,
    CertificatePair,
    HealthCheck,
    Limits,
    Listen,
    MessageRate,
    MessageRules,
    Policy,
    RedisLimiter,
    Route,
    TlsListen,
    UpstreamPool,
    UpstreamTls,
)
from proxy.policy.nodes import Section, Source, items
from proxy.policy.values import certificate_dns_names

# -- the declarations at work -----------------------------------------------------------------------


def section_keys(cls: type) -> dict[str, list[Declared]]:
    """The declared keys of ``cls`` by the first part of their YAML name (``messages.client`` is under
    ``messages``)."""
    grouped: dict[str, list[Declared]] = {}
    for declared in declarations(cls):
        grouped.setdefault(declared.key.name.partition(".")[0], []).append(declared)
    return grouped


def read_keys(
    source: Source,
    node: yaml.Node,
    path: str,
    cls: type,
    scope: Scope | None = None,
    skip: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], Section]:
    """Read the keys ``cls`` declares from a mapping node: field name -> value, for the keys present.

    Unknown keys, keys not allowed in ``scope``, missing required keys, values of the wrong kind and
    values outside their bounds are refused with their line. Fields in ``skip`` are left to the caller
    (their value needs what other keys said).
    """
    grouped = section_keys(cls)
    section = Section(source, node, path, grouped)
    values: dict[str, Any] = {}
    for group in grouped.values():
        for declared in group:
            if declared.field_name in skip:
                continue
            found = locate(section, declared, cls)
            if found is None:
                _missing(section, declared)
                continue
            container, name = found
            values[declared.field_name] = read_declared(source, container, name, declared, scope)
    return values, section


def _missing(section: Section, declared: Declared) -> None:
    """Refuse a required key that is absent; a dotted one (``admin.address``) is required only when its
    parent mapping is present."""
    key = declared.key
    if not key.required:
        return
    first, _, rest = key.name.partition(".")
    if not rest:
        section.source.fail(section.node, section.path, f"missing {key.name!r}{key.hint}")
    if first in section:
        section.source.fail(section.node_of(first), section.child(first), f"missing {rest!r}{key.hint}")


def locate(section: Section, declared: Declared, cls: type) -> tuple[Section, str] | None:
    """The mapping holding ``declared``'s value (a key of ``cls``) and its name there, or None when the
    key is absent. A dotted name (``messages.client``) is looked up in the nested mapping, whose keys are
    checked too."""
    first, _, rest = declared.key.name.partition(".")
    if not rest:
        return (section, first) if first in section else None
    if first not in section:
        return None
    siblings = [other.key.name.partition(".")[2] for other in section_keys(cls)[first]]
    nested = Section(section.source, section.node_of(first), section.child(first), siblings)
    return (nested, rest) if rest in nested else None


def read_declared(
    source: Source, container: Section, name: str, declared: Declared, scope: Scope | None = None
) -> Any:
    """One declared key's value, read by its kind and checked against its bounds and its scope."""
    key = declared.key
    if scope is not None and scope not in key.scopes:
        source.fail(container.key_node(name), container.child(name), key.misplaced or "not allowed here")
    node, path = container.node_of(name), container.child(name)
    value = read_kind(source, node, path, key.kind)
    problem = key.problem(value) if value is not None else None
    if problem is not None:
        source.fail(node, path, problem)
    return value


def read_kind(source: Source, node: yaml.Node, path: str, kind: Kind) -> Any:
    """A value of ``kind``: a scalar by its reader, or a nested section by the section's reader."""
    if kind.section is None:
        assert kind.read is not None
        return kind.read(source, node, path)
    build = _SECTIONS.get(kind.section) or _plain(kind.section)
    if kind.many == "list":
        return tuple(build(source, item, item_path, None) for item, item_path in items(source, node, path))
    if kind.many == "map":
        if not isinstance(node, yaml.MappingNode):
            source.fail(node, path, f"expected a {kind.name}")
        names = Section(source, node, path, [str(key.value) for key, _ in node.value])
        return tuple(
            build(source, value, names.child(name), name) for name, (_, value) in names.items.items()
        )
    return build(source, node, path, None)


# -- sections ---------------------------------------------------------------------------------------


def _plain(cls: type) -> Any:
    def build(source: Source, node: yaml.Node, path: str, name: str | None) -> Any:
        values, _section = read_keys(source, node, path, cls)
        return cls(**values)

    return build


def _certificate_pair(source: Source, node: yaml.Node, path: str, name: str | None) -> CertificatePair:
    values, section = read_keys(source, node, path, CertificatePair)
    pair = CertificatePair(**values)
    return replace(pair, names=_load_pair(section, pair.cert_file, pair.key_file))


def _load_pair(section: Section, cert_file: Path, key_file: Path) -> tuple[str, ...]:
    """The SAN dNSNames of a certificate that loads with its key (refused at its ``cert`` key otherwise):
    a pair that does not load would otherwise surface only when the listener starts."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as error:
        section.fail("cert", f"cannot load the certificate and key: {error.strerror or error}")
    try:
        return certificate_dns_names(cert_file.read_bytes())
    except ValueError as error:
        section.fail("cert", f"not a PEM certificate: {error}")


def _tls(source: Source, node: yaml.Node, path: str, name: str | None) -> TlsListen:
    values, section = read_keys(source, node, path, TlsListen)
    tls = TlsListen(**values)
    single = "cert" in section or "key" in section
    if single and "certificates" in section:
        section.fail("certificates", "set either cert and key, or certificates, not both")
    if single:
        for present, absent in (("cert", "key"), ("key", "cert")):
            if present in section and absent not in section:
                section.fail(present, f"needs {absent!r} too")
        assert tls.cert_file is not None and tls.key_file is not None
        names = _load_pair(section, tls.cert_file, tls.key_file)
        tls = replace(tls, pairs=(CertificatePair(tls.cert_file, tls.key_file, names),))
    elif "certificates" in section:
        if not tls.certificates:
            section.fail("certificates", "name at least one {cert, key}")
        tls = replace(tls, pairs=tls.certificates)
    else:
        source.fail(node, path, "missing 'cert' and 'key' (or 'certificates')")
    if tls.client_ca is None and tls.client_auth != "none":
        section.fail(
            "client_auth",
            f"{tls.client_auth} needs client_ca, the CAs client certificates are verified against",
        )
    if tls.client_ca is not None and tls.client_auth == "none":
        section.fail("client_ca", "does nothing without client_auth: optional or required")
    return tls


def _upstream_tls(source: Source, node: yaml.Node, path: str, name: str | None) -> UpstreamTls:
    values, section = read_keys(source, node, path, UpstreamTls)
    tls = UpstreamTls(**values)
    if (tls.cert_file is None) != (tls.key_file is None):
        section.fail("cert" if tls.cert_file is not None else "key", "cert and key go together")
    if tls.cert_file is not None:
        try:  # a pair that does not load would otherwise surface only at the first connect
            ssl.create_default_context().load_cert_chain(tls.cert_file, tls.key_file)
        except (ssl.SSLError, OSError) as error:
            section.fail("cert", f"cannot load the certificate and key: {error.strerror or error}")
    return tls


def _upstream_pool(source: Source, node: yaml.Node, path: str, name: str | None) -> UpstreamPool:
    """``upstream: URL`` (a pool of one) or ``upstream: {endpoints: [...], balance, health_check}``."""
    if isinstance(node, yaml.ScalarNode):
        return UpstreamPool(endpoints=(read_upstream(source, node, path),))
    values, _section = read_keys(source, node, path, UpstreamPool)
    return UpstreamPool(**values)


def _health_check(source: Source, node: yaml.Node, path: str, name: str | None) -> HealthCheck:
    values, section = read_keys(source, node, path, HealthCheck)
    check = HealthCheck(**values)
    if "timeout" not in values:
        check = replace(check, timeout=min(check.timeout, check.interval))
    if check.timeout > check.interval:
        where = "timeout" if "timeout" in section else "interval"
        section.fail(
            where,
            f"a check's timeout ({check.timeout:g}s) must not exceed its interval ({check.interval:g}s)",
        )
    return check


#: Bursts and the rates they belong to: a burst set where no rate applies does nothing, and is warned about.
_BURSTS = (
    ("handshake_burst", "handshakes_per_ip"),
    ("message_burst", "messages_per_connection"),
    ("byte_burst", "bytes_per_connection"),
)


def read_limits(
    source: Source, node: yaml.Node, path: str, base: Limits, scope: Scope
) -> tuple[Limits, frozenset[str]]:
    """A ``limits`` section over ``base``: the merged limits and the fields this section set."""
    values, section = read_keys(source, node, path, Limits, scope)
    limits = replace(base, **values)
    for burst, rate in _BURSTS:
        if burst in values and getattr(limits, rate) is None:
            name = _declared(Limits, burst).key.name
            source.warn(
                section.node_of(name),
                section.child(name),
                f"does nothing without {_declared(Limits, rate).key.name}",
            )
    if limits.bytes_per_connection is not None and limits.byte_burst < 1:
        limits = replace(limits, byte_burst=max(int(limits.bytes_per_connection), limits.max_message_bytes))
    return limits, frozenset(values)


def _message_rules(source: Source, section: Section, name: str, base: MessageRules) -> MessageRules | None:
    declared = next(item for item in declarations(Route) if item.key.name == f"messages.{name}")
    found = locate(section, declared, Route)
    if found is None:
        return None
    container, key = found
    node, path = container.node_of(key), container.child(key)
    values, _rules = read_keys(source, node, path, MessageRules)
    rules = replace(base, **values)
    if rules.schema_file is not None:
        rules = replace(rules, schema=json.loads(rules.schema_file.read_text(encoding="utf-8")))
    return rules


def _route(
    source: Source, node: yaml.Node, path: str, limits: Limits, providers: dict[str, AuthProvider]
) -> Route:
    values, section = read_keys(
        source, node, path, Route, skip=frozenset({"limits", "client_rules", "upstream_rules"})
    )
    _check_route_auth(section, values["auth"], providers)
    pool: UpstreamPool = values["upstream"]
    if pool.balance == "hash_subject" and not values["auth"]:
        upstream = Section(
            source, section.node_of("upstream"), section.child("upstream"), section_keys(UpstreamPool)
        )
        upstream.fail("balance", "hash_subject needs a token subject: this route is auth: none")
    tls: UpstreamTls | None = values.get("upstream_tls")
    if tls is not None:
        if not pool.secure:
            section.fail("upstream_tls", "only for a wss:// upstream")
        endpoints = tuple(
            replace(
                endpoint,
                ca_file=tls.ca_file,
                insecure_skip_verify=tls.insecure_skip_verify,
                cert_file=tls.cert_file,
                key_file=tls.key_file,
            )
            for endpoint in pool.endpoints
        )
        values["upstream"] = replace(pool, endpoints=endpoints)
    route_limits, own = limits, frozenset[str]()
    if "limits" in section:
        route_limits, own = read_limits(
            source, section.node_of("limits"), section.child("limits"), limits, Scope.ROUTE
        )
    client_rules = MessageRules(max_message_bytes=route_limits.max_message_bytes)
    client_rules = _message_rules(source, section, "client", client_rules) or client_rules
    upstream_rules = _message_rules(
        source,
        section,
        "upstream",
        MessageRules(max_message_bytes=route_limits.max_message_bytes, utf8=False),
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
    return Route(
        **values,
        limits=route_limits,
        own_limits=own,
        client_rules=client_rules,
        upstream_rules=upstream_rules,
        message_rate=rate,
    )


def _check_route_auth(section: Section, names: tuple[str, ...], providers: dict[str, AuthProvider]) -> None:
    """Every provider a route names exists and, when it names several, a token can be told which one
    is its own without trying them in turn: by ``iss`` (at most one provider without an issuer, which
    takes the tokens whose ``iss`` no other holds), and by ``kid`` among providers of one issuer, which
    must all read their keys from a JWKS document."""
    node = section.node_of("auth")
    for index, name in enumerate(names):
        if name not in providers:
            defined = ", ".join(sorted(providers)) or "none defined"
            item = node.value[index] if isinstance(node, yaml.SequenceNode) else node
            path = section.child("auth") + (f"[{index}]" if isinstance(node, yaml.SequenceNode) else "")
            section.source.fail(item, path, f"unknown auth provider {name!r} ({defined})")
    if len(names) < 2:
        return
    by_issuer: dict[str | None, list[AuthProvider]] = {}
    for name in names:
        by_issuer.setdefault(providers[name].issuer, []).append(providers[name])
    without = by_issuer.get(None, [])
    if len(without) > 1:
        both = " and ".join(repr(provider.name) for provider in without[:2])
        section.fail(
            "auth",
            f"providers {both} have no issuer, so their tokens cannot be told apart: set auth.NAME.issuer "
            "on each (one provider of a route may go without)",
        )
    for issuer, sharing in by_issuer.items():
        if issuer is None or len(sharing) < 2:
            continue
        keyless = next((provider for provider in sharing if provider.jwks_url is None), None)
        if keyless is not None:
            both = " and ".join(repr(provider.name) for provider in sharing[:2])
            section.fail(
                "auth",
                f"providers {both} share the issuer {issuer!r}, and {keyless.name!r} has no jwks_url to "
                "pick it by a token's kid: give them different issuers, or each a jwks_url",
            )


def _provider(source: Source, node: yaml.Node, path: str, name: str | None) -> AuthProvider:
    assert name is not None
    values, section = read_keys(source, node, path, AuthProvider)
    algorithms: tuple[str, ...] = values["algorithms"]
    key_sources = [key for key in ("secret_env", "public_key_file", "jwks_url") if key in values]
    if len(key_sources) != 1:
        source.fail(node, path, "set exactly one of secret_env, public_key_file, jwks_url")
    key_source = key_sources[0]
    hmac = [alg for alg in algorithms if alg in HMAC_ALGORITHMS]
    if key_source == "secret_env" and len(hmac) != len(algorithms):
        section.fail("algorithms", "secret_env keys only verify HS256/HS384/HS512")
    if key_source != "secret_env" and hmac:
        section.fail(
            "algorithms",
            f"{hmac[0]} with a public key would let the key be used as an HMAC secret (algorithm confusion)",
        )
    if key_source == "secret_env":
        values["secret"] = _secret(source, section, values["secret_env"])
    elif key_source == "public_key_file":
        values["public_key"] = values["public_key_file"].read_bytes()
        _check_public_key(section, values["public_key"], algorithms)
    if values.get("jwks_timeout") == 0:
        del values["jwks_timeout"]
    return AuthProvider(name=name, **values)


def _environment(source: Source, node: yaml.Node, path: str, variable: str) -> str | None:
    """The value of environment variable ``variable`` that key ``path`` names. Unset or empty: refused
    by ``serve``, a warning (and None) for ``check`` and ``explain``."""
    value = os.environ.get(variable)
    if value:
        return value
    if source.require_secrets:
        source.fail(node, path, f"environment variable {variable} is not set")
    source.warn(
        node, path, f"environment variable {variable} is not set; wsgate serve would refuse this policy"
    )
    return None


def _redis(source: Source, node: yaml.Node, path: str, name: str | None) -> RedisLimiter:
    values, section = read_keys(source, node, path, RedisLimiter)
    variable = values.get("password_env")
    if variable is not None:
        where = section.node_of("password_env"), section.child("password_env")
        values["password"] = _environment(source, *where, variable)
    if values.get("ca_file") is not None and not values["url"].startswith("rediss://"):
        section.fail("ca_file", "a CA file verifies a rediss:// (TLS) server; the url is redis://")
    return RedisLimiter(**values)


def _secret(source: Source, section: Section, variable: str) -> bytes | None:
    value = os.environ.get(variable)
    if not value:
        if source.require_secrets:
            section.fail("secret_env", f"environment variable {variable} is not set")
        node = section.node_of("secret_env")
        source.warn(
            node,
            section.child("secret_env"),
            f"environment variable {variable} is not set; wsgate serve would refuse this policy",
        )
        return None
    secret = value.encode()
    if len(secret) < 32:
        section.fail("secret_env", f"the secret in {variable} is {len(secret)} bytes; HMAC needs at least 32")
    return secret


def _check_public_key(section: Section, pem: bytes, algorithms: tuple[str, ...]) -> None:
    try:
        key = load_pem_public_key(pem)
    except ValueError:
        section.fail(
            "public_key_file", "not a PEM public key (a private key or certificate does not belong here)"
        )
    if isinstance(key, rsa.RSAPublicKey):
        family = "RSA"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        family = "EC"
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        family = "OKP"
    else:
        section.fail("public_key_file", "unsupported public key type")
    wrong = [alg for alg in algorithms if alg not in KEY_TYPE_ALGORITHMS[family]]
    if wrong:
        section.fail("public_key_file", f"a {family} key cannot verify {', '.join(wrong)}")


#: Sections with rules of their own beyond their keys; any other section is built from its keys alone.
_SECTIONS: dict[type, Any] = {
    TlsListen: _tls,
    CertificatePair: _certificate_pair,
    AuthProvider: _provider,
    RedisLimiter: _redis,
    UpstreamPool: _upstream_pool,
    UpstreamTls: _upstream_tls,
    HealthCheck: _health_check,
}


# -- the file ---------------------------------------------------------------------------------------


def parse_policy(text: str | bytes, source: Path | None = None, require_secrets: bool = True) -> Policy:
    """Parse a policy document.

    ``require_secrets=False`` (``wsgate check``, ``wsgate explain``) accepts a provider whose
    ``secret_env`` is not set, with a warning in :attr:`Policy.warnings`, and leaves its secret unset.
    Keys that do nothing (a burst without its rate) are warned about there too.

    Raises:
        PolicyError: the first problem found, with file, line and key path.
    """
    origin = Source(source, require_secrets)
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


def _parse_root(origin: Source, root: yaml.Node | None, raw: bytes, source: Path | None) -> Policy:
    if root is None:
        raise PolicyError(origin.name, None, "", "the policy is empty")
    top = Section(origin, root, "", section_keys(Policy))
    if "version" not in top:
        origin.fail(root, "version", "missing 'version: 1'")
    values, top = read_keys(origin, root, "", Policy, skip=frozenset({"version", "limits", "routes"}))
    read_declared(origin, top, "version", _declared(Policy, "version"))
    listen: Listen = values.pop("listen", _declared(Policy, "listen").default)
    admin: Address = values.pop("admin", _declared(Policy, "admin").default)
    if admin == listen.address and admin.port != 0:
        if "admin" in top:
            origin.fail(top.node_of("admin"), "admin.address", "must differ from listen.address")
        origin.fail(
            top.node_of("listen"), "listen.address", f"must differ from admin.address ({admin} by default)"
        )
    token_variable = values.get("admin_token_env")
    if token_variable is not None:
        admin_section = Section(origin, top.node_of("admin"), "admin", ["address", "token_env"])
        where = admin_section.node_of("token_env"), "admin.token_env"
        values["admin_token"] = _environment(origin, *where, token_variable)
    limits = Limits()
    if "limits" in top:
        limits, _own = read_limits(origin, top.node_of("limits"), "limits", limits, Scope.POLICY)
    providers = {provider.name: provider for provider in values.get("auth", ())}
    if "routes" not in top:
        origin.fail(root, "routes", "missing 'routes' (at least one route)")
    routes: list[Route] = []
    seen: dict[tuple[str | None, str, str], int] = {}
    for item, item_path in items(origin, top.node_of("routes"), "routes"):
        route = _route(origin, item, item_path, limits, providers)
        route_section = Section(origin, item, item_path, section_keys(Route))
        key = (route.host, route.path, route.match)
        if key in seen:
            on = f" on host {route.host!r}" if route.host is not None else ""
            origin.fail(
                route_section.node_of("path"),
                f"{item_path}.path",
                f"duplicate route path {route.path!r}{on} (first at line {seen[key]})",
            )
        seen[key] = item.start_mark.line + 1
        _check_certificate_keys(route_section, route, listen)
        routes.append(route)
    if not routes:
        origin.fail(top.node_of("routes"), "routes", "at least one route is needed")
    gateway_set = frozenset(name for route in routes for name in _forwarded_header_names(route))
    routes = [replace(route, gateway_set_headers=gateway_set) for route in routes]
    return Policy(
        **values,
        version=1,
        listen=listen,
        admin=admin,
        limits=limits,
        routes=tuple(routes),
        source=source,
        sha256=hashlib.sha256(raw).hexdigest(),
        warnings=tuple(origin.warnings),
    )


def _forwarded_header_names(route: Route) -> set[str]:
    names = {header.lower() for _claim, header in route.forward_claims}
    if route.forward_client_certificate is not None:
        names.update(route.forward_client_certificate.headers)
    return names


def _check_certificate_keys(section: Section, route: Route, listen: Listen) -> None:
    """A route that needs a client certificate needs a listener that asks for one."""
    asks = listen.tls is not None and listen.tls.client_auth != "none"
    if asks:
        return
    for name in ("client_certificate", "client_subjects"):
        if name in section and route.requires_certificate:
            section.fail(
                name,
                "needs listen.tls.client_ca and client_auth (optional or required) to verify certificates",
            )


def _declared(cls: type, field_name: str) -> Declared:
    return next(item for item in declarations(cls) if item.field_name == field_name)


def load_policy(path: str | Path, require_secrets: bool = True) -> Policy:
    """Read and parse a policy file (see :func:`parse_policy` for ``require_secrets``).

    Raises:
        PolicyError: the file cannot be read, or its first problem.
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as error:
        raise PolicyError(file, None, "", f"cannot read: {error.strerror or error}") from None
    return parse_policy(raw, file, require_secrets)
