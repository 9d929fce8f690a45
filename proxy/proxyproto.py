"""The PROXY protocol (HAProxy, versions 1 and 2), sans-I/O: the real peer behind a TCP load balancer.

When ``listen.proxy_protocol`` is on, every connection must start with a PROXY header; its source address
becomes the peer that ``trusted_proxies`` and every guard see.
"""

from __future__ import annotations

import ipaddress

from proxy.errors import ProxyHeaderError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107


def parse_proxy_header(data: bytes) -> tuple[str | None, int] | None:
    """Parse a PROXY header at the start of ``data``.

    Returns:
        None when more bytes are needed; else the source IP (None for ``LOCAL``/``UNKNOWN``: keep the TCP
        peer) and the header's length.

    Raises:
        ProxyHeaderError: the bytes are not a PROXY v1 or v2 header.
    """
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and data[:1] == b"\r":
        return _parse_v2(data)
    if data[:6] == b"PROXY "[: len(data[:6])]:
        return _parse_v1(data)
    raise ProxyHeaderError("connection did not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[str | None, int] | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None, end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    version = 4 if parts[1] == "TCP4" else 6
    source = _v1_address(parts[2], version, "source")
    _v1_address(parts[3], version, "destination")
    for port in parts[4:6]:
        if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535 and (port == "0" or port[0] != "0")):
            raise ProxyHeaderError("malformed PROXY v1 port")
    return source, end + 2


def _v1_address(text: str, version: int, which: str) -> str:
    if "%" in text:  # a zone id names an interface of the balancer, not a client
        raise ProxyHeaderError(f"malformed PROXY v1 {which} address")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"malformed PROXY v1 {which} address") from None
    if address.version != version:
        raise ProxyHeaderError("PROXY v1 address family mismatch")
    return str(address)


def _parse_v2(data: bytes) -> tuple[str | None, int] | None:
    if len(data) < 16:
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("malformed PROXY v2 signature")
    version_command = data[12]
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    length = int.from_bytes(data[14:16], "big")
    total = 16 + length
    if len(data) < total:
        return None
    command = version_command & 0x0F
    family = data[13] >> 4
    if command == 0:  # LOCAL: a health check from the balancer itself
        return None, total
    if command != 1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    if family == 0:  # AF_UNSPEC: the balancer does not know the source; keep the TCP peer
        return None, total
    if data[13] & 0x0F != 1:
        raise ProxyHeaderError("PROXY v2 header for another transport than TCP")
    if family == 1:
        if length < 12:
            raise ProxyHeaderError("PROXY v2 address block too short for IPv4")
        return str(ipaddress.IPv4Address(data[16:20])), total
    if family == 2:
        if length < 36:
            raise ProxyHeaderError("PROXY v2 address block too short for IPv6")
        return str(ipaddress.IPv6Address(data[16:32])), total
    raise ProxyHeaderError("PROXY v2 address family not supported (only TCP over IPv4 or IPv6)")
