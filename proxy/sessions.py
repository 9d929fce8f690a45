"""Live sessions and the registry that drain and (later) reload enforcement walk over.

A :class:`Session` is created once a client got its 101 and lives until both of its connections are gone. It
holds what the close log line and the metrics need; the relay legs hold the per-direction counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from proxy.errors import IDLE_TIMEOUT, TOKEN_EXPIRED, Close
from proxy.guards.context import Identity
from proxy.guards.slots import LimiterSlots
from proxy.policy.model import Route
from proxy.request import ClientCertificate

if TYPE_CHECKING:
    from proxy.relay import Leg


class Session:
    """One relayed WebSocket: a client leg, an upstream leg, and how it ended."""

    __slots__ = (
        "_expiry_handle",
        "_idle_handle",
        "_on_finish",
        "client",
        "client_certificate",
        "client_ip",
        "close_code",
        "close_reason",
        "endpoint",
        "finished",
        "host",
        "identity",
        "initiator",
        "loop",
        "opened_at",
        "origin",
        "request_id",
        "request_path",
        "route",
        "slots",
        "started",
        "subprotocol",
        "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        request_id: str,
        route: Route,
        client_ip: str,
        subprotocol: str | None,
        on_finish: Callable[[Session], None],
        identity: Identity | None = None,
        slots: LimiterSlots | None = None,
        request_path: str = "/",
        origin: str | None = None,
        host: str | None = None,
        client_certificate: ClientCertificate | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.loop = loop
        self.request_id = request_id
        self.route = route
        #: The path and Origin the handshake was judged on: what a reloaded policy judges again.
        self.request_path = request_path
        self.origin = origin
        #: The Host (normalized) its route was matched on, and the client certificate TLS verified.
        self.host = host
        self.client_certificate = client_certificate
        #: The label of the pool endpoint it is relayed to (scheme, host, port, path; never a query).
        self.endpoint = endpoint
        self.client_ip = client_ip
        self.subprotocol = subprotocol
        #: Who the token said the client is (None on an open route), and the limiter slots held, given
        #: back when the session ends.
        self.identity = identity
        self.slots = slots
        self.started = time.monotonic()
        #: Wall-clock time (UNIX seconds) of the 101, for what operators read; durations use ``started``.
        self.opened_at = time.time()
        #: Who closed first: "client", "upstream" or "gateway"; None while open.
        self.initiator: str | None = None
        #: The close code and reason that ended the session (1006 when a connection vanished without one).
        self.close_code: int | None = None
        self.close_reason = ""
        self.finished = False
        self.client: Leg
        self.upstream: Leg
        self._on_finish = on_finish
        self._idle_handle: asyncio.TimerHandle | None = None
        self._expiry_handle: asyncio.TimerHandle | None = None

    def start(self, client: Leg, upstream: Leg) -> None:
        """Attach both legs and arm the idle timer."""
        self.client = client
        self.upstream = upstream
        idle = self.route.limits.idle_timeout
        if idle > 0:
            self._idle_handle = self.loop.call_later(idle, self._check_idle)
        if self.identity is not None and self.identity.expires_at is not None:
            # One timer per session, at exp + leeway: no polling of every session.
            delay = max(0.0, self.identity.expires_at - time.time())
            self._expiry_handle = self.loop.call_later(delay, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry_handle = None
        self.close(TOKEN_EXPIRED)

    def _check_idle(self) -> None:
        # One timer per session, re-armed for the remaining time, instead of a reset per frame. Only data
        # counts: pings and pongs (the gateway's keepalive among them) keep no session from being idle.
        idle = self.route.limits.idle_timeout
        last_data = max(self.client.reader.last_data, self.upstream.reader.last_data)
        remaining = last_data + idle - time.monotonic()
        if remaining > 0:
            self._idle_handle = self.loop.call_later(remaining, self._check_idle)
            return
        self._idle_handle = None
        self.close(IDLE_TIMEOUT)

    def note_close(self, initiator: str, code: int | None, reason: str) -> None:
        """Record who ended the session and how; only the first call counts."""
        if self.initiator is None:
            self.initiator = initiator
            self.close_code = code
            self.close_reason = reason

    def close(self, verdict: Close) -> None:
        """Close the session from the gateway: both sides get a close frame with ``verdict``."""
        if self.finished:
            return
        self.note_close("gateway", verdict.code, verdict.reason)
        self.client.send_close(verdict)
        self.upstream.send_close(verdict)

    def leg_lost(self) -> None:
        """Called by a leg whose connection is gone; the session ends when both are."""
        if self.finished or not (self.client.lost and self.upstream.lost):
            return
        self.finished = True
        for handle in (self._idle_handle, self._expiry_handle):
            if handle is not None:
                handle.cancel()
        self._idle_handle = self._expiry_handle = None
        self._on_finish(self)

    @property
    def duration(self) -> float:
        """Seconds since the 101."""
        return time.monotonic() - self.started


class SessionRegistry:
    """The live sessions of one gateway process."""

    def __init__(self) -> None:
        self._sessions: set[Session] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions))

    def add(self, session: Session) -> None:
        """Register a session that just got its 101."""
        self._sessions.add(session)
        self._empty.clear()

    def remove(self, session: Session) -> None:
        """Forget a finished session."""
        self._sessions.discard(session)
        if not self._sessions:
            self._empty.set()

    def close_all(self, verdict: Close) -> None:
        """Send ``verdict`` to both sides of every live session."""
        for session in list(self._sessions):
            session.close(verdict)

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until no session is left; False when ``timeout`` ran out first."""
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True
