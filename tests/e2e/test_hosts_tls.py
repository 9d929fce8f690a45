"""Hosts, SNI certificates and client certificates (mTLS), over real sockets and real TLS.

Routes chosen by the Host header (exact before wildcard before none); the listener's certificate chosen by
the ClientHello's SNI; client certificates verified against ``client_ca`` (``required`` fails the TLS
handshake without one, a route's ``client_certificate: required`` answers 403 ``client_certificate``), a
subject allow list, the verified certificate forwarded upstream (a client's own copies always stripped),
a reload that makes a route require a certificate, and ``wsgate explain`` judging a certificate file."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from conftest import Upstream, policy_text
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

from proxy.policy.load import parse_policy

WSGATE = str(Path(sys.executable).with_name("wsgate"))


@dataclass
class Issued:
    cert: Path
    key: Path
    der: bytes


class Authority:
    """A test CA that issues server and client certificates into a directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        file_name: str,
        subject: list[tuple[x509.ObjectIdentifier, str]],
        dns_names: tuple[str, ...] = (),
        client: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(oid, value) for oid, value in subject]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if client:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        else:
            names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.directory / f"{file_name}.crt", self.directory / f"{file_name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return Issued(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def _cn(name: str, organization: str | None = None) -> list[tuple[x509.ObjectIdentifier, str]]:
    subject = [(NameOID.COMMON_NAME, name)]
    if organization is not None:
        subject.insert(0, (NameOID.ORGANIZATION_NAME, organization))
    return subject


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    ca = Authority(tmp_path, "test-ca")
    rogue = Authority(tmp_path, "rogue-ca")
    return {
        "ca": ca,
        "server": ca.issue("server", _cn("localhost"), ("localhost",)),
        "chat": ca.issue("chat", _cn("chat.example.com"), ("chat.example.com",)),
        "rooms": ca.issue("rooms", _cn("rooms"), ("*.rooms.example.com",)),
        "alice": ca.issue("alice", _cn("alice", "Example"), client=True),
        "bob": ca.issue("bob", _cn("bob.svc.example.com", "Example"), client=True),
        "mallory": rogue.issue("mallory", _cn("alice", "Example"), client=True),
    }


def client_context(pki: dict[str, object], who: str | None = None) -> ssl.SSLContext:
    ca = pki["ca"]
    assert isinstance(ca, Authority)
    context = ssl.create_default_context(cafile=str(ca.path))
    if who is not None:
        issued = pki[who]
        assert isinstance(issued, Issued)
        context.load_cert_chain(issued.cert, issued.key)
    return context


def tls_listen(pki: dict[str, object], client_auth: str | None = None, indent: int = 4) -> str:
    server = pki["server"]
    ca = pki["ca"]
    assert isinstance(server, Issued) and isinstance(ca, Authority)
    mtls = f", client_ca: {ca.path}, client_auth: {client_auth}" if client_auth else ""
    listen = f'listen: {{address: "127.0.0.1:0", tls: {{cert: {server.cert}, key: {server.key}{mtls}}}}}\n'
    return " " * indent + listen


async def scrape(gw) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    address = gw.gateway.admin_address
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{address.port}/metrics") as response,
    ):
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def tls_refused(port: int, context: ssl.SSLContext, server_name: str | None = None) -> bool:
    """Whether the gateway ends the TLS connection before answering an upgrade request (with TLS 1.3 a
    client may finish its side of the handshake before the server has judged its certificate)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_name
        )
    except (ssl.SSLError, ConnectionError):
        return True
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n")
        return await asyncio.wait_for(reader.read(100), 10) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        writer.close()


async def headers_seen(ws: aiohttp.ClientWebSocketResponse) -> dict[str, str]:
    seen = json.loads((await ws.receive(timeout=10)).data)
    return {name.lower(): value for name, value in seen["headers"].items()}


# -- hosts ------------------------------------------------------------------------------------------


async def test_hosts_on_one_listener_reach_their_upstreams(gateway, upstream, client, log_events):
    other = await Upstream().start()
    try:
        gw = await gateway(
            f"""
        routes:
          - path: /ws
            host: chat.example.com
            upstream: {upstream.url("/headers/exact")}
            auth: none
          - path: /ws
            host: "*.example.com"
            upstream: {other.url("/headers/wildcard")}
            auth: none
          - path: /ws
            host: "[::1]"
            upstream: {upstream.url("/headers/ipv6")}
            auth: none
          - path: /open
            upstream: {other.url("/headers/any")}
            auth: none
        """
        )

        async def reaches(host: str, path: str = "/ws") -> str:
            async with client.ws_connect(gw.url(path), headers={"Host": host}) as ws:
                seen = json.loads((await ws.receive(timeout=10)).data)
                return seen["path"]

        assert await reaches("chat.example.com") == "/headers/exact"
        assert await reaches("CHAT.Example.COM:8080") == "/headers/exact"  # case, port
        assert await reaches("chat.example.com.") == "/headers/exact"  # trailing dot
        assert await reaches("room.example.com") == "/headers/wildcard"
        assert await reaches("Room.example.com:443") == "/headers/wildcard"
        assert await reaches("[::1]:8080") == "/headers/ipv6"
        assert await reaches("anything.test", "/open") == "/headers/any"
        assert await reaches("chat.example.com", "/open") == "/headers/any"  # falls through to no host
        for host in ("example.com", "a.b.example.com", "other.test", "127.0.0.1"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(gw.url("/ws"), headers={"Host": host})
            assert refused.value.status == 404, host
        samples = await scrape(gw)
        assert metric(samples, "wsgate_handshake_rejections_total", route="", reason="no_route") == 4
        await log_events.wait_for("session.open", host="room.example.com", route="/ws")
        await log_events.wait_for("handshake.rejected", host="a.b.example.com", reason="no_route")
    finally:
        await other.stop()


# -- SNI --------------------------------------------------------------------------------------------


async def test_sni_picks_the_certificate_that_names_the_host(gateway, upstream, pki):
    server, chat, rooms = pki["server"], pki["chat"], pki["rooms"]
    assert isinstance(server, Issued) and isinstance(chat, Issued) and isinstance(rooms, Issued)
    gw = await gateway(
        f"""
    listen:
      address: "127.0.0.1:0"
      tls:
        certificates:
          - {{cert: {server.cert}, key: {server.key}}}
          - {{cert: {chat.cert}, key: {chat.key}}}
          - {{cert: {rooms.cert}, key: {rooms.key}}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )

    async def served(server_name: str | None) -> bytes:
        context = client_context(pki)
        if server_name is None:
            context.check_hostname = False
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=context, server_hostname=server_name or ""
        )
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            writer.close()
        return der

    assert await served("chat.example.com") == chat.der
    assert await served("CHAT.example.com") == chat.der
    assert await served("a.rooms.example.com") == rooms.der
    assert await served("localhost") == server.der
    assert await served(None) == server.der  # no SNI: the first
    with pytest.raises(ssl.SSLCertVerificationError):  # a name no certificate holds: the first, which fails
        await served("nothing.example.com")
    # and a WebSocket over the chosen certificate works end to end
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"wss://127.0.0.1:{gw.port}/echo", ssl=client_context(pki), server_hostname="chat.example.com"
        ) as ws,
    ):
        await ws.send_str("over sni")
        assert (await ws.receive(timeout=10)).data == "over sni"


# -- client certificates ----------------------------------------------------------------------------


async def test_a_certificate_chosen_by_sni_still_requires_a_client_certificate(gateway, upstream, pki):
    server, chat = pki["server"], pki["chat"]
    ca = pki["ca"]
    assert isinstance(server, Issued) and isinstance(chat, Issued) and isinstance(ca, Authority)
    gw = await gateway(
        f"""
    listen:
      address: "127.0.0.1:0"
      tls:
        certificates: [{{cert: {server.cert}, key: {server.key}}}, {{cert: {chat.cert}, key: {chat.key}}}]
        client_ca: {ca.path}
        client_auth: required
    routes:
      - path: /ws
        upstream: {upstream.url("/headers")}
        auth: none
        forward_client_certificate: {{subject: X-Client-Subject}}
    """
    )
    url = f"wss://127.0.0.1:{gw.port}/ws"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, ssl=client_context(pki, "alice"), server_hostname="chat.example.com") as ws,
    ):
        assert (await headers_seen(ws))["x-client-subject"] == "CN=alice,O=Example"
    for who in (None, "mallory"):
        assert await tls_refused(gw.port, client_context(pki, who), "chat.example.com")
    samples = await scrape(gw)
    assert metric(samples, "wsgate_tls_handshake_failures_total", reason="client_certificate") == 2


async def test_required_client_certificates_admit_the_ca_s_and_forward_them(
    gateway, upstream, pki, log_events
):
    alice = pki["alice"]
    assert isinstance(alice, Issued)
    gw = await gateway(
        tls_listen(pki, "required")
        + f"""
    routes:
      - path: /ws
        upstream: {upstream.url("/headers")}
        auth: none
        forward_client_certificate: {{subject: X-Client-Subject, sha256: X-Client-Cert-Sha256}}
    """
    )
    url = f"wss://127.0.0.1:{gw.port}/ws"
    spoofed = {"X-Client-Subject": "CN=admin", "x-client-cert-sha256": "00" * 32}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, ssl=client_context(pki, "alice"), headers=spoofed) as ws:
            forwarded = await headers_seen(ws)
        assert forwarded["x-client-subject"] == "CN=alice,O=Example"
        assert forwarded["x-client-cert-sha256"] == hashlib.sha256(alice.der).hexdigest()
        assert "CN=admin" not in json.dumps(forwarded)
        assert upstream.records[-1].headers.get("X-Client-Cert-Sha256") != "00" * 32
        opened = await log_events.wait_for("session.open", client_subject="CN=alice,O=Example")
        assert opened["route"] == "/ws"
        for who in ("mallory", None):  # another CA's certificate, and none: no TLS handshake
            assert await tls_refused(gw.port, client_context(pki, who))
    await log_events.wait_for("session.close", client_subject="CN=alice,O=Example")
    samples = await scrape(gw)
    assert metric(samples, "wsgate_tls_handshake_failures_total", reason="client_certificate") == 2
    assert len(upstream.records) == 1


async def test_optional_client_certificates_and_a_route_that_requires_one(gateway, upstream, pki, log_events):
    gw = await gateway(
        tls_listen(pki, "optional")
        + f"""
    routes:
      - path: /secure
        upstream: {upstream.url("/headers")}
        auth: none
        client_certificate: required
      - path: /open
        upstream: {upstream.url("/headers")}
        auth: none
        forward_client_certificate: {{subject: X-Client-Subject, sha256: X-Client-Cert-Sha256}}
    """
    )
    base = f"wss://127.0.0.1:{gw.port}"
    spoofed = {"X-Client-Subject": "CN=admin", "X-Client-Cert-Sha256": "00" * 32}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{base}/secure", ssl=client_context(pki))
        assert refused.value.status == 403
        rejected = await log_events.wait_for("handshake.rejected", reason="client_certificate")
        assert rejected["client_subject"] is None
        async with session.ws_connect(
            f"{base}/secure", ssl=client_context(pki, "alice"), headers=spoofed
        ) as ws:
            # not set on this route, and a client's own copies dropped all the same: another route of the
            # policy sets them, and both routes share one upstream
            seen = await headers_seen(ws)
            assert "x-client-subject" not in seen and "x-client-cert-sha256" not in seen
        # without a certificate the open route admits, and a client's own copies never pass
        async with session.ws_connect(f"{base}/open", ssl=client_context(pki), headers=spoofed) as ws:
            forwarded = await headers_seen(ws)
        assert "x-client-subject" not in forwarded and "x-client-cert-sha256" not in forwarded
        # a certificate that does not verify: no TLS handshake
        assert await tls_refused(gw.port, client_context(pki, "mallory"))
    samples = await scrape(gw)
    assert (
        metric(samples, "wsgate_handshake_rejections_total", route="/secure", reason="client_certificate")
        == 1
    )
    assert metric(samples, "wsgate_tls_handshake_failures_total", reason="client_certificate") == 1


async def test_a_subject_allow_list(gateway, upstream, pki, log_events):
    gw = await gateway(
        tls_listen(pki, "required")
        + f"""
    routes:
      - path: /alice
        upstream: {upstream.url()}
        auth: none
        client_subjects: ["CN=alice,O=Example"]
      - path: /services
        upstream: {upstream.url()}
        auth: none
        client_subjects: ["CN=*.svc.example.com"]
    """
    )
    base = f"wss://127.0.0.1:{gw.port}"
    async with aiohttp.ClientSession() as session:
        for path, who in (("/alice", "alice"), ("/services", "bob")):
            async with session.ws_connect(f"{base}{path}", ssl=client_context(pki, who)) as ws:
                await ws.send_str("allowed")
                assert (await ws.receive(timeout=10)).data == "allowed"
        for path, who in (("/alice", "bob"), ("/services", "alice")):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{base}{path}", ssl=client_context(pki, who))
            assert refused.value.status == 403
    refusal = await log_events.wait_for("handshake.rejected", reason="client_certificate", route="/alice")
    assert refusal["client_subject"] == "CN=bob.svc.example.com,O=Example"


async def test_a_reload_that_requires_a_certificate_closes_sessions_without_one(gateway, upstream, pki):
    listen = tls_listen(pki, "optional")
    gw = await gateway(
        listen
        + f"""
    routes:
      - path: /ws
        upstream: {upstream.url()}
        auth: none
    """
    )
    url = f"wss://127.0.0.1:{gw.port}/ws"
    async with aiohttp.ClientSession() as session:
        bare = await session.ws_connect(url, ssl=client_context(pki))
        alice = await session.ws_connect(url, ssl=client_context(pki, "alice"))
        bob = await session.ws_connect(url, ssl=client_context(pki, "bob"))
        for ws in (bare, alice, bob):
            await ws.send_str("before")
            assert (await ws.receive(timeout=10)).data == "before"
        closed = gw.gateway.apply_policy(
            parse_policy(
                policy_text(
                    tls_listen(pki, "optional", indent=8)
                    + f"""
        routes:
          - path: /ws
            upstream: {upstream.url()}
            auth: none
            client_subjects: ["CN=alice"]
        """
                )
            )
        )
        assert closed == 2
        for ws in (bare, bob):
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert (message.data, message.extra) == (1008, "policy changed")
            await ws.close()
        await alice.send_str("after")
        assert (await alice.receive(timeout=10)).data == "after"
        await alice.close()


# -- explain ----------------------------------------------------------------------------------------


def test_explain_takes_the_host_and_a_client_certificate(tmp_path, pki):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        policy_text(
            tls_listen(pki, "optional")
            + """
    routes:
      - path: /ws
        host: "*.example.com"
        upstream: ws://chat.internal:8000/
        auth: none
        client_subjects: ["CN=alice,O=Example"]
      - path: /ws
        upstream: ws://any.internal:8000/
        auth: none
    """
        )
    )
    alice, bob = pki["alice"], pki["bob"]
    assert isinstance(alice, Issued) and isinstance(bob, Issued)

    def explain(*args: str) -> subprocess.CompletedProcess[str]:
        command = [WSGATE, "explain", "-c", str(policy), "--ip", "198.51.100.7", *args, "/ws"]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    admitted = explain("--host", "chat.example.com:443", "--client-cert", str(alice.cert))
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    assert "request   GET /ws (Host chat.example.com:443) from 198.51.100.7" in admitted.stdout
    assert "cert      CN=alice,O=Example" in admitted.stdout
    assert "route     *.example.com/ws (exact) -> ws://chat.internal:8000/" in admitted.stdout
    assert "client certificate       pass: CN=alice,O=Example (an allowed subject)" in admitted.stdout

    refused = explain("--host", "chat.example.com", "--client-cert", str(bob.cert))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "answer    403 client_certificate" in refused.stdout
    missing = explain("--host", "chat.example.com")
    assert missing.returncode == 2
    assert (
        "answer    403 client_certificate: this route requires a verified client certificate"
        in missing.stdout
    )

    anyhost = explain()  # no host: only the route without one
    assert anyhost.returncode == 0
    assert "route     /ws (exact) -> ws://any.internal:8000/" in anyhost.stdout
    assert "client certificate       pass: no certificate required on this route" in anyhost.stdout

    broken = explain("--client-cert", str(policy))
    assert broken.returncode == 1
    assert "--client-cert: not a PEM certificate" in broken.stderr


async def test_a_client_ca_rotated_in_place_applies_to_new_handshakes(gateway, upstream, pki, tmp_path):
    ca, server, mallory = pki["ca"], pki["server"], pki["mallory"]
    assert isinstance(ca, Authority) and isinstance(server, Issued) and isinstance(mallory, Issued)
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(ca.path.read_bytes())
    gw = await gateway(
        f"""
    listen:
      address: "127.0.0.1:0"
      tls: {{cert: {server.cert}, key: {server.key}, client_ca: {client_ca}, client_auth: required}}
    routes:
      - path: /ws
        upstream: {upstream.url()}
        auth: none
    """
    )
    url = f"wss://127.0.0.1:{gw.port}/ws"
    async with aiohttp.ClientSession() as session:
        live = await session.ws_connect(url, ssl=client_context(pki, "alice"))
        assert await tls_refused(gw.port, client_context(pki, "mallory"))
        # the rogue CA replaces the test CA: its clients are in, the test CA's are out, live sessions stay
        client_ca.write_bytes((tmp_path / "rogue-ca.pem").read_bytes())
        gw.gateway.reload_files()
        assert await tls_refused(gw.port, client_context(pki, "alice"))
        async with session.ws_connect(url, ssl=client_context(pki, "mallory")) as ws:
            await ws.send_str("rotated")
            assert (await ws.receive(timeout=10)).data == "rotated"
        await live.send_str("still here")
        assert (await live.receive(timeout=10)).data == "still here"
        await live.close()


async def _raw_status(gw, target: str, host_lines: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        f"GET {target} HTTP/1.1\r\n{host_lines}Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode("latin-1")
    )
    status = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return status


async def test_a_host_no_host_can_have_is_400_and_an_absolute_target_routes_by_its_authority(
    gateway, upstream, log_events
):
    """A Host the gateway cannot read (a bracketed name, a port of letters, bytes no name holds) is a
    400, never a route; an absolute-form target is routed by its own authority (RFC 9112 3.2.2)."""
    gw = await gateway(
        f"""
        routes:
          - path: /ws
            host: a.example.com
            upstream: {upstream.url("/echo")}
            auth: none
        """
    )
    for host in ("[a.example.com]", "a.example.com:xx", "\xe0.example.com", "a.example.com/ws"):
        status = await _raw_status(gw, "/ws", f"Host: {host}\r\n")
        assert status.startswith(b"HTTP/1.1 400"), (host, status)
    assert (await _raw_status(gw, "/ws", "Host: a.example.com:8080\r\n")).startswith(b"HTTP/1.1 101")
    absolute = await _raw_status(gw, "http://a.example.com/ws", "Host: other.example.com\r\n")
    assert absolute.startswith(b"HTTP/1.1 101"), absolute
    elsewhere = await _raw_status(gw, "http://other.example.com/ws", "Host: a.example.com\r\n")
    assert elsewhere.startswith(b"HTTP/1.1 404"), elsewhere
    await log_events.wait_for("handshake.rejected", reason="bad_request")


async def test_a_certificate_renewed_in_place_with_other_names_is_a_reload_not_a_restart(
    gateway, upstream, pki, tmp_path
):
    """cert-manager renews a certificate under the same path, and its SAN list changes (a name added, or
    the same names in another order): the reload applies, and SNI picks the renewed certificate by the
    names it holds now."""
    from proxy.reload import restart_needed

    server, chat, rooms = pki["server"], pki["chat"], pki["rooms"]
    assert isinstance(server, Issued) and isinstance(chat, Issued) and isinstance(rooms, Issued)
    cert, key = tmp_path / "second.pem", tmp_path / "second.key"
    cert.write_bytes(chat.cert.read_bytes())
    key.write_bytes(chat.key.read_bytes())
    text = f"""
    listen:
      address: "127.0.0.1:0"
      tls:
        certificates:
          - {{cert: {server.cert}, key: {server.key}}}
          - {{cert: {cert}, key: {key}}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    gw = await gateway(text)
    before = parse_policy(policy_text(text))

    async def served(server_name: str) -> bytes:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=client_context(pki), server_hostname=server_name
        )
        try:
            return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            writer.close()

    assert await served("chat.example.com") == chat.der
    cert.write_bytes(rooms.cert.read_bytes())
    key.write_bytes(rooms.key.read_bytes())
    assert restart_needed(before, parse_policy(policy_text(text))) is None
    gw.gateway.reload_files()
    assert await served("a.rooms.example.com") == rooms.der
