"""The one client IP every guard and log line uses."""

from __future__ import annotations

import ipaddress


def normalize_ip(address: str) -> str:
    """An IP as text, with IPv4-mapped IPv6 (``::ffff:1.2.3.4``) unwrapped and IPv6 zone ids dropped."""
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
