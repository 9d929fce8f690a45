"""Client IP resolution through trusted proxies, and the PROXY protocol header."""

from ipaddress import ip_network

import pytest

from proxy.clientip import normalize_ip, resolve_client_ip
from proxy.errors import ProxyHeaderError
from proxy.proxyproto import parse_proxy_header

TRUSTED = (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))


def test_untrusted_peer_cannot_spoof_forwarded_for() -> None:
    assert resolve_client_ip("203.0.113.9", ["6.6.6.6"], TRUSTED) == ("203.0.113.9", "203.0.113.9")


def test_trusted_peer_hops_are_skipped_right_to_left() -> None:
    client, chain = resolve_client_ip("10.0.0.1", ["6.6.6.6, 198.51.100.7, 10.0.0.2"], TRUSTED)
    assert client == "198.51.100.7"  # the spoofed 6.6.6.6 sits left of the first untrusted hop
    assert chain == "6.6.6.6, 198.51.100.7, 10.0.0.2, 10.0.0.1"


def test_junk_in_the_chain_stops_at_the_last_good_hop() -> None:
    client, _ = resolve_client_ip("10.0.0.1", ["not-an-ip, 10.0.0.3"], TRUSTED)
    assert client == "10.0.0.3"


def test_no_trusted_proxies_means_the_peer_is_the_client() -> None:
    assert resolve_client_ip("10.0.0.1", ["1.2.3.4"], ())[0] == "10.0.0.1"


def test_ipv6_and_mapped_addresses() -> None:
    assert normalize_ip("::ffff:192.0.2.1") == "192.0.2.1"
    assert resolve_client_ip("fd00::1", ["2001:db8::5"], TRUSTED)[0] == "2001:db8::5"


def test_proxy_v1_header() -> None:
    assert parse_proxy_header(b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 80\r\nGET /") == ("192.0.2.1", 40)
    assert parse_proxy_header(b"PROXY TCP4 192.0.2") is None
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == (None, 15)


def test_proxy_v2_header() -> None:
    header = (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + b"\x21\x11\x00\x0c"
        + bytes([192, 0, 2, 1, 192, 0, 2, 2])
        + b"\x13\x88\x00P"
    )
    assert parse_proxy_header(header + b"GET") == ("192.0.2.1", 28)
    assert parse_proxy_header(header[:20]) is None
    local = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
    assert parse_proxy_header(local) == (None, 16)


V2 = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 x y 1 2\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY " + b"9" * 120,
        b"PROXY TCP4 1.2.3.4 junk 1 2\r\n",  # destination must parse too
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n",  # port out of range
        b"PROXY TCP4 1.2.3.4 5.6.7.8 x 80\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 080 80\r\n",  # leading zero
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # zone id
        V2 + b"\x21\x11\x00\x04" + bytes(4),  # PROXY over TCP4 with an address block too short
        V2 + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
        V2 + b"\x21\x31\x00\x00",  # AF_UNIX
    ],
)
def test_bad_proxy_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)
