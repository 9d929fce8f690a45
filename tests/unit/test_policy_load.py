"""The policy loader: examples load, every broken file is refused with file:line: key: message."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.errors import PolicyError
from proxy.policy.load import load_policy, parse_policy
from proxy.policy.units import parse_byte_rate, parse_duration, parse_rate, parse_size

ROOT = Path(__file__).resolve().parents[2]
BROKEN = sorted((ROOT / "tests" / "policies" / "broken").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "policies").glob("*.yaml"))

ROUTE = "routes: [{path: /a, upstream: 'ws://x/', auth: none}]"


def expectation(path: Path) -> tuple[str, int]:
    text = path.read_text()
    expect = re.search(r"^# expect: (.+)$", text, re.MULTILINE)
    line = re.search(r"^# line: (\d+)$", text, re.MULTILINE)
    assert expect and line, f"{path} needs '# expect:' and '# line:' comments"
    return expect.group(1), int(line.group(1))


@pytest.mark.parametrize("path", BROKEN, ids=lambda path: path.stem)
def test_broken_policy_is_refused_with_file_line_and_key(path: Path) -> None:
    expected, line = expectation(path)
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert expected in message


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_examples_load(path: Path) -> None:
    policy = load_policy(path)
    assert policy.routes
    assert policy.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.source == path


def test_missing_file_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy("/nonexistent/policy.yaml")


def test_units() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size(100) == 100
    assert parse_size("1.5MiB") == 1572864
    assert parse_duration("100ms") == pytest.approx(0.1)
    assert parse_duration("5m") == 300
    assert parse_duration(0) == 0
    assert parse_rate("20/s") == 20
    assert parse_rate("600/m") == 10
    assert parse_byte_rate("1MiB/s") == 1048576


@pytest.mark.parametrize(
    ("parse", "value"),
    [
        (parse_size, "1MB"),
        (parse_size, -1),
        (parse_size, True),
        (parse_size, "1.3B"),
        (parse_duration, 30),
        (parse_duration, "-1s"),
        (parse_duration, "1d"),
        (parse_rate, "20"),
        (parse_rate, "0/s"),
        (parse_byte_rate, "1MiB"),
    ],
)
def test_bad_units(parse: object, value: object) -> None:
    with pytest.raises(ValueError):
        parse(value)  # type: ignore[operator]


def test_route_limits_override_policy_limits() -> None:
    policy = parse_policy(
        """
version: 1
limits: {idle_timeout: 5m, max_message_size: 1MiB}
routes:
  - path: /a
    upstream: ws://x/
    auth: none
    limits: {idle_timeout: 1m}
  - path: /b
    upstream: ws://x/
    auth: none
"""
    )
    first, second = policy.routes
    assert first.limits.idle_timeout == 60 and first.limits.max_message_bytes == 1024 * 1024
    assert second.limits.idle_timeout == 300


def test_routing_exact_then_longest_prefix() -> None:
    policy = parse_policy(
        """
version: 1
routes:
  - {path: /chat, match: prefix, upstream: 'ws://svc/ws', auth: none}
  - {path: /chat/admin, match: prefix, upstream: 'ws://admin/', auth: none}
  - {path: /chat/exact, upstream: 'ws://exact', auth: none}
"""
    )
    assert policy.match_route("/chat/room/1").upstream.endpoints[0].host == "svc"
    assert policy.match_route("/chat/admin/x").upstream.endpoints[0].host == "admin"
    assert policy.match_route("/chat/exact").upstream.endpoints[0].host == "exact"
    assert policy.match_route("/chatroom") is None
    route = policy.match_route("/chat/room/1")
    assert route is not None
    assert route.upstream_target("/chat/room/1", "x=1") == "/ws/room/1?x=1"
    assert route.upstream_target("/chat", "") == "/ws"
    exact = policy.match_route("/chat/exact")
    assert exact is not None and exact.upstream_target("/chat/exact", "q=2") == "/chat/exact?q=2"


def test_upstream_query_is_merged_before_the_clients() -> None:
    policy = parse_policy("version: 1\nroutes: [{path: /a, upstream: 'wss://h:8443/p?k=v', auth: none}]")
    route = policy.routes[0]
    assert (route.upstream.secure, route.upstream.endpoints[0].port, route.upstream.endpoints[0].path) == (
        True,
        8443,
        "/p",
    )
    assert route.upstream_target("/a", "x=1") == "/p?k=v&x=1"


def test_listen_addresses() -> None:
    policy = parse_policy(
        f"version: 1\nlisten: {{address: '[::1]:0'}}\nadmin: {{address: '127.0.0.1:9999'}}\n{ROUTE}"
    )
    assert (policy.listen.address.host, policy.listen.address.port) == ("::1", 0)
    assert str(policy.listen.address) == "[::1]:0"


def test_tls_files_must_exist_and_load(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(
        f"version: 1\nlisten:\n  address: 0.0.0.0:8443\n  tls: {{cert: c.pem, key: k.pem}}\n{ROUTE}\n"
    )
    with pytest.raises(PolicyError) as raised:
        load_policy(policy_file)
    assert str(raised.value).startswith(f"{policy_file}:4: listen.tls.cert: file not found")
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    with pytest.raises(PolicyError) as raised:  # present, but not a certificate and its key
        load_policy(policy_file)
    assert str(raised.value).startswith(f"{policy_file}:4: listen.tls.cert: cannot load the certificate")


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_public_key_must_fit_the_algorithms(tmp_path: Path) -> None:
    (tmp_path / "ec.pem").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    text = """version: 1
auth:
  main:
    algorithms: [RS256]
    public_key_file: ec.pem
routes: [{path: /a, upstream: 'ws://x/', auth: main}]
"""
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(text)
    with pytest.raises(PolicyError, match="a EC key cannot verify RS256"):
        load_policy(policy_file)
    policy_file.write_text(text.replace("RS256", "ES256"))
    provider = load_policy(policy_file).auth[0]
    assert provider.algorithms == ("ES256",) and provider.public_key is not None


def test_hmac_secret_comes_from_the_environment_and_is_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    text = """version: 1
auth:
  main: {algorithms: [HS256], secret_env: WSGATE_TEST_SECRET}
routes: [{path: /a, upstream: 'ws://x/', auth: main}]
"""
    monkeypatch.delenv("WSGATE_TEST_SECRET", raising=False)
    with pytest.raises(PolicyError, match="environment variable WSGATE_TEST_SECRET is not set"):
        parse_policy(text)
    monkeypatch.setenv("WSGATE_TEST_SECRET", "short")
    with pytest.raises(PolicyError, match="at least 32"):
        parse_policy(text)
    monkeypatch.setenv("WSGATE_TEST_SECRET", "s" * 32)
    provider = parse_policy(text).auth[0]
    assert provider.secret == b"s" * 32
    assert "s" * 32 not in repr(provider)


def test_guards_sections_parse() -> None:
    policy = parse_policy(
        """
version: 1
trusted_proxies: [10.0.0.0/8]
firewall:
  default: deny
  rules:
    - deny: 10.1.0.0/16
    - allow: [10.0.0.0/8, "2001:db8::/32"]
limits: {handshakes_per_ip: 600/m, handshake_burst: 20, messages_per_connection: 50/s,
         bytes_per_connection: 1MiB/s, connections_per_ip: 10}
revoked: {subjects: [mallory], token_ids: []}
routes:
  - path: /a
    upstream: ws://x/
    auth: none
    origins: ["https://*.example.com"]
    allow_missing_origin: false
    messages:
      client: {types: [text], json: true, on_violation: drop}
      upstream: {max_message_size: 4KiB}
"""
    )
    assert policy.firewall.default_allow is False and len(policy.firewall.rules) == 3
    assert policy.limits.handshakes_per_ip == 10
    assert policy.revoked.subjects == frozenset({"mallory"})
    route = policy.routes[0]
    assert route.client_rules is not None and route.client_rules.types == frozenset({1})
    assert route.client_rules.on_violation == "drop" and route.client_rules.json
    assert route.upstream_rules is not None and route.upstream_rules.max_message_bytes == 4096
    assert route.message_rate is not None and route.message_rate.messages_per_second == 50
    assert not route.allow_missing_origin


def test_max_connections_is_a_positive_policy_wide_limit() -> None:
    assert parse_policy(f"version: 1\n{ROUTE}").limits.max_connections == 10_000
    assert parse_policy(f"version: 1\nlimits: {{max_connections: 50}}\n{ROUTE}").limits.max_connections == 50
    for value in ("0", "-3", "1.5", "lots", "true"):
        with pytest.raises(PolicyError, match=r"limits\.max_connections: expected a whole number"):
            parse_policy(f"version: 1\nlimits: {{max_connections: {value}}}\n{ROUTE}")
    with pytest.raises(PolicyError, match=r"routes\[0\]\.limits\.max_connections: is policy-wide"):
        parse_policy(
            "version: 1\nroutes: [{path: /a, upstream: 'ws://x/', auth: none, limits: {max_connections: 5}}]"
        )


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("!!timestamp none", "'none' as !!timestamp"),
        ("!!bool maybe", "'maybe' as !!bool"),
        ("!!int 1.5", "'1.5' as !!int"),
        ("!!float", "'' as !!float"),
    ],
)
def test_a_tag_that_does_not_fit_its_value_is_refused_with_its_line(value: str, shown: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(f"version: 1\nroutes:\n  - path: /a\n    upstream: ws://x/\n    auth: {value}\n")
    assert str(raised.value).startswith("<policy>:5: invalid YAML value: cannot read")
    assert shown in str(raised.value)


@pytest.mark.parametrize("auth", ["[main, other]", "main", "1"])
def test_auth_must_be_a_mapping_of_providers(auth: str) -> None:
    with pytest.raises(PolicyError, match=r"^<policy>:2: auth: expected a mapping of provider names"):
        parse_policy(f"version: 1\nauth: {auth}\n{ROUTE}")


def test_listening_on_the_default_admin_address_is_refused_at_the_listen_line() -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(f"version: 1\nlisten: {{address: 127.0.0.1:9090}}\n{ROUTE}")
    assert str(raised.value) == (
        "<policy>:2: listen.address: must differ from admin.address (127.0.0.1:9090 by default)"
    )


def test_a_route_names_one_provider_a_list_of_them_or_none() -> None:
    policy = parse_policy(
        """
version: 1
auth:
  staff: {algorithms: [RS256], issuer: https://id.example.com, jwks_url: https://id.example.com/staff}
  contractors: {algorithms: [RS256], issuer: https://id.example.com, jwks_url: https://id.example.com/c}
  partners: {algorithms: [RS256], jwks_url: https://partners.example.com/jwks, revoked: {token_ids: [t1]}}
routes:
  - {path: /one, upstream: 'ws://x/', auth: staff}
  - {path: /many, upstream: 'ws://x/', auth: [partners, staff, contractors]}
  - {path: /open, upstream: 'ws://x/', auth: none}
"""
    )
    assert [route.auth for route in policy.routes] == [("staff",), ("partners", "staff", "contractors"), ()]
    assert [provider.name for provider in policy.route_providers(policy.routes[1])] == [
        "partners",
        "staff",
        "contractors",
    ]
    # a provider's own revocation list, and none by default
    assert policy.provider("partners").revoked.token_ids == frozenset({"t1"})
    assert policy.provider("staff").revoked.token_ids == frozenset()
