"""The relay: after the 101, frames flow between the client and the upstream through two :class:`Leg` s.

Each leg is the asyncio protocol of one connection. It parses the frames its side sends, checks them, and
writes them to the other side's transport in one call per ``data_received``:

* upstream -> client frames are forwarded byte for byte (server frames are unmasked on both hops);
* client -> upstream frames are re-masked with a fresh key (one XOR with the combined key), since a
  gateway must not let a client choose the bytes that travel on the upstream's wire.

Messages are never decoded, re-encoded or reassembled: fragments are forwarded as they come and the receiver
reassembles them, while the leg tracks the message's running size. Backpressure is TCP's own: when a
transport's write buffer fills, the other side's reading is paused until it drains, so a slow reader slows
the sender instead of growing memory; a leg buffers at most one frame (bounded by ``max_message_size``).

Close frames are carried across unchanged (code and reason), each side's close handshake is completed, and a
side that vanishes without one is reported to the other with 1011 (upstream lost) or 1001 (client gone).
The relay knows nothing of tokens or policy beyond the numbers in :class:`proxy.policy.model.Limits`.
"""

from __future__ import annotations

import asyncio
import time

from proxy import logs
from proxy.errors import CloseCode
from proxy.frames import MaskSource, ProtocolError, apply_mask, close_payload, encode_frame, parse_close
from proxy.policy.model import MessageRate, MessageRules
from proxy.rules import MessageChecker
from proxy.sessions import Session

_monotonic = time.monotonic
_CLOSE = 0x8
_FIN = 0x80
_RSV = 0x70

#: One source of masking keys per process; a leg draws one key per frame it sends upstream.
_masks = MaskSource()
#: Frames at least this long are handed to the transport as separate pieces rather than one joined copy.
_SEPARATE_PIECES = 4096


class Leg(asyncio.Protocol):
    """One connection of a session: reads its side's frames and writes them to the peer leg's transport."""

    __slots__ = (
        "_buffer",
        "_close_timer",
        "_dropping",
        "_fragments",
        "_in_message",
        "_max_message_bytes",
        "_message_bytes",
        "_message_opcode",
        "_recv_masked",
        "bytes",
        "checker",
        "close_received",
        "close_sent",
        "lost",
        "messages",
        "name",
        "oversized",
        "peer",
        "session",
        "throttled",
        "transport",
    )

    def __init__(
        self,
        session: Session,
        name: str,
        transport: asyncio.Transport,
        max_message_bytes: int,
        checker: MessageChecker | None = None,
    ) -> None:
        self.session = session
        #: "client" or "upstream": the side this leg reads from.
        self.name = name
        self.transport = transport
        self.peer: Leg
        #: Frames from a client are masked (RFC 6455 5.3); frames from a server are not.
        self._recv_masked = name == "client"
        self._max_message_bytes = max_message_bytes
        #: The direction's message rules, or None when nothing but frame syntax and size is checked.
        self.checker = checker
        self._fragments: list[bytes | bytearray] = []
        self._message_opcode = 0
        self._dropping = False
        self._buffer = bytearray()
        self._in_message = False
        self._message_bytes = 0
        #: Data messages and payload bytes received from this side.
        self.messages = 0
        self.bytes = 0
        #: Whether this side was closed for a message over the size limit (a "size" violation).
        self.oversized = False
        #: Whether reading from this side is paused because the other side's write buffer is full.
        self.throttled = False
        self.close_received = False
        self.close_sent = False
        self.lost = False
        self._close_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse every whole frame in ``data``, forward the good ones in one write, act on the rest."""
        now = self.session.last_activity = _monotonic()
        if self.close_received:
            return  # nothing may follow a close frame (RFC 6455 5.5.1)
        if self._buffer:
            self._buffer += data
            buf: bytes | bytearray = self._buffer
        else:
            buf = data
        if self.close_sent or self.peer.close_sent:
            pos = self._skip_until_close(buf)
        else:
            try:
                pos = self._relay_frames(buf, now)
            except ProtocolError as error:
                self._fail(error.code, str(error))
                return
            except Exception:  # noqa: BLE001 - a bug must cost this session, never the process
                fields = {"request_id": self.session.request_id, "side": self.name}
                logs.LOGGER.exception("relay.error", extra={"fields": fields})
                self._fail(CloseCode.INTERNAL_ERROR, "internal error")
                return
        if self.lost or self.close_received:
            return
        if buf is self._buffer:
            del self._buffer[:pos]
        elif pos < len(buf):
            self._buffer += memoryview(buf)[pos:]

    def pause_writing(self) -> None:
        """Our transport's buffer is full: stop reading from the side that fills it."""
        self.peer.throttled = True
        peer_transport = self.peer.transport
        if not peer_transport.is_closing():
            peer_transport.pause_reading()

    def resume_writing(self) -> None:
        """Our transport drained: read from the other side again."""
        self.peer.throttled = False
        peer_transport = self.peer.transport
        if not peer_transport.is_closing():
            peer_transport.resume_reading()

    def eof_received(self) -> bool:
        """A half-close ends the leg like a reset; returning False lets asyncio close the transport."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: tell the peer if it did not learn it from a close frame, then settle."""
        self.lost = True
        self._cancel_close_timer()
        self._buffer = bytearray()
        peer = self.peer
        if not peer.lost and not peer.close_sent:
            if self.close_received:
                peer_code, peer_reason = CloseCode.GOING_AWAY, f"{self.name} closed"
            elif self.name == "upstream":
                peer_code, peer_reason = CloseCode.INTERNAL_ERROR, "upstream connection lost"
            else:
                peer_code, peer_reason = CloseCode.GOING_AWAY, "client went away"
            self.session.note_close(self.name, CloseCode.ABNORMAL, "connection lost")
            peer.send_close(peer_code, peer_reason)
        elif not peer.lost and peer.close_received and not peer.transport.is_closing():
            peer.transport.close()
        self.session.leg_lost()

    # -- frames ------------------------------------------------------------------------

    def _relay_frames(self, buf: bytes | bytearray, now: float) -> int:
        """Forward the whole frames at the start of ``buf``; return how many bytes were consumed.

        Written for speed: this loop runs per frame, so it reads the header with indexing and integer
        arithmetic, and writes once at the end.

        Raises:
            ProtocolError: the side broke RFC 6455 or a limit; frames before the bad one were forwarded.
        """
        size = len(buf)
        pos = 0
        recv_masked = self._recv_masked
        mask_bit = 0x80 if recv_masked else 0
        max_bytes = self._max_message_bytes
        checker = self.checker
        pieces: list[bytes | bytearray] = []
        try:
            while size - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                length = b1 & 0x7F
                hlen = 2
                if length == 126:
                    if size - pos < 4:
                        break
                    length = (buf[pos + 2] << 8) | buf[pos + 3]
                    hlen = 4
                elif length == 127:
                    if size - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    hlen = 10
                if (b1 & 0x80) != mask_bit:
                    raise ProtocolError(
                        "unmasked frame from the client" if recv_masked else "masked frame from the upstream"
                    )
                if recv_masked:
                    hlen += 4
                if b0 & _RSV:
                    raise ProtocolError("reserved bits set, but no extension was negotiated")
                opcode = b0 & 0x0F
                if opcode & 0x8:
                    if not b0 & _FIN or length > 125:
                        raise ProtocolError("control frame fragmented or longer than 125 bytes")
                    if opcode > 0xA:
                        raise ProtocolError(f"unknown opcode {opcode}")
                else:
                    if opcode == 0:
                        if not self._in_message:
                            raise ProtocolError("continuation frame outside a message")
                        total = self._message_bytes + length
                    elif opcode > 2:
                        raise ProtocolError(f"unknown opcode {opcode}")
                    elif self._in_message:
                        raise ProtocolError("new message before the previous one ended")
                    else:
                        total = length
                    if total > max_bytes:
                        raise ProtocolError(
                            f"message larger than {max_bytes} bytes", CloseCode.MESSAGE_TOO_BIG
                        )
                end = pos + hlen + length
                if end > size:
                    break
                if opcode == _CLOSE:
                    self._flush(buf, pos, pieces)
                    self._handle_close(self._payload(buf, pos, hlen, end))
                    return end
                if not opcode & 0x8:
                    if b0 & _FIN:
                        self._in_message = False
                        self._message_bytes = 0
                        self.messages += 1
                    else:
                        self._in_message = True
                        self._message_bytes = total
                    self.bytes += length
                    if checker is not None:
                        self._checked_message(b0, opcode, buf, pos, hlen, end, now, pieces)
                        pos = end
                        continue
                if recv_masked or checker is not None:
                    # (Server frames with no checker need nothing here: _flush writes them as one run.)
                    self._outgoing(buf, pos, hlen, end, pieces)
                pos = end
        except ProtocolError:
            self._flush(buf, pos, pieces)
            raise
        self._flush(buf, pos, pieces)
        return pos

    def _outgoing(
        self, buf: bytes | bytearray, pos: int, hlen: int, end: int, pieces: list[bytes | bytearray]
    ) -> None:
        """Add a frame as the other side must get it: re-masked towards the upstream, unchanged to a
        client. A large frame's header, key and payload stay separate pieces: joining them would copy the
        payload."""
        if not self._recv_masked:
            pieces.append(bytes(buf[pos:end]))
            return
        new_mask = _masks.next()
        combined = (
            int.from_bytes(buf[pos + hlen - 4 : pos + hlen], "little") ^ int.from_bytes(new_mask, "little")
        ).to_bytes(4, "little")
        masked = apply_mask(buf[pos + hlen : end], combined)
        if end - pos < _SEPARATE_PIECES:
            pieces.append(bytes(buf[pos : pos + hlen - 4]) + new_mask + masked)
        else:
            pieces.append(bytes(buf[pos : pos + hlen - 4]))
            pieces.append(new_mask)
            pieces.append(masked)

    def _checked_message(
        self,
        b0: int,
        opcode: int,
        buf: bytes | bytearray,
        pos: int,
        hlen: int,
        end: int,
        now: float,
        pieces: list[bytes | bytearray],
    ) -> None:
        """A data frame under message rules: fragments are gathered so the whole message is checked, then
        forwarded as one frame, dropped and counted, or refused (the offender is closed).

        Raises:
            ProtocolError: a rule in "close" mode was broken.
        """
        checker = self.checker
        assert checker is not None
        if opcode:
            self._message_opcode = opcode
            verdict = checker.first_frame(opcode)
            if verdict is not None:
                self._refuse(checker, verdict)
                self._dropping = True
        if self._dropping:
            if b0 & _FIN:
                self._dropping = False
            return
        if b0 & _FIN and not self._fragments:
            # A whole message in one frame: judged (unmasked only if a rule reads its bytes) and, if it
            # passes, forwarded as it came, re-masked towards the upstream.
            if checker.reads_payload(opcode):
                verdict = checker.check(opcode, self._payload(buf, pos, hlen, end), now)
            else:
                verdict = checker.check_size(end - pos - hlen, now)
            if verdict is None:
                self._outgoing(buf, pos, hlen, end, pieces)
            else:
                self._refuse(checker, verdict)
            return
        self._fragments.append(self._payload(buf, pos, hlen, end))
        if not b0 & _FIN:
            return
        payload = b"".join(self._fragments)
        self._fragments = []
        verdict = checker.check(self._message_opcode, payload, now)
        if verdict is None:
            mask = _masks.next() if self._recv_masked else None
            pieces.append(encode_frame(self._message_opcode, payload, mask))
        else:
            self._refuse(checker, verdict)

    @staticmethod
    def _refuse(checker: MessageChecker, verdict: tuple[int, str]) -> None:
        """A message broke a rule: count it as dropped, or raise to close the offender.

        Raises:
            ProtocolError: the rule is in "close" mode.
        """
        if not checker.drops(verdict):
            raise ProtocolError(verdict[1], verdict[0])
        checker.dropped += 1

    def _payload(self, buf: bytes | bytearray, pos: int, hlen: int, end: int) -> bytes | bytearray:
        """A frame's payload, unmasked."""
        if self._recv_masked:
            return apply_mask(buf[pos + hlen : end], bytes(buf[pos + hlen - 4 : pos + hlen]))
        return bytes(buf[pos + hlen : end])

    def _flush(self, buf: bytes | bytearray, pos: int, pieces: list[bytes | bytearray]) -> None:
        """Write what :meth:`_relay_frames` accepted so far to the other side, in one call."""
        if self._recv_masked or self.checker is not None:
            if len(pieces) == 1:
                self.peer.transport.write(pieces[0])
            elif len(pieces) <= 16:
                # a few (large) frames: hand the pieces over without copying them into one buffer
                self.peer.transport.writelines(pieces)
            elif pieces:
                # many small frames: one joined write is cheaper than many pieces
                self.peer.transport.write(b"".join(pieces))
        elif pos:
            # Server frames travel unchanged: everything consumed so far is one contiguous run.
            self.peer.transport.write(buf if pos == len(buf) and isinstance(buf, bytes) else bytes(buf[:pos]))

    def _handle_close(self, payload: bytes | bytearray) -> None:
        try:
            code, reason = parse_close(payload)
        except ProtocolError as error:
            self._fail(error.code, str(error))
            return
        self.close_received = True
        self.session.note_close(self.name, code, reason)
        peer = self.peer
        if not peer.close_sent and not peer.lost:
            peer._send_close_payload(payload)
        if self.close_sent:
            self._shutdown()
        elif peer.lost:
            # No reply will come from the other side: answer this side with its own code.
            self._send_close_payload(payload)

    def _skip_until_close(self, buf: bytes | bytearray) -> int:
        """After a close was sent, frames are dropped until this side's close frame arrives."""
        size = len(buf)
        pos = 0
        while size - pos >= 2:
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            hlen = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                hlen = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hlen = 10
            if b1 & 0x80:
                hlen += 4
            if length > self._max_message_bytes:
                self._shutdown(abort=True)
                return size
            end = pos + hlen + length
            if end > size:
                break
            if buf[pos] & 0x0F == _CLOSE:
                payload: bytes | bytearray = bytes(buf[pos + hlen : end])
                if b1 & 0x80:
                    payload = apply_mask(payload, bytes(buf[pos + hlen - 4 : pos + hlen]))
                self._handle_close(payload)
                return end
            pos = end
        return pos

    # -- closing ------------------------------------------------------------------------

    def send_close(self, code: int, reason: str) -> None:
        """Send a close frame to this side (once), then wait ``close_timeout`` for its reply."""
        self._send_close_payload(close_payload(code, reason))

    def _send_close_payload(self, payload: bytes | bytearray) -> None:
        if self.close_sent or self.lost:
            return
        self.close_sent = True
        mask = _masks.next() if not self._recv_masked else None
        self.transport.write(encode_frame(_CLOSE, payload, mask))
        if self.close_received:
            self._shutdown()
            return
        # The other side may be paused by backpressure; it must read to see our close.
        self.transport.resume_reading()
        timeout = self.session.route.limits.close_timeout
        self._close_timer = self.session.loop.call_later(timeout, self._shutdown, True)

    def _fail(self, code: int, reason: str) -> None:
        """This side broke the protocol or a limit: it gets ``code``, the other side a plain going-away."""
        self.session.note_close("gateway", code, reason)
        self._send_close_payload(close_payload(code, reason))
        self.close_received = True  # read nothing more from an offender
        self._shutdown()
        if code == CloseCode.MESSAGE_TOO_BIG:
            self.oversized = True
            self.peer.send_close(CloseCode.GOING_AWAY, f"{self.name} sent a message over the size limit")
        elif self.name == "upstream":
            self.peer.send_close(CloseCode.BAD_GATEWAY, "upstream protocol error")
        else:
            self.peer.send_close(CloseCode.GOING_AWAY, "client closed by gateway")

    def _shutdown(self, abort: bool = False) -> None:
        """Both close frames crossed on this connection (or time ran out): close the socket.

        A graceful close waits for the write buffer to drain; a side that stopped reading would make it
        wait forever, so the socket is cut if it is not gone within ``close_timeout``.
        """
        self._cancel_close_timer()
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


def start_relay(
    session: Session,
    client_transport: asyncio.Transport,
    upstream_transport: asyncio.Transport,
    client_pending: bytes,
    upstream_pending: bytes,
    upstream_already_lost: bool,
) -> None:
    """Hand both connections to a new pair of legs and start reading.

    ``*_pending`` are the bytes that arrived right behind each side's handshake.
    """
    route = session.route
    now = _monotonic()
    client = Leg(
        session,
        "client",
        client_transport,
        route.client_rules.max_message_bytes if route.client_rules else route.limits.max_message_bytes,
        _checker(route.client_rules, route.message_rate, now),
    )
    upstream = Leg(
        session,
        "upstream",
        upstream_transport,
        route.upstream_rules.max_message_bytes if route.upstream_rules else route.limits.max_message_bytes,
        _checker(route.upstream_rules, None, now),
    )
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
        if not leg.transport.is_closing() and not leg.throttled:
            leg.transport.resume_reading()


def _checker(rules: MessageRules | None, rate: MessageRate | None, now: float) -> MessageChecker | None:
    """A checker when the direction has rules or a rate; None keeps the relay on its plainest path."""
    if rules is None and rate is None:
        return None
    if rules is None:
        rules = MessageRules(max_message_bytes=0, utf8=False)
    return MessageChecker(rules, rate, now)
