"""``wsgate demo``: the gateway in front of a built-in echo upstream, with a ready-made policy.

The echo upstream is a plain aiohttp WebSocket server: it sends every message back, answers ``close:CODE``
text messages by closing with that code, and offers the ``chat`` and ``echo`` subprotocols.
"""

from __future__ import annotations

import textwrap

from aiohttp import WSMsgType, web

from proxy.errors import CloseCode
from proxy.policy.load import parse_policy

DEMO_POLICY = """\
version: 1
listen: {{address: "{listen}"}}
admin: {{address: "127.0.0.1:0"}}
limits:
  max_message_size: 1MiB
  idle_timeout: 5m
routes:
  - path: /echo
    upstream: ws://127.0.0.1:{upstream_port}/
    auth: none
"""


async def echo_handler(request: web.Request) -> web.WebSocketResponse:
    """Echo every message; ``close:4000`` closes with code 4000."""
    ws = web.WebSocketResponse(protocols=("chat", "echo"), max_msg_size=0)
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            if message.data.startswith("close:"):
                await ws.close(code=int(message.data[6:] or CloseCode.NORMAL), message=b"bye")
                break
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def start_echo_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Start the echo server; return its runner and bound port."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", echo_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = runner.addresses[0][1]
    return runner, int(port)


async def run_demo(listen: str) -> int:
    """Start the echo upstream and a gateway in front of it; print how to connect; serve until a signal."""
    from proxy.app import serve

    runner, upstream_port = await start_echo_upstream()
    policy_text = DEMO_POLICY.format(listen=listen, upstream_port=upstream_port)
    policy = parse_policy(policy_text)
    host, _, port = listen.rpartition(":")
    print(
        f"wsgate demo: an echo service is behind ws://{host}:{port}/echo (policy below)\n"
        f"{textwrap.indent(policy_text, '  | ')}"
        f"  a WebSocket client gets every message back; send 'close:4000' to see a close code relayed\n"
        f"  a plain HTTP request gets a clear refusal:  curl -i http://{host}:{port}/echo\n"
        f"  stop with Ctrl-C",
        flush=True,
    )
    try:
        return await serve(policy)
    finally:
        await runner.cleanup()
