"""permessage-deflate (RFC 7692), sans-I/O: what each hop agreed to, and a bounded inflater and a deflater.

The two hops of a session are negotiated independently: the gateway is the server of the client's hop
(:func:`accept_client_offer` reads the client's offers and writes the answer) and the client of the
upstream's (:data:`UPSTREAM_OFFER` is what it offers, :func:`read_upstream_answer` validates the answer).
Each yields :class:`Agreement` (or None: no compression on that hop), from which the frame core builds
the :class:`Inflater` for the messages that hop sends and the :class:`Deflater` for those it gets.

Guarantees:

- inflation is bounded as it happens: :meth:`Inflater.inflate` never produces more than the bytes the
  message may still grow by (plus one, to know it is over); a 64 MiB bomb on a 1 MiB route costs at most
  1 MiB of output, then :class:`~proxy.errors.MessageTooBig` (1009). A corrupt stream is a
  :class:`~proxy.errors.ProtocolError` with 1007, as python-websockets closes it;
- memory: zlib objects are made on a hop's first compressed message, not at the handshake, so an idle
  session costs nothing here; the gateway's own deflaters use a 4 KiB window and memLevel 5 (about 38 KiB
  each, python-websockets' choice), its inflaters the window the sender may use (about 7 KiB plus
  2**window_bits); with no_context_takeover a zlib object lives for one message only;
- a malformed or unacceptable offer from a client is declined (the next one may be accepted), never an
  error: the client then talks uncompressed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.errors import CloseCode, MessageTooBig, ProtocolError, UpstreamError

#: What RFC 7692 7.2.2 says to append to a message's compressed payload before inflating its end (and what
#: a sync flush ends with: removed from a message the gateway compresses, 7.2.1).
EMPTY_BLOCK = b"\x00\x00\xff\xff"
EXTENSION = "permessage-deflate"
#: The window the gateway compresses with when the peer lets it choose (a smaller window than agreed is
#: always allowed: the peer's inflater reads any distance up to its own window): 2**12 bytes.
DEFLATE_WINDOW_BITS = 12
#: zlib's memLevel for the gateway's deflaters: 2**(5+9) bytes of hash tables instead of 2**17 at level 8.
DEFLATE_MEM_LEVEL = 5
#: The window the gateway asks a client to compress with, when the client offers to limit it.
CLIENT_WINDOW_BITS = 13
#: What the gateway offers the upstream: compression with any window the upstream likes, and the
#: upstream may limit the gateway's window (client_max_window_bits without a value, RFC 7692 7.1.2.2).
UPSTREAM_OFFER = f"{EXTENSION}; client_max_window_bits"

_PARAMETERS = frozenset(
    {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
)


@dataclass(frozen=True, slots=True)
class Agreement:
    """What one hop agreed to, seen from the gateway: how that hop's peer compresses (``peer_*``) and how
    the gateway may compress to it (``gateway_*``).

    ``gateway_window_bits`` is 0 when the gateway may not compress to that peer (it agreed to a window of
    8 bits, which zlib cannot produce for a raw stream): messages to it are then sent uncompressed, as
    RFC 7692 allows for any message.
    """

    #: The header value as it went on the wire (the 101's answer, or the upstream's answer).
    header: str
    peer_no_context_takeover: bool
    peer_window_bits: int
    gateway_no_context_takeover: bool
    gateway_window_bits: int
    #: The largest window the peer lets the gateway compress with (15 when it set none).
    gateway_max_window_bits: int = 15

    def inflater(self) -> Inflater:
        """An inflater for the messages this hop's peer sends."""
        return Inflater(self.peer_window_bits, self.peer_no_context_takeover)

    def passes_to(self, receiver: Agreement) -> bool:
        """Whether the messages this hop's peer compresses can pass, compressed as they are, to the peer
        of ``receiver``'s hop: their window fits what that peer lets the gateway use, and they keep no
        context where that peer required the gateway not to."""
        return self.peer_window_bits <= receiver.gateway_max_window_bits and (
            self.peer_no_context_takeover or not receiver.gateway_no_context_takeover
        )

    def deflater(self) -> Deflater | None:
        """A deflater for the messages the gateway sends to this hop's peer, or None for plain ones."""
        if not self.gateway_window_bits:
            return None
        return Deflater(self.gateway_window_bits, self.gateway_no_context_takeover)


Element = tuple[str, list[tuple[str, str | None]]]
#: The name :func:`parse_extensions` gives an element it cannot read.
MALFORMED = ""


def parse_extensions(values: Iterable[str]) -> list[Element]:
    """The elements of ``Sec-WebSocket-Extensions`` header values (RFC 6455 9.1), in order: each a name and
    its parameters; a quoted value is unquoted. An element that cannot be read is returned with the
    name :data:`MALFORMED`, so that an offer list keeps its order and a bad offer is skipped, not the rest."""
    elements: list[Element] = []
    for value in values:
        for element in value.split(","):
            if element.strip():
                elements.append(_element(element) or (MALFORMED, []))
    return elements


def _element(text: str) -> Element | None:
    parts = [part.strip() for part in text.split(";")]
    name = parts[0].lower()
    if not _is_token(name):
        return None
    params: list[tuple[str, str | None]] = []
    for part in parts[1:]:
        param, equals, raw = part.partition("=")
        param = param.strip().lower()
        if not _is_token(param):
            return None
        if not equals:
            params.append((param, None))
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        if not _is_token(raw):
            return None
        params.append((param, raw))
    return name, params


def _is_token(text: str) -> bool:
    return bool(text) and all(
        char.isascii() and (char.isalnum() or char in "!#$%&'*+-.^_`|~") for char in text
    )


def _window_bits(value: str | None) -> int:
    """8 to 15 from a parameter's value, or 0 when it is none of them (a leading zero included)."""
    if value is None or value not in {str(bits) for bits in range(8, 16)}:
        return 0
    return int(value)


def _read_params(params: list[tuple[str, str | None]], offer: bool) -> dict[str, int | bool] | None:
    """Parameters of one element, checked (RFC 7692 7.1), or None: known names only, no duplicates, valid
    values; ``client_max_window_bits`` may have no value only in an offer (it is then ``True``)."""
    read: dict[str, int | bool] = {}
    for name, value in params:
        if name not in _PARAMETERS or name in read:
            return None
        if name.endswith("_no_context_takeover"):
            if value is not None:
                return None
            read[name] = True
        elif name == "client_max_window_bits" and value is None and offer:
            read[name] = True
        else:
            bits = _window_bits(value)
            if not bits:
                return None
            read[name] = bits
    return read


def accept_client_offer(values: Iterable[str]) -> Agreement | None:
    """The gateway's answer to a client's ``Sec-WebSocket-Extensions`` values: the first acceptable
    permessage-deflate offer (RFC 7692 5.1: offers come in preference order), or None.

    An offer is declined when it is malformed, repeats a parameter, names one RFC 7692 does not define, or
    asks the gateway for ``server_max_window_bits=8`` (which zlib cannot produce for a raw stream).
    """
    for name, params in parse_extensions(values):
        if name != EXTENSION:
            continue
        offer = _read_params(params, offer=True)
        if offer is None:
            continue
        server_bits = offer.get("server_max_window_bits")
        if server_bits == 8:
            continue
        answer = [EXTENSION]
        gateway_no_context = bool(offer.get("server_no_context_takeover"))
        if gateway_no_context:
            answer.append("server_no_context_takeover")
        # The client offered not to keep its context: accepting it lets each inflater live for one message.
        peer_no_context = bool(offer.get("client_no_context_takeover"))
        if peer_no_context:
            answer.append("client_no_context_takeover")
        if server_bits:
            answer.append(f"server_max_window_bits={server_bits}")
        gateway_bits = min(int(server_bits) if server_bits else 15, DEFLATE_WINDOW_BITS)
        client_bits = offer.get("client_max_window_bits")
        peer_bits = 15
        if client_bits is not None:
            peer_bits = (
                CLIENT_WINDOW_BITS if client_bits is True else min(int(client_bits), CLIENT_WINDOW_BITS)
            )
            answer.append(f"client_max_window_bits={peer_bits}")
        return Agreement(
            "; ".join(answer),
            peer_no_context,
            peer_bits,
            gateway_no_context,
            gateway_bits,
            int(server_bits) if server_bits else 15,
        )
    return None


def read_upstream_answer(value: str | None) -> Agreement | None:
    """The upstream's answer to :data:`UPSTREAM_OFFER` (its 101's ``Sec-WebSocket-Extensions``), or None
    when it answered none.

    Raises:
        UpstreamError: an answer with another extension, more than one element, a parameter the gateway
            did not offer or RFC 7692 does not define, a duplicate, or a bad value (a 502).
    """
    if value is None or not value.strip():
        return None
    elements = parse_extensions([value])
    if len(elements) != 1 or elements[0][0] != EXTENSION:
        raise UpstreamError(f"upstream negotiated an extension the gateway did not offer: {value[:100]!r}")
    answer = _read_params(elements[0][1], offer=False)
    if answer is None:
        raise UpstreamError(f"upstream answered permessage-deflate with bad parameters: {value[:100]!r}")
    gateway_bits = int(answer.get("client_max_window_bits", 15))
    return Agreement(
        value.strip(),
        peer_no_context_takeover=bool(answer.get("server_no_context_takeover")),
        peer_window_bits=int(answer.get("server_max_window_bits", 15)),
        gateway_no_context_takeover=bool(answer.get("client_no_context_takeover")),
        gateway_window_bits=0 if gateway_bits == 8 else min(gateway_bits, DEFLATE_WINDOW_BITS),
        gateway_max_window_bits=gateway_bits,
    )


class Inflater:
    """The messages one peer compressed, inflated piece by piece within a byte budget.

    The zlib object is made at the first compressed message and, with no context takeover, dropped at
    the end of each message; a message that ends in a final (BFINAL) block ends that stream too.
    """

    __slots__ = ("_no_context_takeover", "_window_bits", "_zlib")

    def __init__(self, window_bits: int, no_context_takeover: bool) -> None:
        self._window_bits = window_bits
        self._no_context_takeover = no_context_takeover
        self._zlib: zlib._Decompress | None = None

    @property
    def active(self) -> bool:
        """Whether a zlib object is held (what a session's memory counts)."""
        return self._zlib is not None

    def inflate(self, data: bytes | bytearray, final: bool, budget: int) -> bytes:
        """The bytes ``data`` (the next compressed bytes of a message) inflate to; ``final`` at the end of
        the message. At most ``budget`` bytes are produced.

        Raises:
            MessageTooBig: the message inflates to more than ``budget`` more bytes (1009).
            ProtocolError: the stream is corrupt (1007).
        """
        stream = self._zlib
        if stream is None:
            stream = self._zlib = zlib.decompressobj(wbits=-self._window_bits)
        try:
            # One byte over the budget tells a message that is too big from one that fits exactly; zlib
            # stops there and keeps the rest as unconsumed_tail, which is never read.
            out = stream.decompress(data, budget + 1)
            if final and len(out) <= budget:
                out += stream.decompress(EMPTY_BLOCK, budget + 1 - len(out))
        except zlib.error as error:
            self._zlib = None
            raise ProtocolError(f"invalid compressed data: {error}", CloseCode.INVALID_DATA) from None
        if len(out) > budget:
            self._zlib = None
            raise MessageTooBig("message inflates to more than the size limit")
        if final and (self._no_context_takeover or stream.eof):
            self._zlib = None
        return out


class Deflater:
    """The messages the gateway compresses for one peer (RFC 7692 7.2.1), made on the first one."""

    __slots__ = ("_no_context_takeover", "_window_bits", "_zlib")

    def __init__(self, window_bits: int, no_context_takeover: bool) -> None:
        self._window_bits = window_bits
        self._no_context_takeover = no_context_takeover
        self._zlib: zlib._Compress | None = None

    @property
    def active(self) -> bool:
        """Whether a zlib object is held (what a session's memory counts)."""
        return self._zlib is not None

    def deflate(self, data: bytes | bytearray, final: bool) -> bytes:
        """The compressed bytes for ``data``, the next bytes of a message (``final`` at its end). Within a
        message zlib may keep some input until more arrives (the result may be empty); the end of a message
        is flushed, and its trailing empty block removed."""
        stream = self._zlib
        if stream is None:
            stream = self._zlib = zlib.compressobj(
                zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self._window_bits, DEFLATE_MEM_LEVEL
            )
        out = stream.compress(data)
        if not final:
            return out
        out += stream.flush(zlib.Z_SYNC_FLUSH)
        if self._no_context_takeover:
            self._zlib = None
        return out[:-4] if out.endswith(EMPTY_BLOCK) else out
