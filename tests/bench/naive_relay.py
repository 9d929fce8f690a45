"""A naive WebSocket relay written with aiohttp: the "what a straightforward Python proxy costs" baseline.

Not collected by pytest; compare.py starts it as one of its targets:

    .venv/bin/python tests/bench/naive_relay.py --port 9000 --upstream ws://127.0.0.1:9001/echo

Every WebSocket upgrade on any path is accepted with ``web.WebSocketResponse``, one upstream session is
opened with ``ClientSession.ws_connect`` and two ``async for`` loops copy messages each way until either
side closes. It checks nothing (no token, no limits, no message rules), which is the point: the gap
between this and wsgate is what wsgate's checks and its own relay cost or save, in the same language.
Runs on uvloop, as wsgate does.
"""

from __future__ import annotations

import argparse
import asyncio
import resource

import aiohttp
import uvloop
from aiohttp import web

#: Large enough for the biggest benchmark message (64 KiB) with room; aiohttp's default is 4 MiB.
MAX_MESSAGE = 4 * 1024 * 1024


async def pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, sink) -> None:  # type: ignore[no-untyped-def]
    """Copy data messages from ``source`` to ``sink`` until ``source`` ends, then close ``sink``."""
    async for message in source:
        if message.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        else:
            break
    await sink.close()


def make_app(upstream_url: str) -> web.Application:
    async def relay(request: web.Request) -> web.StreamResponse:
        client_side = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, autoping=True)
        await client_side.prepare(request)
        session: aiohttp.ClientSession = request.app["session"]
        async with session.ws_connect(upstream_url, max_msg_size=MAX_MESSAGE) as upstream_side:
            await asyncio.gather(pump(client_side, upstream_side), pump(upstream_side, client_side))
        return client_side

    async def open_session(app: web.Application) -> None:
        # No connection limit: every relayed session holds its own upstream connection.
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def close_session(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application()
    app.router.add_get("/{tail:.*}", relay)
    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="ws:// URL every session is relayed to")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    web.run_app(
        make_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
