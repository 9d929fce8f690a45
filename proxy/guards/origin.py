"""Origin allowlists: the defence against cross-site WebSocket hijacking.

Browsers always send ``Origin`` on a WebSocket handshake; a page on another site can open a WebSocket to us
with the user's cookies, and only the Origin tells us so.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from proxy.errors import Rejection
from proxy.guards.base import LiveSession, OfflineGuard
from proxy.guards.context import HandshakeContext
from proxy.policy.model import OriginPattern, Policy, Route


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


def origin_refusal(route: Route, origin: str | None) -> str | None:
    """Why ``route`` refuses a handshake with this ``Origin`` header (None: allowed). A route without an
    ``origins`` list checks nothing. Used at the handshake and again for live sessions on reload."""
    if not route.origins:
        return None
    if origin is None:
        return None if route.allow_missing_origin else "an Origin header is required on this route"
    return None if origin_allowed(origin, route.origins) else "origin not allowed"


class OriginGuard(OfflineGuard):
    name = "origin"

    def check(self, context: HandshakeContext) -> Rejection | None:
        """403 ``origin`` when the route lists origins and the handshake's Origin is not one of them."""
        why = origin_refusal(context.route, context.request.header("origin"))
        return None if why is None else Rejection(403, "origin", why)

    def rejudge(self, session: LiveSession, route: Route, policy: Policy) -> str | None:
        return None if origin_refusal(route, session.origin) is None else "origin"

    def passed(self, context: HandshakeContext) -> str:
        if context.request.header("origin") is None:
            return "no Origin sent (allowed on this route)"
        return ""
