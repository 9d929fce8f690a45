"""The one client IP every guard and log line uses."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

#: How many addresses the parsing helpers remember: the peers and forwarded hops seen most recently
#: (the same balancer or client comes back at every handshake); bounded whatever the traffic.
_REMEMBERED = 4096
#: The longest text remembered: an IP address (IPv6 with a zone, or IPv4-mapped) is shorter; a forwarded
#: hop may be kilobytes of junk, which is parsed but not kept.
_LONGEST_ADDRESS = 64


def normalize_ip(address: str) -> str:
    """An IP as text, with IPv4-mapped IPv6 (``::ffff:1.2.3.4``) unwrapped and IPv6 zone ids dropped."""
    return _normalize_remembered(address) if len(address) <= _LONGEST_ADDRESS else _normalize(address)


@lru_cache(maxsize=_REMEMBERED)
def _normalize_remembered(address: str) -> str:
    return _normalize(address)


def _normalize(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def peer_ip(peername: object) -> str:
    """The IP of a transport's ``peername`` extra info (a tuple for TCP; anything else becomes "unknown")."""
    if isinstance(peername, tuple) and peername:
        return normalize_ip(str(peername[0]))
    return "unknown"


def _parse(address: str) -> IPv4Address | IPv6Address | None:
    return _parse_remembered(address) if len(address) <= _LONGEST_ADDRESS else _parse_address(address)


@lru_cache(maxsize=_REMEMBERED)
def _parse_remembered(address: str) -> IPv4Address | IPv6Address | None:
    return _parse_address(address)


def _parse_address(address: str) -> IPv4Address | IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: IPv4Address | IPv6Address, trusted: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    return any(ip.version == network.version and ip in network for network in trusted)


def resolve_client_ip(
    peer: str, forwarded_for: list[str], trusted: tuple[IPv4Network | IPv6Network, ...]
) -> tuple[str, str]:
    """The real client IP and the ``X-Forwarded-For`` value to send upstream.

    ``X-Forwarded-For`` is believed only from a trusted peer, and then read right to left: each hop a trusted
    proxy appended is skipped, and the first address not in ``trusted`` is the client (what nginx calls
    ``real_ip_recursive``). A malformed entry ends the walk at the last good hop, so junk a client wrote can
    never become its IP. From an untrusted peer the header is ignored and the peer is the client.
    """
    peer_address = _parse(peer)
    if peer_address is None or not trusted or not forwarded_for or not _trusted(peer_address, trusted):
        return peer, peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    client = peer_address
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            break
        client = address
        if not _trusted(address, trusted):
            break
    return str(client), ", ".join([*hops, peer])
