"""The relay: after the 101, frames flow between the client and the upstream through two :class:`Leg` s.

Each leg is the asyncio protocol of one connection and a thin adapter over the sans-I/O frame core
(:class:`proxy.protocol.FrameReader`): it feeds the core what its side sends, writes what the core returns
to the other side's transport in one call, and does what the core asks for: close frames, the close
handshake, a lingering close for an offender. It also keeps the time: the close timeout and keepalive.

* Backpressure is TCP's own: when a transport's write buffer passes its high-water mark, the other side's
  reading is paused until it drains, so a slow reader slows the sender instead of growing memory.
* Close frames are carried across unchanged (code and reason), each side's close handshake is completed,
  and a side that vanishes without one is reported to the other with 1011 (upstream lost) or 1001 (client
  gone).
* A side that broke a limit, a rule or the protocol gets its close code, and is then read (and what it
  sends discarded) until its own close frame arrives or ``close_timeout`` passes: closing the socket while
  it still sends would make its kernel answer with a reset that destroys the close frame unread.
* Keepalive: a side that sent nothing for ``ping_interval`` is pinged; no answer within ``ping_timeout``
  means it is gone: it gets 1011 ``keepalive timeout`` and its socket is cut at once, the other side 1001.
  The gateway's pongs are consumed; the peers' own pings and pongs cross.

The relay knows nothing of tokens or policy beyond the numbers in :class:`proxy.policy.model.Limits`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import socket
import struct
import termios
import time

from proxy import logs
from proxy.deflate import Agreement
from proxy.errors import (
    CLIENT_CLOSED_BY_GATEWAY,
    CLIENT_WENT_AWAY,
    CONNECTION_LOST,
    INTERNAL_ERROR,
    KEEPALIVE_TIMEOUT,
    UPSTREAM_LOST,
    UPSTREAM_PROTOCOL_ERROR,
    Close,
    CloseCode,
)
from proxy.frames import close_payload
from proxy.policy.model import Limits, MessageRate, MessageRules
from proxy.protocol import Events, FrameReader
from proxy.rules import MessageChecker
from proxy.sessions import Session

_monotonic = time.monotonic
_CLOSE = 0x8
#: How long an offender's close waits at most for the other side's close handshake (the answers to the
#: offender's earlier messages cross first), when ``close_timeout`` is longer.
ANSWER_GRACE = 1.0


class Leg(asyncio.Protocol):
    """One connection of a session: feeds its side's bytes to a :class:`FrameReader` and writes what it
    returns to the peer leg's transport."""

    __slots__ = (
        "_close_timer",
        "_drained_at_ping",
        "_failure",
        "_keepalive",
        "_ping_queued_after",
        "_ping_sent_at",
        "_resumed_at",
        "_turn_waiting",
        "backlogged",
        "close_received",
        "close_sent",
        "last_received",
        "lost",
        "name",
        "peer",
        "reader",
        "sent",
        "session",
        "throttled",
        "transport",
    )

    def __init__(
        self, session: Session, name: str, transport: asyncio.Transport, reader: FrameReader
    ) -> None:
        self.session = session
        #: "client" or "upstream": the side this leg reads from.
        self.name = name
        self.transport = transport
        self.peer: Leg
        self.reader = reader
        #: Whether reading from this side is paused because the other side's write buffer is full, and
        #: because a read held more frames than one turn takes.
        self.throttled = False
        self.backlogged = False
        #: Whether the next turn of a backlog waits for the other side's write buffer to drain.
        self._turn_waiting = False
        #: Bytes written to this side's transport: with what is still queued, how much it took.
        self.sent = 0
        #: At the last keepalive check: how much of ``sent`` the side had taken, and how much was sent
        #: before the gateway's ping (what the ping waits behind).
        self._drained_at_ping = 0
        self._ping_queued_after = 0
        self.close_received = False
        self.close_sent = False
        self.lost = False
        #: When this side last sent any byte (monotonic): keepalive pings only a quiet side.
        self.last_received = _monotonic()
        self._ping_sent_at = 0.0
        #: When reading this side last resumed after a pause (monotonic): what it sent meanwhile waits
        #: in the socket, unread, so its silence since then says nothing yet.
        self._resumed_at = 0.0
        #: The close frame payload this side gets for what it broke, once it broke something.
        self._failure: builtins.bytes | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None

    # -- the counters metrics and logs read -------------------------------------------------------

    @property
    def messages(self) -> int:
        """Data messages received from this side."""
        return self.reader.messages

    @property
    def bytes(self) -> int:
        """Payload bytes received from this side."""
        return self.reader.bytes

    @property
    def checker(self) -> MessageChecker | None:
        """The message rules of this side's direction."""
        return self.reader.checker

    @property
    def oversized(self) -> bool:
        """Whether this side was closed for a message over the size or fragment limit."""
        return self.reader.oversized

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def data_received(self, data: builtins.bytes) -> None:
        """Feed the core, write what it returns to the other side in one call, act on what it found."""
        now = self.last_received = _monotonic()
        if self.close_received:
            return  # nothing may follow a close frame (RFC 6455 5.5.1)
        reader = self.reader
        try:
            pieces = reader.receive_data(data, now)
        except Exception:  # noqa: BLE001 - a bug must cost this session, never the process
            fields = {"request_id": self.session.request_id, "side": self.name}
            logs.LOGGER.exception("relay.error", extra={"fields": fields})
            self.fail(INTERNAL_ERROR)
            return
        peer = self.peer
        if pieces and not peer.lost:
            transport = peer.transport
            if len(pieces) == 1:
                piece = pieces[0]
                transport.write(piece)
                peer.sent += len(piece)
            elif len(pieces) <= 16:
                # a few (large) pieces: uvloop writes them with one writev, without joining them
                transport.writelines(pieces)
                peer.sent += sum(map(len, pieces))
            else:
                # many small frames: one joined write is cheaper than many pieces
                joined = b"".join(pieces)
                transport.write(joined)
                peer.sent += len(joined)
        if reader.backlogged:
            # The read held more frames than one turn takes: stop reading this side, let the other
            # sessions run, and go on with the rest on the next turn of the loop.
            if not self.backlogged:
                self.backlogged = True
                self.transport.pause_reading()
            self.session.loop.call_soon(self._next_turn)
        elif self.backlogged:
            self.backlogged = False
            self._read_again()
        events = reader.events
        if events:
            if events & Events.FAIL:
                self.fail(Close(reader.fail_code, reader.fail_reason))
            if events & Events.CLOSE:
                self._close_received()

    def _read_again(self) -> None:
        """Read this side again unless something still holds it: a backlog of its frames, or the other
        side's full write buffer while its frames are forwarded there (what it sends after the gateway
        closed it is only discarded: backpressure no longer applies)."""
        if self.lost or self.backlogged:
            return
        if self.throttled:
            if not self.reader.discarding:
                return
            self.throttled = False
        self._resumed_at = _monotonic()
        self.transport.resume_reading()

    def _next_turn(self) -> None:
        if self.lost:
            return
        if self.throttled and not self.reader.discarding:
            # The other side's write buffer is full: the rest of the read (which may inflate to much
            # more than it is) waits for it to drain.
            self._turn_waiting = True
            return
        self.data_received(b"")

    def pause_writing(self) -> None:
        """Our transport's buffer is full: stop reading from the side that fills it."""
        peer = self.peer
        if peer.reader.discarding or peer.lost:
            return  # what it sends is discarded, not written here: keep reading it
        peer.throttled = True
        peer.transport.pause_reading()

    def resume_writing(self) -> None:
        """Our transport drained: read from the other side again."""
        peer = self.peer
        if peer.throttled:
            peer.throttled = False
            if peer._turn_waiting:
                peer._turn_waiting = False
                peer.session.loop.call_soon(peer._next_turn)
            else:
                peer._read_again()

    def eof_received(self) -> bool:
        """A half-close ends the leg like a reset; returning False lets asyncio close the transport."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: tell the peer if it did not learn it from a close frame, then settle."""
        self.lost = True
        self._cancel_timers()
        peer = self.peer
        # What the other side still sends has nowhere to go: it is only read to find its close frame.
        peer.reader.discard()
        if not peer.lost and not peer.close_sent:
            if self.close_received:
                told = Close(CloseCode.GOING_AWAY, f"{self.name} closed")
            elif self.name == "upstream":
                told = UPSTREAM_LOST
            else:
                told = CLIENT_WENT_AWAY
            self.session.note_close(self.name, CONNECTION_LOST.code, CONNECTION_LOST.reason)
            peer.send_close(told)
        self.session.leg_lost()

    # -- keepalive ----------------------------------------------------------------------------------

    def start_keepalive(self) -> None:
        """Arm the keepalive timer (when the route's ``ping_interval`` is not 0)."""
        interval = self.session.route.limits.ping_interval
        if interval > 0:
            self._keepalive = self.session.loop.call_later(interval, self._keepalive_due)

    def _keepalive_due(self) -> None:
        """The timer: ping a side quiet for ``ping_interval``; judge one that was pinged."""
        self._keepalive = None
        if self.lost or self.close_sent or self.close_received:
            return
        limits: Limits = self.session.route.limits
        loop = self.session.loop
        now = _monotonic()
        if self.reader.ping_payload is not None and self._ping_sent_at:
            # A ping is out and ping_timeout has passed. Bytes after the ping prove the side is there
            # (its pong may wait behind them), and so does a side the gateway stopped reading.
            if self.last_received <= self._ping_sent_at:
                if self.throttled or self._resumed_at > self._ping_sent_at:
                    # The gateway did not read this side for some of the time: what it sent meanwhile,
                    # its pong too, waits unread in the socket. Judge it on a whole ping_timeout of reading.
                    self._ping_sent_at = now
                    self._keepalive = loop.call_later(limits.ping_timeout, self._keepalive_due)
                    return
                drained = self._drained()
                behind_data = self._drained_at_ping < self._ping_queued_after
                if not behind_data or drained <= self._drained_at_ping:
                    self._keepalive_timeout()
                    return
                # The ping was queued behind data for a slow reader, and the side took some of it since:
                # a live peer whose pong cannot come before the ping reaches it. Wait another ping_timeout.
                self._drained_at_ping = drained
                self._ping_sent_at = now
                self._keepalive = loop.call_later(limits.ping_timeout, self._keepalive_due)
                return
            self._ping_sent_at = 0.0
        quiet_for = now - self.last_received
        if quiet_for < limits.ping_interval:
            self._keepalive = loop.call_later(limits.ping_interval - quiet_for, self._keepalive_due)
            return
        ping = self.reader.ping()
        self._ping_queued_after = self.sent
        self.transport.write(ping)
        self.sent += len(ping)
        if limits.ping_timeout > 0:
            self._ping_sent_at = now
            self._drained_at_ping = self._drained()
            self._keepalive = loop.call_later(limits.ping_timeout, self._keepalive_due)
        else:
            self._keepalive = loop.call_later(limits.ping_interval, self._keepalive_due)

    def _drained(self) -> int:
        """Bytes this side has taken (acknowledged) of what the relay wrote to it."""
        return self.sent - self._queued()

    def _queued(self) -> int:
        """Bytes written to this side and not yet acknowledged: in the transport's buffer and, where the
        kernel says, in its socket."""
        queued = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Where the ioctl is missing, the transport's own buffer is all there is to go on.
            with contextlib.suppress(OSError, ValueError):  # ValueError: the socket is already closed
                queued += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return queued

    def _keepalive_timeout(self) -> None:
        """No answer to a ping: the peer is gone. Say so (it will likely never read it) and cut the socket;
        the other side gets a going-away."""
        self.session.note_close("gateway", KEEPALIVE_TIMEOUT.code, KEEPALIVE_TIMEOUT.reason)
        stuck = self._queued()
        self.reader.discard()
        self.send_close(KEEPALIVE_TIMEOUT)
        self.peer.send_close(Close(CloseCode.GOING_AWAY, f"{self.name} did not answer a ping"))
        sock = self.transport.get_extra_info("socket")
        if stuck and sock is not None:
            # Data the peer never took would keep the kernel retransmitting to it for minutes after the
            # close: a reset drops it at once.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # -- closing ------------------------------------------------------------------------

    def _close_received(self) -> None:
        """This side's close frame arrived: carry it across, complete the handshake."""
        reader = self.reader
        self.close_received = True
        self.session.note_close(self.name, reader.close_code, reader.close_reason)
        payload = reader.close_payload or b""
        peer = self.peer
        if not peer.close_sent and not peer.lost:
            peer._send_close_payload(payload)
        if self.close_sent:
            self._shutdown()
        elif peer.lost:
            # No reply will come from the other side: answer this side with its own code.
            self._send_close_payload(payload)

    def send_close(self, verdict: Close) -> None:
        """Send a close frame to this side (once), then wait ``close_timeout`` for its reply."""
        self._send_close_payload(close_payload(verdict.code, verdict.reason))

    def _send_close_payload(self, payload: builtins.bytes | bytearray) -> None:
        if self.close_sent or self.lost:
            return
        if self._failure is not None:
            payload = self._failure  # a side that broke a rule is told why, whatever closes it
        self.close_sent = True
        # Nothing more may be sent to this side (RFC 6455 5.5.1): what the other side still sends is only
        # read to find its close frame. What this side sends still reaches the other side until that one
        # is closed too.
        self.peer.reader.discard()
        self._cancel_close_timer()
        self.transport.write(self.reader.frame_to_side(_CLOSE, payload))
        if self.close_received:
            self._shutdown()
            return
        # It must be read to see its close (still under backpressure while its frames are forwarded).
        self._read_again()
        timeout = self.session.route.limits.close_timeout
        self._close_timer = self.session.loop.call_later(timeout, self._shutdown, True)

    def fail(self, verdict: Close) -> None:
        """This side broke the protocol, a limit or a rule: from now on what it sends is discarded; the
        other side gets a going-away (1014 when the upstream broke), and this side gets ``verdict`` once the
        other side's close handshake is done (or ``close_timeout`` passed): what the other side had already
        sent, the answers to this side's earlier messages, still reaches it first, as it would without a
        gateway in between. This side is then read until its close frame (a lingering close)."""
        self.session.note_close("gateway", verdict.code, verdict.reason)
        self.reader.discard()
        if self.close_sent:
            return  # already closed by the other side's close: it is read until its answer, as it was
        self._failure = close_payload(verdict.code, verdict.reason)
        self._read_again()
        peer = self.peer
        if peer.lost or peer.close_sent:
            self._send_close_payload(self._failure)
            return
        if verdict.code == CloseCode.MESSAGE_TOO_BIG:
            peer.send_close(Close(CloseCode.GOING_AWAY, f"{self.name} sent a message over the size limit"))
        elif self.name == "upstream":
            peer.send_close(UPSTREAM_PROTOCOL_ERROR)
        else:
            peer.send_close(CLIENT_CLOSED_BY_GATEWAY)
        # A service that reads nothing (a pure broadcaster) answers no close: the offender waits at most this.
        grace = min(self.session.route.limits.close_timeout, ANSWER_GRACE)
        self._close_timer = self.session.loop.call_later(grace, self._send_close_payload, self._failure)

    def _shutdown(self, abort: bool = False) -> None:
        """Both close frames crossed on this connection (or time ran out): close the socket.

        A graceful close waits for the write buffer to drain; a side that stopped reading would make it
        wait forever, so the socket is cut if it is not gone within ``close_timeout``.
        """
        self._cancel_timers()
        if self.lost:
            return
        if abort:
            self.transport.abort()
            return
        self.transport.close()
        if not self.lost and self.transport.get_write_buffer_size():
            timeout = self.session.route.limits.close_timeout
            self._close_timer = self.session.loop.call_later(timeout, self.transport.abort)

    def _cancel_close_timer(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_close_timer()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None


def start_relay(
    session: Session,
    client_transport: asyncio.Transport,
    upstream_transport: asyncio.Transport,
    client_pending: bytes,
    upstream_pending: bytes,
    upstream_already_lost: bool,
    client_deflate: Agreement | None = None,
    upstream_deflate: Agreement | None = None,
) -> None:
    """Hand both connections to a new pair of legs and start reading.

    ``*_pending`` are the bytes that arrived right behind each side's handshake; ``*_deflate`` what each
    hop agreed to for permessage-deflate (None: that hop is uncompressed).
    """
    route = session.route
    limits = route.limits
    now = _monotonic()
    client_bytes = route.client_rules.max_message_bytes if route.client_rules else limits.max_message_bytes
    upstream_bytes = (
        route.upstream_rules.max_message_bytes if route.upstream_rules else limits.max_message_bytes
    )
    client_checker = _checker(route.client_rules, route.message_rate, now)
    upstream_checker = _checker(route.upstream_rules, None, now)
    client = Leg(
        session,
        "client",
        client_transport,
        _reader(True, client_bytes, limits, client_checker, client_deflate, upstream_deflate),
    )
    upstream = Leg(
        session,
        "upstream",
        upstream_transport,
        _reader(False, upstream_bytes, limits, upstream_checker, upstream_deflate, client_deflate),
    )
    client.reader.last_data = upstream.reader.last_data = now
    client.peer = upstream
    upstream.peer = client
    session.start(client, upstream)
    client_transport.set_protocol(client)
    upstream_transport.set_protocol(upstream)
    if upstream_already_lost:
        upstream.connection_lost(None)
        return
    if upstream_pending:
        upstream.data_received(upstream_pending)
    if client_pending:
        client.data_received(client_pending)
    for leg in (client, upstream):
        # A leg stays paused if relaying the pending bytes already filled its peer's write buffer.
        if not leg.transport.is_closing():
            leg._read_again()
        leg.start_keepalive()


def _reader(
    masked: bool,
    max_bytes: int,
    limits: Limits,
    checker: MessageChecker | None,
    sender: Agreement | None,
    receiver: Agreement | None,
) -> FrameReader:
    """The frame core of one direction, with permessage-deflate as its two hops agreed: an inflater when
    the sender's hop negotiated it, a deflater when the receiver's did -- or, when both did with compatible
    parameters and no rule needs a whole message or drops one, compressed messages passed as they came."""
    inflater = sender.inflater() if sender is not None else None
    # A message a rule gathers must be read whole, and one dropped would leave the receiver's inflater
    # without the context the next message was compressed against: those directions are transcoded.
    rules_allow = checker is None or not (checker.gathers_text or checker.drop or checker.rate_drop)
    passthrough = sender is not None and receiver is not None and rules_allow and sender.passes_to(receiver)
    deflater = receiver.deflater() if receiver is not None and not passthrough else None
    return FrameReader(
        masked, max_bytes, limits.fragments_allowed(max_bytes), checker, inflater, deflater, passthrough
    )


def _checker(rules: MessageRules | None, rate: MessageRate | None, now: float) -> MessageChecker | None:
    """A checker when the direction has rules or a rate; None keeps the relay on its plainest path."""
    if rules is None and rate is None:
        return None
    if rules is None:
        rules = MessageRules(max_message_bytes=0, utf8=False)
    return MessageChecker(rules, rate, now)
