"""``wsgate client``: a small WebSocket client that shows what a gateway answers.

It opens one WebSocket (aiohttp), sends the messages it is given, prints every message it receives and how
the session ended: for a refused handshake the HTTP status with the refusal's reason word and detail (the
JSON body every wsgate refusal carries), for a session the close code and reason. It is what ``wsgate demo``
prints lines for, and a quick way to try a policy by hand; it is not a load tool.

What it prints is one line per event, in order, so a test or a person reads the same thing:
``connected: HTTP 101 ...``, ``> sent``, ``< received``, ``closed by the server: CODE REASON`` or
``closed: 1000 (by this client)``, or ``refused: HTTP STATUS REASON: DETAIL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from types import SimpleNamespace

import aiohttp
from aiohttp import WSMsgType

from proxy.errors import CloseCode

#: Exit codes: the session ended with 1000; the handshake was refused or the server closed with another
#: code; the gateway could not be reached at all.
EXIT_NORMAL, EXIT_CANNOT_CONNECT, EXIT_REFUSED = 0, 1, 2
#: Headers of a refusal worth showing: what a client is asked to do about it.
_TELLING_HEADERS = ("WWW-Authenticate", "Retry-After")
#: How long a TCP (and TLS) connect may take before the client gives up.
CONNECT_TIMEOUT_S = 30.0
#: The largest message it takes from a server: one that sends more is cut (aiohttp closes 1009), never
#: buffered without bound.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: A printed message is cut to this many characters (a message of 2 KiB is not read on a terminal).
_SHOWN_CHARACTERS = 72


def shown(data: str | bytes) -> str:
    """One message as one line: text as it is (cut when long), binary as its size."""
    if isinstance(data, bytes):
        return f"(binary, {len(data)} bytes)"
    text = data.replace("\n", "\\n")
    if len(text) > _SHOWN_CHARACTERS:
        return f"{text[:_SHOWN_CHARACTERS]}... ({len(data.encode())} bytes)"
    return text


def refusal_line(status: int, reason_phrase: str, body: bytes | None, headers: dict[str, str]) -> str:
    """The line for a refused handshake: the status, and the reason word and detail of wsgate's JSON body
    (else the status's phrase), then the headers that say what to do."""
    described = reason_phrase
    if body:
        try:
            document = json.loads(body)
        except ValueError:
            described = body.decode("utf-8", "replace").strip()[:_SHOWN_CHARACTERS]
        else:
            if isinstance(document, dict) and "error" in document:
                described = str(document["error"])
                if document.get("detail"):
                    described += f": {document['detail']}"
    told = "".join(f" ({name}: {headers[name]})" for name in _TELLING_HEADERS if name in headers)
    return f"refused: HTTP {status} {described}{told}"


def _stdin_lines(queue: asyncio.Queue[str | None]) -> None:
    """Feed stdin's lines to ``queue`` from a daemon thread (so a blocked read never holds up the exit);
    ``None`` marks the end of input."""
    loop = asyncio.get_running_loop()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="stdin", daemon=True).start()


async def run_client(
    url: str,
    token: str | None = None,
    origin: str | None = None,
    messages: Sequence[str] | None = None,
    repeat: int = 1,
    wait: float = 1.0,
) -> int:
    """Open ``url``, send ``messages`` (``repeat`` times over; without any, each line of stdin), wait until
    nothing has arrived for ``wait`` seconds or the server closes, close with 1000, and print each step.
    Returns an exit code (``EXIT_*``)."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if origin is not None:
        headers["Origin"] = origin
    # aiohttp drops a refused handshake's body before raising: read it as the response ends.
    refused_body: list[bytes] = []

    async def keep_refusal_body(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        if params.response.status != 101:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                refused_body.append(await asyncio.wait_for(params.response.read(), 5))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(keep_refusal_body)
    # No total timeout: aiohttp's would also end the WebSocket; a connect that hangs is cut, not waited on.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(trace_configs=[trace], timeout=timeout) as session:
        try:
            ws = await session.ws_connect(url, headers=headers, max_msg_size=MAX_MESSAGE_BYTES)
        except aiohttp.WSServerHandshakeError as error:
            body = refused_body[0] if refused_body else None
            response_headers = dict(error.headers or {})
            try:
                phrase = HTTPStatus(error.status).phrase
            except ValueError:  # a status with no name: aiohttp's own description
                phrase = error.message
            print(refusal_line(error.status, phrase, body, response_headers), flush=True)
            return EXIT_REFUSED
        except (aiohttp.ClientError, OSError) as error:
            print(f"error: cannot connect to {url}: {error}", flush=True)
            return EXIT_CANNOT_CONNECT
        async with ws:
            print(f"connected: HTTP 101 {url} (subprotocol: {ws.protocol or 'none'})", flush=True)
            return await _converse(ws, list(messages or ()) * repeat, wait)


async def _converse(ws: aiohttp.ClientWebSocketResponse, outgoing: list[str], wait: float) -> int:
    """Send ``outgoing`` (or stdin's lines) while printing what arrives; then close, unless the server did."""
    conversation = _Conversation(ws)
    receiver = asyncio.create_task(conversation.receive())
    source: asyncio.Queue[str | None] | None = None
    if not outgoing:
        source = asyncio.Queue()
        _stdin_lines(source)
    await conversation.send_all(receiver, outgoing, source)
    while not receiver.done():
        quiet_for = time.monotonic() - conversation.last_activity
        if quiet_for >= wait:
            break
        await asyncio.wait({receiver}, timeout=wait - quiet_for)
    if not receiver.done():
        # aiohttp's close() ends the pending receive() itself (a cancelled receive would record 1006)
        await ws.close(code=CloseCode.NORMAL)
    await receiver
    if conversation.server_close is not None:
        code, reason = conversation.server_close
        print(f"closed by the server: {code} {reason}".rstrip(), flush=True)
        return EXIT_NORMAL if code == CloseCode.NORMAL else EXIT_REFUSED
    if not ws.closed:
        await ws.close(code=CloseCode.NORMAL)
    answered = ws.close_code
    if answered == CloseCode.NORMAL:
        print("closed: 1000 (by this client)", flush=True)
        return EXIT_NORMAL
    if answered is None or answered == CloseCode.ABNORMAL:
        print("closed: the connection ended without a close frame", flush=True)
    else:  # the server's own close crossed ours
        print(f"closed: 1000 (by this client; the server answered {answered})", flush=True)
    return EXIT_REFUSED


class _Conversation:
    """One open session's two halves: what is sent, what arrives, and when anything last happened (the
    client closes once nothing has for ``--wait`` seconds)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.last_activity = time.monotonic()
        #: The server's close frame (code, reason), when the server closed first.
        self.server_close: tuple[int, str] | None = None

    async def receive(self) -> None:
        """Print each message until the session closes; keep the server's close frame."""
        while True:
            message = await self.ws.receive()
            self.last_activity = time.monotonic()
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                print(f"< {shown(message.data)}", flush=True)
            elif message.type == WSMsgType.CLOSE:
                self.server_close = (int(message.data), str(message.extra or ""))
                return
            elif message.type == WSMsgType.ERROR:
                print(f"error: {message.data}", flush=True)
                return
            else:  # CLOSING (our close() ended the wait) or CLOSED
                return

    async def send_all(
        self, receiver: asyncio.Task[None], outgoing: list[str], source: asyncio.Queue[str | None] | None
    ) -> None:
        """Send each message until the list (or stdin) ends or the session is closing."""
        index = 0
        while not receiver.done() and not self.ws.closed:
            if source is not None:
                getter = asyncio.ensure_future(source.get())
                await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                text = getter.result()
                if text is None:
                    return
            elif index < len(outgoing):
                text = outgoing[index]
                index += 1
            else:
                return
            print(f"> {shown(text)}", flush=True)
            try:
                await self.ws.send_str(text)
            except ConnectionResetError:  # the server closed meanwhile: its close frame says why
                return
            self.last_activity = time.monotonic()
