"""The frame core: the frames one side of a session sends, read sans-I/O (RFC 6455 section 5).

A :class:`FrameReader` is fed the bytes one side sent (:meth:`FrameReader.receive_data`) and returns what
to forward to the other side; what else happened in that call is in :attr:`FrameReader.events` (its close
frame arrived, or it broke the protocol, a limit or a rule and must be closed). It owns no transport, no
timer and no clock: the relay (:mod:`proxy.relay`) is a thin adapter that writes what it returns, sends
the close frames it asks for and keeps the time.

Frames are forwarded as they arrive, a frame's payload even before the frame is whole: towards the
upstream re-masked with a fresh key (a gateway must not let a client choose the bytes on the upstream's
wire), towards a client byte for byte. Only a message a rule must read whole (JSON, a schema, a content
rule in "drop" mode) is gathered, in one contiguous buffer; UTF-8 is checked as the fragments pass.

Memory bound, by construction: between two calls a reader holds at most one partial frame header or one
partial control frame (14 + 125 bytes) -- or, after a read of more than FRAMES_PER_TURN frames, the rest of
that read, waiting for its turn --, a few bytes of an incomplete UTF-8 sequence, up to HOLD_BYTES of a
frame's payload that arrived in smaller pieces, and the message it is gathering (at most
``max_message_bytes``). Nothing is kept per fragment: a message is refused with 1009
when it is larger than ``max_message_bytes`` (known from the frame headers, before any of the payload is
read) or comes in more than ``max_fragments`` frames, empty ones included.

After the gateway closed a side (:meth:`FrameReader.discard`, or a failure), the reader keeps parsing that
side's frames only to skip them, counting payload bytes rather than holding them, until its close frame.
"""

from __future__ import annotations

from codecs import utf_8_decode
from enum import IntFlag
from typing import Final

from proxy.deflate import Deflater, Inflater
from proxy.errors import MessageTooBig, PeerError, ProtocolError, RuleBroken
from proxy.frames import (
    MaskSource,
    apply_mask,
    encode_frame,
    encode_header,
    mask_in_place,
    parse_close,
)
from proxy.rules import MessageChecker, Violation

#: Whether this module runs compiled (the mypyc extension the build makes when it has a C compiler) or
#: interpreted (the same source, installed as it is): the gateway logs it at start.
COMPILED: Final = __file__.endswith((".so", ".pyd"))

#: Frames read in one turn at most: a read of 256 KiB of empty frames is 43,000 of them, and other
#: sessions wait while one turn runs (about 2 µs a frame).
FRAMES_PER_TURN: Final = 2048
#: Pieces of a frame smaller than this are held until this much (or the frame's end) arrived.
HOLD_BYTES: Final = 4096
#: Inflated bytes one turn produces at most before the rest of its read waits for the next turn (and for
#: the other side's write buffer to drain): 256 KiB read can inflate to far more than 256 KiB written.
TURN_INFLATED_BYTES: Final = 1 << 20

#: What happens to the payload of the frame being read (RFC 7692: _TRANSCODE inflated and/or compressed
#: again, _SHADOW passed on compressed as it came while a shadow inflater keeps its size and context).
_FORWARD: Final = 0
_UTF8: Final = 1
_GATHER: Final = 2
_SKIP: Final = 3
_TRANSCODE: Final = 4
_SHADOW: Final = 5
_TEXT: Final = 0x1
_CLOSE: Final = 0x8
_PING: Final = 0x9
_PONG: Final = 0xA
_FIN: Final = 0x80
_RSV: Final = 0x70
_RSV1: Final = 0x40
_RSV23: Final = 0x30

#: One source of masking keys per process: a key per frame sent upstream, and the payloads of pings.
MASKS: Final = MaskSource()


class Events(IntFlag):
    """What a :meth:`FrameReader.receive_data` call found besides frames to forward."""

    NONE = 0
    #: The side broke the protocol, a limit or a rule: close it with ``fail_code``/``fail_reason``.
    FAIL = 1
    #: The side's close frame arrived (``close_payload``, ``close_code``, ``close_reason``).
    CLOSE = 2


def _rotate(key: bytes, offset: int) -> bytes:
    """The masking key for a payload piece that starts ``offset`` bytes into its frame."""
    shift = offset & 3
    return key[shift:] + key[:shift] if shift else key


class FrameReader:
    """One side's frames: parsed, checked and turned into bytes for the other side.

    ``masked`` is True for a client (its frames carry a masking key, RFC 6455 5.3; frames to it do not),
    False for the upstream (the gateway is its client: frames from it are unmasked, frames to it masked).
    """

    __slots__ = (
        "_compressed",
        "_compressed_limit",
        "_fin",
        "_fragments",
        "_frame_key",
        "_gathered",
        "_hold",
        "_in_message",
        "_inflated",
        "_message_bytes",
        "_message_mode",
        "_message_opcode",
        "_mode",
        "_offset",
        "_out_opcode",
        "_out_started",
        "_partial",
        "_partial_at",
        "_remaining",
        "_turn_bytes",
        "_utf8_tail",
        "backlogged",
        "bytes",
        "checker",
        "close_code",
        "close_payload",
        "close_reason",
        "deflated",
        "deflater",
        "discarding",
        "events",
        "fail_code",
        "fail_reason",
        "inflated",
        "inflater",
        "last_data",
        "masked",
        "max_fragments",
        "max_message_bytes",
        "messages",
        "oversized",
        "passed",
        "passthrough",
        "ping_payload",
    )

    def __init__(
        self,
        masked: bool,
        max_message_bytes: int,
        max_fragments: int,
        checker: MessageChecker | None = None,
        inflater: Inflater | None = None,
        deflater: Deflater | None = None,
        passthrough: bool = False,
    ) -> None:
        self.masked = masked
        self.max_message_bytes = max_message_bytes
        self.max_fragments = max_fragments
        #: permessage-deflate (RFC 7692): the inflater of this side's compressed messages when its hop
        #: negotiated the extension (else RSV1 is a protocol error), and the deflater of the messages it
        #: sends when the other hop did (else they go plain).
        self.inflater = inflater
        self.deflater = deflater
        #: Compressed messages pass to the other side as they came (both hops agreed to compatible
        #: parameters, and no rule gathers this direction's messages or drops one): the inflater only
        #: counts their size, checks UTF-8 and keeps the context. Set with an inflater and without a
        #: deflater (plain messages pass plain).
        self.passthrough = passthrough
        #: Messages from this side that arrived compressed, messages compressed for the other side, and
        #: compressed messages passed on as they came.
        self.inflated = 0
        self.deflated = 0
        self.passed = 0
        #: A compressed message's wire bytes may exceed what it inflates to by a little (stored blocks,
        #: flushes); more than this is no deflate stream a real compressor writes.
        self._compressed_limit = max_message_bytes + (max_message_bytes >> 3) + 1024
        self._compressed = 0
        self._inflated = 0
        self._out_started = False
        self._turn_bytes = 0
        #: The direction's message rules, or None when only frame syntax and size are checked.
        self.checker = checker
        #: What the last receive_data call found, besides frames to forward.
        self.events = Events.NONE
        #: Whether the last call stopped after FRAMES_PER_TURN frames: the rest of its input waits for a
        #: ``receive_data(b"")`` (the relay stops reading this side meanwhile).
        self.backlogged = False
        self.fail_code = 0
        self.fail_reason = ""
        #: The side's close frame, once it arrived: its payload (b"" for none, or for an invalid one) and
        #: that payload parsed.
        self.close_payload: bytes | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        #: After the gateway closed this side: frames are skipped until its close frame.
        self.discarding = False
        #: Data messages and payload bytes received (those skipped from their first frame excluded; a
        #: compressed message's bytes as it inflated).
        self.messages = 0
        self.bytes = 0
        #: Whether this side was closed for a message over the size or fragment limit.
        self.oversized = False
        #: When the last data frame header arrived (the time passed to receive_data): for idle_timeout.
        self.last_data = 0.0
        #: The payload of the gateway's ping still unanswered, or None.
        self.ping_payload: bytes | None = None
        #: Bytes not read yet, from ``_partial_at`` on: a partial header or control frame, or the rest of a
        #: read waiting for its turn (kept whole with an offset, not copied at every turn).
        self._partial = b""
        self._partial_at = 0
        self._remaining = 0
        self._offset = 0
        self._mode = _FORWARD
        self._fin = False
        self._frame_key = b""
        self._out_opcode = 0
        self._in_message = False
        self._message_opcode = 0
        self._message_mode = _FORWARD
        self._message_bytes = 0
        self._fragments = 0
        self._gathered = bytearray()
        self._hold = bytearray()
        self._utf8_tail = b""

    # -- what the adapter asks for ---------------------------------------------------------------

    def discard(self) -> None:
        """This side's frames have nowhere to go (the other side was closed or is gone) or this side broke
        a rule: from now on they are skipped, by counting, until its close frame."""
        self.discarding = True
        self._gathered = bytearray()
        self._hold = bytearray()
        self._utf8_tail = b""
        if self._remaining:
            self._mode = _SKIP

    def ping(self) -> bytes:
        """A ping frame for this side, with a fresh payload that its pong must echo."""
        payload = MASKS.next()
        self.ping_payload = payload
        return encode_frame(_PING, payload, None if self.masked else MASKS.next())

    def frame_to_side(self, opcode: int, payload: bytes | bytearray) -> bytes:
        """A whole frame the gateway sends to this side (masked towards the upstream)."""
        return encode_frame(opcode, payload, None if self.masked else MASKS.next())

    def buffered_bytes(self) -> int:
        """Bytes held between calls: the partial header or control frame (or the rest of a read waiting
        for its turn), the UTF-8 tail, the held piece of a frame and the message being gathered (what the
        memory bound in the module docstring counts)."""
        held = len(self._partial) - self._partial_at
        return held + len(self._utf8_tail) + len(self._gathered) + len(self._hold)

    # -- bytes in ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[bytes | bytearray]:
        """Read ``data``, sent by this side at ``now`` (monotonic seconds); return the bytes to write to
        the other side, in order. What else happened is in :attr:`events`."""
        self.events = Events.NONE
        self.backlogged = False
        self._turn_bytes = 0
        pieces: list[bytes | bytearray] = []
        if self.close_payload is not None:
            return pieces  # nothing may follow a close frame (RFC 6455 5.5.1)
        start = 0
        if self._partial:
            partial, start = self._partial, self._partial_at
            self._partial, self._partial_at = b"", 0
            if data:
                data, start = partial[start:] + data, 0  # a partial header: a few bytes before the read
            else:
                data = partial  # a backlog's next turn, read where the last one stopped
        self._read(data, start, now, pieces)
        return pieces

    def _read(self, buf: bytes, pos: int, now: float, pieces: list[bytes | bytearray]) -> None:
        """Read the frames in ``buf[pos:]``, appending what the other side gets to ``pieces``.

        Written for speed: this loop runs once per frame, so it reads the header with indexing and
        integer arithmetic. Whole frames that pass unchanged (towards a client) are appended as runs of
        ``buf``, not one piece per frame. A frame that is not whole in ``buf`` is passed on as the pieces
        of it that arrived, each as a frame of its own (RFC 6455 5.4 lets an intermediary change the
        fragmentation of a message): the other side is always left at a frame boundary, so a close frame
        can follow at any time, and nothing of a payload is held back.
        """
        size = len(buf)
        if self._remaining:
            take = min(self._remaining, size - pos)
            ok = self._part(buf, pos, pos + take, pieces)
            pos += take
            if ok and self._remaining:
                return
            if not ok or not self._frame_done(pieces):
                self._read(buf, pos, now, pieces)  # the rest, skipped until the close frame
                return
        masked = self.masked
        mask_bit = 0x80 if masked else 0
        checker = self.checker
        deflater = self.deflater
        run = -1  # start of the bytes passed on unchanged since then (frames from the upstream only)
        length = hlen = 0
        opcode = -1
        budget = FRAMES_PER_TURN
        try:
            while size - pos >= 2:
                if not budget:
                    self.backlogged = True  # the rest waits for its turn: other sessions go first
                    break
                budget -= 1
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
                if b1 & 0x80:
                    hlen += 4
                if size - pos < hlen:
                    break
                opcode = b0 & 0x0F
                end = pos + hlen + length
                if self.discarding:
                    if opcode == _CLOSE and length <= 125:
                        if end > size:
                            break
                        self._close(buf, pos, hlen, end, b1 & 0x80)
                        return
                    # Skipped by counting, never held; a bad close frame here is skipped too: the
                    # gateway already closed this side and only waits for it to finish.
                    self._mode = _SKIP
                    self._fin = False
                    self._remaining = length
                    pos += hlen
                    take = length if length < size - pos else size - pos
                    self._remaining -= take
                    pos += take
                    continue
                if (b1 & 0x80) != mask_bit:
                    raise ProtocolError(
                        "unmasked frame from the client" if masked else "masked frame from the upstream"
                    )
                if b0 & _RSV:
                    if b0 & _RSV23 or self.inflater is None:
                        raise ProtocolError("reserved bits set, but no extension was negotiated")
                    if opcode & 0x8 or opcode == 0:
                        # RFC 7692 6: RSV1 marks a compressed message on its first frame only.
                        raise ProtocolError("RSV1 set on a control frame or a continuation")
                if (b1 & 0x7F == 126 and length < 126) or (b1 & 0x7F == 127 and length < 65536):
                    raise ProtocolError("frame length not in its shortest form")  # RFC 6455 5.2
                if length >> 63:
                    raise ProtocolError("frame length over 2**63 - 1")
                if opcode & 0x8:
                    # -- a control frame: acted on when whole (at most 125 bytes) ----------------------
                    if not b0 & _FIN or length > 125:
                        raise ProtocolError("control frame fragmented or longer than 125 bytes")
                    if opcode > _PONG:
                        raise ProtocolError(f"unknown opcode {opcode}")
                    if end > size:
                        break
                    if opcode == _CLOSE:
                        if run >= 0:
                            pieces.append(buf[run:pos])
                            run = -1
                        if checker is not None:
                            checker.control(now, refuse=False)
                        self._close(buf, pos, hlen, end, masked)
                        return
                    if (
                        opcode == _PONG
                        and self.ping_payload is not None
                        and self._control_payload(buf, pos, hlen, end) == self.ping_payload
                    ):
                        self.ping_payload = None  # the answer to the gateway's ping: consumed
                        forward = False
                    elif checker is not None and (violation := checker.control(now)) is not None:
                        if not violation.drop:
                            raise RuleBroken(violation)
                        checker.dropped += 1
                        forward = False
                    else:
                        forward = True
                    if masked:
                        if forward:
                            self._remask(buf, pos, hlen, end, pieces)
                    elif not forward:
                        if run >= 0:
                            pieces.append(buf[run:pos])
                            run = -1
                    elif run < 0:
                        run = pos
                    pos = end
                    continue
                # -- a data frame ----------------------------------------------------------------------
                if opcode == 0:
                    if not self._in_message:
                        raise ProtocolError("continuation frame outside a message")
                    self._fragments += 1
                    if self._fragments > self.max_fragments:
                        raise MessageTooBig(f"message in more than {self.max_fragments} fragments")
                    total = self._message_bytes + length
                    compressed = self._compressed
                    if total > (self._compressed_limit if compressed else self.max_message_bytes):
                        raise MessageTooBig(f"message larger than {self.max_message_bytes} bytes")
                    mode = self._message_mode
                    if checker is not None and mode != _SKIP:
                        violation = checker.more(length, now)
                        if violation is not None:
                            raise RuleBroken(violation)
                else:
                    if opcode > 2:
                        raise ProtocolError(f"unknown opcode {opcode}")
                    if self._in_message:
                        raise ProtocolError("new message before the previous one ended")
                    # A compressed message's size is known only as it inflates: its wire bytes are bounded
                    # here, what it inflates to by the inflater.
                    compressed = b0 & _RSV1
                    if length > (self._compressed_limit if compressed else self.max_message_bytes):
                        raise MessageTooBig(f"message larger than {self.max_message_bytes} bytes")
                    self._compressed = compressed
                    if compressed:
                        self._inflated = 0
                    total = length
                    self._fragments = 1
                    self._message_opcode = opcode
                    mode = _FORWARD
                    if checker is not None:
                        violation = checker.start(opcode, length, now)
                        if violation is not None:
                            if not violation.drop:
                                raise RuleBroken(violation)
                            checker.dropped += 1
                            mode = _SKIP
                        elif opcode == _TEXT:
                            if checker.gathers_text:
                                mode = _GATHER
                            elif checker.utf8_text:
                                mode = _UTF8
                                self._utf8_tail = b""
                    self._message_mode = mode
                fin = b0 & _FIN
                self._in_message = not fin
                self._message_bytes = 0 if fin else total
                self.last_data = now
                if mode != _SKIP and not compressed:
                    self.bytes += length  # a compressed message's are counted as it inflates
                if (compressed or deflater is not None) and (mode != _SKIP or compressed):
                    # _SHADOW: passed on as it came, its first frame header keeping RSV1. _TRANSCODE:
                    # inflated, checked, and compressed again (or sent plain); a dropped compressed
                    # message is inflated too, so that the context of the next one stays right.
                    mode = _SHADOW if compressed and self.passthrough else _TRANSCODE
                if end <= size and mode <= _UTF8:
                    # The common case, written out: a whole frame passed on.
                    if mode == _UTF8:
                        plain = self._plain(buf, pos + hlen, end, pos + hlen - 4, 0)
                        if not self._utf8_ok(plain, bool(fin)):
                            raise RuleBroken(self._invalid_utf8())
                        if masked:
                            new_key = MASKS.next()
                            _append_small(
                                pieces, buf[pos : pos + hlen - 4] + new_key, apply_mask(plain, new_key)
                            )
                        elif run < 0:
                            run = pos
                    elif masked:
                        self._remask(buf, pos, hlen, end, pieces)
                    elif run < 0:
                        run = pos
                    if fin:
                        self.messages += 1
                    pos = end
                    continue
                if run >= 0:
                    pieces.append(buf[run:pos])
                    run = -1
                self._fin = bool(fin)
                self._mode = mode
                self._remaining = length
                self._offset = 0
                self._out_opcode = (opcode | _RSV1) if mode == _SHADOW and opcode else opcode
                if masked:
                    self._frame_key = buf[pos + hlen - 4 : pos + hlen]
                pos += hlen
                take = length if length < size - pos else size - pos
                ok = self._part(buf, pos, pos + take, pieces)
                pos += take
                if ok and self._remaining:
                    return
                if not ok or not self._frame_done(pieces):
                    self._read(buf, pos, now, pieces)
                    return
                if self._turn_bytes > TURN_INFLATED_BYTES:
                    budget = 0  # the rest of the read waits for its turn
        except PeerError as error:
            if run >= 0:
                pieces.append(buf[run:pos])
            if isinstance(error, MessageTooBig):
                self.oversized = True
            self._fail(error.code, error.reason)
            if opcode == _CLOSE:
                # A broken close frame (a ProtocolError) is still the side's close: it will send no other.
                self.close_payload = b""
                self.events |= Events.CLOSE
                return
            # The offending frame's payload is skipped, then whatever follows it, until a close frame.
            self._remaining = length
            self._read(buf, pos + hlen, now, pieces)
            return
        if run >= 0 and pos > run:
            pieces.append(buf if run == 0 and pos == size else buf[run:pos])
        if pos < size:
            # a frame header or a control frame of 125 bytes, or the rest of a read left for the next turn
            self._partial, self._partial_at = buf, pos

    # -- helpers of _read ----------------------------------------------------------------------------

    def _remask(self, buf: bytes, pos: int, hlen: int, end: int, pieces: list[bytes | bytearray]) -> None:
        """A whole client frame, re-masked with a fresh key. A small frame's payload is unmasked, then
        masked (two XORs over a few bytes cost less than combining the keys); a large one's is XORed once
        with the combined key, and its header and payload stay separate pieces: joining them would copy
        the payload."""
        new_key = MASKS.next()
        key_at = pos + hlen - 4
        if end - pos < 4096:
            payload = bytearray(buf[key_at + 4 : end])
            mask_in_place(payload, buf[key_at : key_at + 4])
            mask_in_place(payload, new_key)
            _append_small(pieces, buf[pos:key_at] + new_key, payload)
            return
        combined = (
            int.from_bytes(buf[key_at : key_at + 4], "little") ^ int.from_bytes(new_key, "little")
        ).to_bytes(4, "little")
        pieces.append(buf[pos:key_at] + new_key)
        pieces.append(apply_mask(buf[key_at + 4 : end], combined))

    def _plain(self, buf: bytes, start: int, stop: int, key_at: int, offset: int) -> bytes | bytearray:
        """Payload bytes ``buf[start:stop]`` unmasked (the key at ``key_at``; ``offset`` into the frame)."""
        if not self.masked:
            return buf[start:stop]
        key = buf[key_at : key_at + 4] if key_at >= 0 else self._frame_key
        return apply_mask(buf[start:stop], _rotate(key, offset))

    def _control_payload(self, buf: bytes, pos: int, hlen: int, end: int) -> bytes:
        return bytes(self._plain(buf, pos + hlen, end, pos + hlen - 4, 0))

    def _utf8_ok(self, plain: bytes | bytearray, final: bool) -> bool:
        """Whether the text so far is UTF-8; an incomplete character at the end waits for the next piece
        (at most three bytes are kept)."""
        tail = self._utf8_tail
        if tail:
            plain = tail + plain
        try:
            used = utf_8_decode(plain, "strict", final)[1]
        except UnicodeDecodeError:
            return False
        self._utf8_tail = bytes(plain[used:]) if used < len(plain) else b""
        return True

    def _invalid_utf8(self) -> Violation:
        assert self.checker is not None
        return self.checker.invalid_utf8()

    def _close(self, buf: bytes, pos: int, hlen: int, end: int, masked: int | bool) -> None:
        """The side's close frame: validated (a bad one is a failure, answered 1002 or 1007), reported."""
        payload = (
            bytes(self._plain(buf, pos + hlen, end, pos + hlen - 4, 0)) if masked else buf[pos + hlen : end]
        )
        try:
            self.close_code, self.close_reason = parse_close(payload)
        except ProtocolError as error:
            if not self.discarding:
                self._fail(error.code, error.reason)
            self.close_code, self.close_reason = None, ""
            payload = b""
        self.close_payload = payload
        self.events |= Events.CLOSE

    def _part(self, buf: bytes, start: int, stop: int, pieces: list[bytes | bytearray]) -> bool:
        """Act on ``buf[start:stop]``, the next payload bytes of the frame being read; False when they
        broke a rule (the failure is recorded)."""
        count = stop - start
        self._remaining -= count
        mode = self._mode
        if mode == _SKIP:
            return True
        offset = self._offset
        self._offset = offset + count
        last = not self._remaining
        if not count and not last:
            return True  # the header alone arrived: nothing to pass on yet
        if mode == _TRANSCODE:
            return self._transcode(self._plain(buf, start, stop, -1, offset), last and self._fin, pieces)
        if mode == _SHADOW:
            if not self._shadow(self._plain(buf, start, stop, -1, offset), last and self._fin):
                return False
            mode = _FORWARD  # the compressed bytes, passed on as they came
        if mode == _GATHER:
            self._gathered += self._plain(buf, start, stop, -1, offset)
            return True
        plain: bytes | bytearray | None = None
        if mode == _UTF8:
            plain = self._plain(buf, start, stop, -1, offset)
            if not self._utf8_ok(plain, last and self._fin):
                violation = self._invalid_utf8()
                self._fail(violation.code, violation.reason)
                return False
        if self._hold or (count < HOLD_BYTES and not last):
            # Small pieces of a frame (a sender trickling its bytes) are held until HOLD_BYTES or the
            # frame's end, so the other side gets at most one frame per HOLD_BYTES of payload.
            self._hold += plain if plain is not None else self._plain(buf, start, stop, -1, offset)
            if len(self._hold) < HOLD_BYTES and not last:
                return True
            plain, self._hold = self._hold, bytearray()
            mode = _UTF8  # passed on as plain bytes
            count = len(plain)
        first_byte = (_FIN if last and self._fin else 0) | self._out_opcode
        self._out_opcode = 0
        if mode == _UTF8:
            assert plain is not None
            if self.masked:
                new_key = MASKS.next()
                pieces.append(encode_header(first_byte, count, new_key) + apply_mask(plain, new_key))
            else:
                pieces.append(encode_header(first_byte, count, None) + plain)
            return True
        if self.masked:
            new_key = MASKS.next()
            combined = (
                int.from_bytes(_rotate(self._frame_key, offset), "little") ^ int.from_bytes(new_key, "little")
            ).to_bytes(4, "little")
            pieces.append(encode_header(first_byte, count, new_key))
            pieces.append(apply_mask(buf[start:stop], combined))
        else:
            pieces.append(encode_header(first_byte, count, None))
            pieces.append(buf[start:stop])
        return True

    def _frame_done(self, pieces: list[bytes | bytearray]) -> bool:
        """The frame being read is complete; at the end of a message, act on it. False on a failure."""
        if not self._fin:
            return True
        mode = self._mode
        if mode == _SHADOW:
            self.inflated += 1
            self.passed += 1
        transcoding = mode == _TRANSCODE
        if transcoding:
            mode = self._message_mode
            if self._compressed and mode != _SKIP:
                self.inflated += 1
        if mode == _GATHER:
            checker = self.checker
            assert checker is not None
            gathered, self._gathered = self._gathered, bytearray()
            violation = checker.content(self._message_opcode, gathered)
            if violation is not None:
                if not violation.drop:
                    self._fail(violation.code, violation.reason)
                    return False
                checker.dropped += 1
                return True
            if transcoding:
                self._emit(gathered, True, pieces)
                self.messages += 1
                return True
            # Header and payload as two pieces, masked in place: the gathered buffer is handed over as it
            # is, not copied once more.
            key = MASKS.next() if self.masked else None
            pieces.append(encode_header(_FIN | self._message_opcode, len(gathered), key))
            if key is not None:
                mask_in_place(gathered, key)
            pieces.append(gathered)
        if mode != _SKIP:
            self.messages += 1
        return True

    def _transcode(self, data: bytes | bytearray, final: bool, pieces: list[bytes | bytearray]) -> bool:
        """The next payload bytes of a message that is compressed on this hop, or is to be compressed for
        the other: inflated (within what the message may still grow by), checked as the message's mode
        says, and passed on. False when they broke a limit, the stream or a rule (the failure is
        recorded)."""
        if self._compressed:
            assert self.inflater is not None
            try:
                data = self.inflater.inflate(data, final, self.max_message_bytes - self._inflated)
            except PeerError as error:
                if isinstance(error, MessageTooBig):
                    self.oversized = True
                self._fail(error.code, error.reason)
                return False
            self._inflated += len(data)
            if self._message_mode != _SKIP:
                self.bytes += len(data)
        self._turn_bytes += len(data)
        mode = self._message_mode
        if mode == _SKIP:
            return True  # a dropped message, inflated only to keep the context
        if mode == _GATHER:
            self._gathered += data
            return True
        if mode == _UTF8 and not self._utf8_ok(data, final):
            violation = self._invalid_utf8()
            self._fail(violation.code, violation.reason)
            return False
        self._emit(data, final, pieces)
        return True

    def _shadow(self, data: bytes | bytearray, final: bool) -> bool:
        """The next compressed bytes of a message passed on as it came: inflated only to count its size
        (1009 past the limit, 1007 for a corrupt stream, as for any compressed message), to check UTF-8
        as the text passes, and to keep the context the next message needs; the inflated bytes are then
        dropped. False on a failure."""
        assert self.inflater is not None
        try:
            out = self.inflater.inflate(data, final, self.max_message_bytes - self._inflated)
        except PeerError as error:
            if isinstance(error, MessageTooBig):
                self.oversized = True
            self._fail(error.code, error.reason)
            return False
        if self._message_mode == _UTF8 and not self._utf8_ok(out, final):
            violation = self._invalid_utf8()
            self._fail(violation.code, violation.reason)
            return False
        inflated = len(out)
        self._inflated += inflated
        self.bytes += inflated
        self._turn_bytes += inflated
        return True

    def _emit(self, data: bytes | bytearray, final: bool, pieces: list[bytes | bytearray]) -> None:
        """Pass on the next plain bytes of a message: compressed when the other hop negotiated
        permessage-deflate (RSV1 on its first frame), else as they are. Small pieces are held until
        HOLD_BYTES (zlib holds them itself when compressing), so the other side gets few frames."""
        deflater = self.deflater
        if deflater is not None:
            payload: bytes | bytearray = deflater.deflate(data, final)
            if final:
                self.deflated += 1
        else:
            if self._hold or (len(data) < HOLD_BYTES and not final):
                self._hold += data
                if len(self._hold) < HOLD_BYTES and not final:
                    return
                data, self._hold = self._hold, bytearray()
            payload = data
        if not payload and not final:
            return
        if self._out_started:
            first_byte = _FIN if final else 0
        else:
            first_byte = (
                (_FIN if final else 0) | self._message_opcode | (_RSV1 if deflater is not None else 0)
            )
        self._out_started = not final
        if self.masked:
            key = MASKS.next()
            pieces.append(encode_header(first_byte, len(payload), key) + apply_mask(payload, key))
        else:
            pieces.append(encode_header(first_byte, len(payload), None))
            pieces.append(payload)

    def _fail(self, code: int, reason: str) -> None:
        """The side broke a rule, a limit or the protocol: report it, and skip its frames from now on."""
        self.events |= Events.FAIL
        self.fail_code = code
        self.fail_reason = reason
        self.discard()
        self._in_message = False
        self._mode = _SKIP
        self._fin = False


def _append_small(pieces: list[bytes | bytearray], head: bytes, payload: bytes | bytearray) -> None:
    """Add a small re-masked frame to the last piece when that is a buffer of such frames: a read of many
    tiny frames would otherwise hold one object per frame until it is written (a 256 KiB read of empty
    frames is 43,000 of them)."""
    if pieces:
        last = pieces[-1]
        if isinstance(last, bytearray) and len(last) < 65536:
            last += head
            last += payload
            return
    joined = bytearray(head)
    joined += payload
    pieces.append(joined)
