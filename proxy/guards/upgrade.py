"""The upgrade guard: the request must be a well-formed RFC 6455 opening handshake."""

from __future__ import annotations

from proxy.errors import Rejection
from proxy.frames import is_valid_client_key
from proxy.guards.base import OfflineGuard
from proxy.guards.context import HandshakeContext


class UpgradeGuard(OfflineGuard):
    name = "websocket upgrade"
    not_rejudged = "a live session already upgraded; no policy changes how it did"

    def check(self, context: HandshakeContext) -> Rejection | None:
        """400/426 ``bad_request`` unless the request is a WebSocket opening handshake (section 4.2.1)."""
        request = context.request
        if "websocket" not in request.header_tokens("upgrade"):
            return Rejection(
                426,
                "bad_request",
                "this route only speaks WebSocket; send an Upgrade: websocket request",
                (("Upgrade", "websocket"), ("Connection", "Upgrade")),
            )
        if request.method != "GET":
            return Rejection(400, "bad_request", "a WebSocket handshake must use GET", (("Allow", "GET"),))
        if request.http_version != "1.1":
            return Rejection(400, "bad_request", "a WebSocket handshake needs HTTP/1.1")
        if "upgrade" not in request.header_tokens("connection"):
            return Rejection(400, "bad_request", "missing 'Connection: Upgrade'")
        if request.header("sec-websocket-version") != "13":
            return Rejection(
                426,
                "bad_request",
                "unsupported WebSocket version; use 13",
                (("Sec-WebSocket-Version", "13"),),
            )
        key = request.header("sec-websocket-key")
        if key is None or not is_valid_client_key(key):
            return Rejection(400, "bad_request", "missing or malformed Sec-WebSocket-Key")
        return None

    def passed(self, context: HandshakeContext) -> str:
        return ""
