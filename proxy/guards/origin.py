"""Origin allowlists: the defence against cross-site WebSocket hijacking.

Browsers always send ``Origin`` on a WebSocket handshake; a page on another site can open a WebSocket to us
with the user's cookies, and only the Origin tells us so.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from proxy.errors import Rejection
from proxy.guards.context import HandshakeContext
from proxy.policy.model import OriginPattern


def origin_allowed(origin: str, patterns: tuple[OriginPattern, ...]) -> bool:
    """Whether an ``Origin`` header value fits any pattern; ``null`` and junk never do."""
    try:
        split = urlsplit(origin.strip())
        port = split.port
    except ValueError:
        return False
    host = (split.hostname or "").lower()
    if not host or split.scheme not in ("http", "https"):
        return False
    return any(pattern.matches(split.scheme, host, port) for pattern in patterns)


def check_origin(context: HandshakeContext) -> Rejection | None:
    """403 ``origin`` when the route lists origins and the handshake's Origin is not one of them."""
    route = context.route
    if not route.origins:
        return None
    origin = context.request.header("origin")
    if origin is None:
        if route.allow_missing_origin:
            return None
        return Rejection(403, "origin", "an Origin header is required on this route")
    if origin_allowed(origin, route.origins):
        return None
    return Rejection(403, "origin", "origin not allowed")
