"""TLS: wss:// on the client listener (with a minimum version), and wss:// upstreams verified against a
``ca_file`` (an untrusted upstream certificate is a 502, never a silent downgrade)."""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import json
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType
from conftest import Upstream
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from wsraw import RawClient

from proxy.listener import HandshakeProtocol


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_leaf(
    directory: Path, name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path):
    ca_path, ca_key, ca_cert = make_ca(tmp_path, "test-ca")
    cert, key = make_leaf(tmp_path, "server", ca_key, ca_cert)
    _, rogue_key, rogue_cert = make_ca(tmp_path, "rogue-ca")
    rogue_cert_path, rogue_key_path = make_leaf(tmp_path, "rogue", rogue_key, rogue_cert)
    return {
        "ca": ca_path,
        "cert": cert,
        "key": key,
        "rogue_cert": rogue_cert_path,
        "rogue_key": rogue_key_path,
    }


def client_context(ca: Path, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if maximum is not None:
        context.maximum_version = maximum
    return context


async def test_wss_listener_relays_and_tells_upstream_the_proto(gateway, upstream, pki):
    gw = await gateway(
        f"""
    listen: {{address: "127.0.0.1:0", tls: {{cert: {pki["cert"]}, key: {pki["key"]}, min_version: "1.3"}}}}
    routes:
      - path: /echo
        upstream: {upstream.url("/headers")}
        auth: none
    """
    )
    context = client_context(pki["ca"])
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"wss://127.0.0.1:{gw.port}/echo", ssl=context) as ws:
            seen = json.loads((await ws.receive(timeout=5)).data)
            forwarded = {name.lower(): value for name, value in seen["headers"].items()}
            assert forwarded["x-forwarded-proto"] == "https"
            await ws.send_str("over tls")
            assert (await ws.receive(timeout=5)).data == "over tls"
        with pytest.raises(aiohttp.ClientConnectorError):  # below the minimum version: no handshake
            await session.ws_connect(
                f"wss://127.0.0.1:{gw.port}/echo", ssl=client_context(pki["ca"], ssl.TLSVersion.TLSv1_2)
            )


async def test_plain_http_to_a_tls_listener_is_refused(gateway, upstream, pki):
    gw = await gateway(
        f"""
    listen: {{address: "127.0.0.1:0", tls: {{cert: {pki["cert"]}, key: {pki["key"]}}}}}
    routes:
      - path: /echo
        upstream: {upstream.url()}
        auth: none
    """
    )
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            await session.ws_connect(f"ws://127.0.0.1:{gw.port}/echo")
        # and the listener still serves TLS afterwards
        async with session.ws_connect(f"wss://127.0.0.1:{gw.port}/echo", ssl=client_context(pki["ca"])) as ws:
            await ws.send_str("ok")
            assert (await ws.receive(timeout=5)).data == "ok"


async def _tls_upstream(cert: Path, key: Path) -> Upstream:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return await Upstream().start(ssl_context=context)


@pytest.fixture
async def tls_upstream(pki):
    server = await _tls_upstream(pki["cert"], pki["key"])
    yield server
    await server.stop()


@pytest.fixture
async def rogue_upstream(pki):
    """A wss:// upstream whose certificate chains to a CA the gateway was not told to trust."""
    server = await _tls_upstream(pki["rogue_cert"], pki["rogue_key"])
    yield server
    await server.stop()


async def test_wss_upstream_verified_with_ca_file(gateway, tls_upstream, rogue_upstream, pki, client):
    gw = await gateway(
        f"""
    routes:
      - path: /good
        upstream: wss://127.0.0.1:{tls_upstream.port}/echo
        upstream_tls: {{ca_file: {pki["ca"]}}}
        auth: none
      - path: /rogue
        upstream: wss://127.0.0.1:{rogue_upstream.port}/echo
        upstream_tls: {{ca_file: {pki["ca"]}}}
        auth: none
      - path: /system-ca
        upstream: wss://127.0.0.1:{tls_upstream.port}/echo
        auth: none
      - path: /skip
        upstream: wss://127.0.0.1:{rogue_upstream.port}/echo
        upstream_tls: {{insecure_skip_verify: true}}
        auth: none
    """
    )
    async with client.ws_connect(gw.url("/good")) as ws:
        await ws.send_str("verified")
        assert (await ws.receive(timeout=5)).data == "verified"
    for path in ("/rogue", "/system-ca"):
        async with client.get(gw.http(path), headers=_upgrade_headers()) as response:
            assert response.status == 502
            body = await response.json()
            assert body["error"] == "upstream_unavailable"
            assert "certificate" in body["detail"].lower()
    assert rogue_upstream.records == []
    async with client.ws_connect(gw.url("/skip")) as ws:  # the explicit test-only escape hatch
        await ws.send_str("unverified")
        message = await ws.receive(timeout=5)
        assert (message.type, message.data) == (WSMsgType.TEXT, "unverified")


def _upgrade_headers() -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }


async def _served_serial(port: int, ca: Path) -> str:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(ca))
    serial = writer.get_extra_info("ssl_object").getpeercert()["serialNumber"]
    writer.close()
    return serial


async def test_certificate_rotated_in_place_is_served_without_a_restart(upstream, wsgate_process, tmp_path):
    ca_path, ca_key, ca_cert = make_ca(tmp_path, "rotation-ca")
    cert, key = make_leaf(tmp_path, "server", ca_key, ca_cert)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        'version: 1\nlisten: {address: "127.0.0.1:0", tls: {cert: server.crt, key: server.key}}\n'
        'admin: {address: "127.0.0.1:0"}\n'
        f"routes:\n  - path: /echo\n    upstream: {upstream.url()}\n    auth: none\n"
    )
    process = wsgate_process("serve", "-c", str(policy), "--log-format", "json")
    port = await process.listening_port()
    first = await _served_serial(port, ca_path)
    async with aiohttp.ClientSession() as session:
        live = await session.ws_connect(f"wss://127.0.0.1:{port}/echo", ssl=client_context(ca_path))
        rotated = tmp_path / "rotated"
        rotated.mkdir()
        new_cert, new_key = make_leaf(rotated, "server", ca_key, ca_cert)
        key.write_bytes(new_key.read_bytes())  # in place, as a secret volume or cert-manager would
        cert.write_bytes(new_cert.read_bytes())
        await process.wait_for("tls.reloaded", timeout=5)
        second = await _served_serial(port, ca_path)
        assert second != first
        await live.send_str("still on the old certificate")
        assert (await live.receive(timeout=5)).data == "still on the old certificate"
        await live.close()
    assert process.events("policy.reload_failed") == []


def tls_route(pki, upstream_url: str, limits: str = "") -> str:
    return f"""
    listen: {{address: "127.0.0.1:0", tls: {{cert: {pki["cert"]}, key: {pki["key"]}}}}}
    limits: {{handshake_timeout: 500ms{limits}}}
    routes:
      - path: /echo
        upstream: {upstream_url}
        auth: none
    """


async def test_a_client_that_never_starts_tls_is_cut_after_handshake_timeout(gateway, upstream, pki):
    gw = await gateway(tls_route(pki, upstream.url()))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)  # and no ClientHello, ever
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 0.4 < time.monotonic() - started < 2  # not asyncio's default TLS handshake timeout of 60 s
    writer.close()
    await wait_until(lambda: gw.gateway.connection_count == 0)


async def test_a_tls_client_that_goes_silent_is_let_go_like_a_plain_one(gateway, upstream, pki):
    """Its request never comes: 408, then our close_notify, which it never answers. The connection is gone
    after the lingering close's 2 s, not after the loops' default TLS shutdown timeout of 30 s."""
    gw = await gateway(tls_route(pki, upstream.url()))

    def silent_tls_client() -> ssl.SSLSocket:  # blocking: it completes the handshake, then never reads
        return client_context(pki["ca"]).wrap_socket(
            socket.create_connection(("127.0.0.1", gw.port)), server_hostname="localhost"
        )

    client = await asyncio.to_thread(silent_tls_client)
    started = time.monotonic()
    await wait_until(lambda: gw.gateway.connection_count == 0, timeout=10)
    assert time.monotonic() - started < 0.5 + 2 + 1
    client.close()


async def test_failed_tls_handshakes_leave_nothing_behind(gateway, upstream, pki, client):
    """Plain HTTP to the TLS listener fails its TLS handshake: the gateway neither counts nor keeps it."""
    gw = await gateway(tls_route(pki, upstream.url()))

    async def plain_http() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.read(), 5)
        writer.close()

    for _ in range(10):
        await asyncio.gather(*(plain_http() for _ in range(30)))
    await asyncio.sleep(0.1)
    gc.collect()
    kept = [
        item
        for item in gc.get_objects()
        if isinstance(item, HandshakeProtocol) and getattr(item._on_open, "__self__", None) is gw.gateway
    ]
    assert len(kept) == 0
    assert gw.gateway.connection_count == 0
    async with client.ws_connect(f"wss://127.0.0.1:{gw.port}/echo", ssl=client_context(pki["ca"])) as ws:
        await ws.send_str("still serving")
        assert (await ws.receive(timeout=5)).data == "still serving"
    await asyncio.wait_for(gw.gateway.stop(), 5)


async def test_stopping_during_a_tls_handshake_cuts_it_and_stops(gateway, upstream, pki):
    gw = await gateway(tls_route(pki, upstream.url(), ", drain_timeout: 1s").replace("500ms", "30s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await wait_until(lambda: gw.gateway.connection_count == 1)
    await asyncio.wait_for(gw.gateway.stop(), 3)
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()


async def test_tls_handshakes_in_progress_count_towards_max_connections(gateway, upstream, pki, log_events):
    gw = await gateway(tls_route(pki, upstream.url(), ", max_connections: 2").replace("500ms", "30s"))
    silent = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
    await wait_until(lambda: gw.gateway.connection_count == 2)
    _, response = await RawClient.connect(gw.port, "/echo", ssl=client_context(pki["ca"]))
    assert response.status == 503
    assert json.loads(response.body)["error"] == "overloaded"
    assert response.headers["retry-after"] == "1"
    await log_events.wait_for("handshake.rejected", reason="overloaded")
    for _, writer in silent:
        writer.close()
    await wait_until(lambda: gw.gateway.connection_count == 0)
    _, response = await RawClient.connect(gw.port, "/echo", ssl=client_context(pki["ca"]))
    assert response.status == 101


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
