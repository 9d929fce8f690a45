"""WebSocket frames (RFC 6455 section 5), sans-I/O.

The relay reads frame headers straight out of the bytes a transport hands it and forwards payloads without
decoding them, so this module offers small functions over ``bytes`` rather than frame objects: creating an
object per frame is measurable on the hot path.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from enum import IntEnum
from typing import Final

from proxy.errors import CloseCode, ProtocolError


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 section 5.2)."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


DATA_OPCODES = frozenset({Opcode.CONT, Opcode.TEXT, Opcode.BINARY})
CONTROL_OPCODES = frozenset({Opcode.CLOSE, Opcode.PING, Opcode.PONG})

#: Close codes a peer may put on the wire (RFC 6455 7.4.1, 7.4.2 and the IANA registry); 1005, 1006 and 1015
#: are reserved for reporting and must never be sent. Written out, so that a code added to CloseCode for the
#: gateway's own use does not widen what a peer may send.
_WIRE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(client_key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    digest = hashlib.sha1(client_key.encode("ascii") + _GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def new_client_key() -> str:
    """A fresh ``Sec-WebSocket-Key``: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def is_valid_client_key(value: str) -> bool:
    """Whether a ``Sec-WebSocket-Key`` is base64 of exactly 16 bytes."""
    try:
        return len(base64.b64decode(value.encode("ascii"), validate=True)) == 16
    except ValueError:
        return False


def _apply_mask_bigint(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated, as one big-integer XOR (runs in C, no loop)."""
    length = len(data)
    if not length:
        return b""
    key = (mask * ((length >> 2) + 1))[:length]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


def _compiled_mask() -> Callable[[bytes, bytearray], None] | None:
    """aiohttp's compiled XOR, or None: aiohttp built without its extensions (AIOHTTP_NO_EXTENSIONS), or
    not for this platform."""
    try:
        from aiohttp._websocket.mask import _websocket_mask_cython  # type: ignore[import-not-found]
    except ImportError:
        return None
    mask: Callable[[bytes, bytearray], None] = _websocket_mask_cython
    return mask


_mask_cython: Final = _compiled_mask()

#: Which masking runs: "aiohttp-cython" (aiohttp's compiled XOR, 4-35x faster than the big-integer XOR
#: from 64 B to 64 KiB; aiohttp 3.11+, not a public API) or "python" (the big-integer XOR). The relay
#: masks every client frame, so the gateway logs this at start and a test asserts the fast one.
MASK_IMPLEMENTATION = "python" if _mask_cython is None else "aiohttp-cython"


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes | bytearray:
    """XOR ``data`` with the 4-byte ``mask`` repeated; masking and unmasking are the same operation.

    Returns a new buffer (``data`` is never changed).
    """
    if _mask_cython is None:  # pragma: no cover - the tests run with aiohttp's extensions (and assert it)
        return _apply_mask_bigint(data, mask)
    out = bytearray(data)
    _mask_cython(mask, out)
    return out


def mask_in_place(data: bytearray, mask: bytes) -> None:
    """XOR ``data`` with the 4-byte ``mask`` repeated, in place (a buffer the caller owns and hands on)."""
    if _mask_cython is None:  # pragma: no cover
        data[:] = _apply_mask_bigint(data, mask)
    else:
        _mask_cython(mask, data)


#: Masking keys drawn from the OS at once: 1024 keys.
_MASK_BATCH: Final = 4096


class MaskSource:
    """Unpredictable 4-byte masking keys, drawn from the OS in batches (off the hot path)."""

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = os.urandom(_MASK_BATCH)
        self._pos = 0

    def next(self) -> bytes:
        """The next masking key."""
        pos = self._pos
        if pos >= _MASK_BATCH:
            self._pool = os.urandom(_MASK_BATCH)
            pos = 0
        self._pos = pos + 4
        return self._pool[pos : pos + 4]


def encode_header(first_byte: int, length: int, mask: bytes | None) -> bytes:
    """A frame header: ``first_byte`` holds FIN, RSV and the opcode; ``mask`` for client-to-server frames."""
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        header = bytes((first_byte, mask_bit | length))
    elif length < 65536:
        header = bytes((first_byte, mask_bit | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((first_byte, mask_bit | 127)) + length.to_bytes(8, "big")
    return header + mask if mask is not None else header


def encode_frame(opcode: int, payload: bytes | bytearray, mask: bytes | None = None) -> bytes:
    """One whole (FIN) frame; the payload is masked with ``mask`` when given."""
    body = apply_mask(payload, mask) if mask is not None else payload
    return encode_header(0x80 | opcode, len(payload), mask) + body


def close_payload(code: int | None, reason: str = "") -> bytes:
    """The payload of a close frame; the reason is cut on a character boundary to fit 123 bytes."""
    if code is None:
        return b""
    raw = reason.encode("utf-8")
    if len(raw) > 123:
        raw = raw[:123].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + raw


def parse_close(payload: bytes | bytearray) -> tuple[int | None, str]:
    """The code and reason of a close frame's payload.

    Raises:
        ProtocolError: a one-byte payload, a code that may not be sent, or a reason that is not UTF-8 (1007).
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _WIRE_CLOSE_CODES and not 3000 <= code <= 4999:
        raise ProtocolError(f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8", CloseCode.INVALID_DATA) from None
    return code, reason
