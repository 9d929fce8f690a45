"""Route hosts (matching order, normalization), listener certificates and client certificate keys at load,
subject patterns, and which certificate an SNI name picks."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.errors import PolicyError
from proxy.policy.load import parse_policy
from proxy.policy.values import SubjectPattern, request_host, routing_host
from proxy.tls_listener import certificate_for

ROUTES = """\
version: 1
routes:
  - {path: /ws, host: chat.example.com, upstream: "ws://exact/", auth: none}
  - {path: /ws, host: "*.example.com", upstream: "ws://wildcard/", auth: none}
  - {path: /ws, match: prefix, upstream: "ws://any/", auth: none}
  - {path: /ws/deep, match: prefix, host: "*.example.com", upstream: "ws://wildcard-deep/", auth: none}
"""


@pytest.mark.parametrize(
    ("host", "path", "upstream"),
    [
        ("chat.example.com", "/ws", "exact"),
        ("room.example.com", "/ws", "wildcard"),
        ("room.example.com", "/ws/deep/x", "wildcard-deep"),
        ("chat.example.com", "/ws/deep/x", "wildcard-deep"),  # the exact host serves no such path
        ("chat.example.com", "/ws/other", "any"),  # nor the wildcard: the routes without a host
        ("example.com", "/ws", "any"),
        ("a.b.example.com", "/ws", "any"),
        (None, "/ws", "any"),
    ],
)
def test_hosts_win_exact_before_wildcard_then_paths(host: str | None, path: str, upstream: str) -> None:
    route = parse_policy(ROUTES).match_route(path, host)
    assert route is not None and route.upstream.endpoints[0].host == upstream


def test_without_a_route_for_any_host_an_unknown_host_matches_nothing() -> None:
    policy = parse_policy(
        ROUTES.replace('  - {path: /ws, match: prefix, upstream: "ws://any/", auth: none}\n', "")
    )
    assert policy.match_route("/ws", "other.test") is None
    assert policy.match_route("/ws", None) is None
    assert policy.match_route("/ws", "example.com") is None


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("Chat.Example.COM", "chat.example.com"),
        ("chat.example.com:8443", "chat.example.com"),
        ("chat.example.com.", "chat.example.com"),
        ("chat.example.com.:80", "chat.example.com"),
        ("[::1]:8080", "::1"),
        ("[0:0::1]", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("", None),
        (None, None),
    ],
)
def test_the_host_header_as_routes_see_it(header: str | None, host: str | None) -> None:
    assert request_host(header) == host


@pytest.mark.parametrize(
    "header",
    [
        "[a.example.com]",
        "[a.example.com]:443",
        "[1.2.3.4]",
        "a.example.com:xx",
        "a.example.com:44x",
        "x:y:z",
        "a b.example.com",
        "\xe0.example.com",
        "a.example.com/x",
        "a@b.example.com",
        "[::1]x",
    ],
)
def test_a_host_header_no_host_can_have_is_refused(header: str) -> None:
    """RFC 9112 section 3.2: a Host that is not ``uri-host [":" port]`` is a 400, never a route."""
    with pytest.raises(ValueError, match="invalid Host"):
        request_host(header)


def test_an_absolute_form_target_routes_by_its_own_authority() -> None:
    """RFC 9112 section 3.2.2: the target's authority wins over the Host header."""
    assert routing_host("http://A.example.com:80/ws", "other.example.com") == "a.example.com"
    assert routing_host("/ws", "b.example.com") == "b.example.com"
    with pytest.raises(ValueError):
        routing_host("http://a.exa mple.com/ws", "b.example.com")


def test_route_hosts_are_normalized_like_the_header() -> None:
    policy = parse_policy(
        'version: 1\nroutes: [{path: /a, host: "[0::1]", upstream: "ws://x/", auth: none},'
        ' {path: /a, host: "Chat.Example.com.", upstream: "ws://y/", auth: none}]'
    )
    assert [route.host for route in policy.routes] == ["::1", "chat.example.com"]
    assert policy.match_route("/a", request_host("[::1]:9000")) is policy.routes[0]


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("*.*.example.com", "a wildcard is the whole first label"),
        ("*example.com", "a wildcard is the whole first label"),
        ("*", "a wildcard is the whole first label"),
        ("::1", "put an IPv6 address in brackets"),
        ("[nope]", "not an IPv6 address"),
        ("chat example.com", "not a host name"),
        ("-bad.example.com", "not a host name"),
    ],
)
def test_bad_hosts_are_refused_with_their_line(host: str, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(
            f'version: 1\nroutes:\n  - path: /a\n    host: "{host}"\n    upstream: ws://x/\n    auth: none\n'
        )
    assert str(raised.value).startswith("<policy>:4: routes[0].host: ")
    assert message in str(raised.value)


# -- listener certificates and client certificate keys -----------------------------------------------


def _certificate(directory: Path, name: str, dns_names: tuple[str, ...]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns) for dns in dns_names]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    one_cert, one_key = _certificate(tmp_path, "one", ("one.example.com",))
    two_cert, two_key = _certificate(tmp_path, "two", ("Two.example.com", "*.rooms.example.com"))
    return {"one_cert": one_cert, "one_key": one_key, "two_cert": two_cert, "two_key": two_key}


def _tls(tls: str, routes: str = "[{path: /a, upstream: 'ws://x/', auth: none}]") -> str:
    return f"version: 1\nlisten:\n  address: 127.0.0.1:0\n  tls:\n{tls}routes: {routes}\n"


def test_certificates_by_sni_carry_their_names(files: dict[str, Path]) -> None:
    policy = parse_policy(
        _tls(
            f"    certificates:\n"
            f"      - {{cert: {files['one_cert']}, key: {files['one_key']}}}\n"
            f"      - {{cert: {files['two_cert']}, key: {files['two_key']}}}\n"
        )
    )
    assert policy.listen.tls is not None
    pairs = policy.listen.tls.pairs
    assert [pair.names for pair in pairs] == [
        ("one.example.com",),
        ("two.example.com", "*.rooms.example.com"),
    ]
    names = tuple(pair.names for pair in pairs)
    assert certificate_for("two.example.com", names) == 1
    assert certificate_for("a.rooms.example.com", names) == 1
    assert certificate_for("a.b.rooms.example.com", names) == 0
    assert certificate_for("one.example.com", names) == 0
    assert certificate_for(None, pairs) == 0
    single = parse_policy(_tls(f"    cert: {files['one_cert']}\n    key: {files['one_key']}\n"))
    assert single.listen.tls is not None and single.listen.tls.pairs[0].names == ("one.example.com",)


@pytest.mark.parametrize(
    ("tls", "where", "message"),
    [
        (
            "    cert: {one_cert}\n    key: {one_key}\n"
            "    certificates: [{{cert: {two_cert}, key: {two_key}}}]\n",
            ":7: listen.tls.certificates: ",
            "set either cert and key, or certificates, not both",
        ),
        (
            "    cert: {one_cert}\n    key: {two_key}\n",
            ":5: listen.tls.cert: ",
            "cannot load the certificate and key",
        ),
        (
            "    certificates:\n      - {{cert: {two_cert}, key: {one_key}}}\n",
            ":6: listen.tls.certificates[0].cert: ",
            "cannot load the certificate and key",
        ),
        ("    cert: {one_cert}\n", ":5: listen.tls.cert: ", "needs 'key' too"),
        ("    min_version: '1.3'\n", ":5: listen.tls: ", "missing 'cert' and 'key' (or 'certificates')"),
        (
            "    cert: {one_cert}\n    key: {one_key}\n    client_auth: required\n",
            ":7: listen.tls.client_auth: ",
            "required needs client_ca",
        ),
        (
            "    cert: {one_cert}\n    key: {one_key}\n    client_ca: {one_cert}\n",
            ":7: listen.tls.client_ca: ",
            "does nothing without client_auth: optional or required",
        ),
    ],
)
def test_listener_tls_errors(files: dict[str, Path], tls: str, where: str, message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(_tls(tls.format(**files)))
    assert where in str(raised.value) and message in str(raised.value), str(raised.value)


def test_a_route_requiring_a_certificate_needs_a_listener_asking_for_one(files: dict[str, Path]) -> None:
    asks = f"    cert: {files['one_cert']}\n    key: {files['one_key']}\n    client_ca: {files['two_cert']}\n"
    route = "[{path: /a, upstream: 'ws://x/', auth: none, client_subjects: ['CN=alice']}]"
    policy = parse_policy(_tls(asks + "    client_auth: optional\n", route))
    assert policy.routes[0].requires_certificate
    with pytest.raises(PolicyError, match=r"routes\[0\].client_subjects: needs listen.tls.client_ca"):
        parse_policy(_tls(f"    cert: {files['one_cert']}\n    key: {files['one_key']}\n", route))


# -- subject patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "common_names", "matches"),
    [
        ("CN=alice,O=Example", "CN=alice,O=Example", ("alice",), True),
        ("CN=alice,O=Example", "CN=alice,O=Other", ("alice",), False),
        ("CN=alice,O=Example", "CN=alice,OU=x,O=Example", ("alice",), False),
        ("CN=alice", "CN=alice,O=Anyone", ("alice",), True),
        ("CN=*.svc.example.com", "CN=a.svc.example.com,O=E", ("a.svc.example.com",), True),
        ("CN=*.svc.example.com", "CN=svc.example.com", ("svc.example.com",), False),
        ("CN=*.svc.example.com", "CN=a.svc.example.com.evil", ("a.svc.example.com.evil",), False),
        ("CN=a?c", "CN=abc", ("abc",), False),  # only * is a wildcard
        ("CN=*", "O=NoName", (), False),
        # * is one label, as in a host wildcard: not several, not none
        ("CN=*.svc.example.com", "CN=a.b.svc.example.com", ("a.b.svc.example.com",), False),
        ("CN=*.svc.example.com", "CN=.svc.example.com", (".svc.example.com",), False),
        ("CN=device-*", "CN=device-42", ("device-42",), True),
        # two CNs: which one names the client is a guess, so no CN glob fits
        ("CN=alice", "CN=mallory+CN=alice", ("mallory", "alice"), False),
    ],
)
def test_subject_patterns(pattern: str, subject: str, common_names: tuple[str, ...], matches: bool) -> None:
    assert SubjectPattern.parse(pattern).matches(subject, common_names) is matches
