"""``wsgate demo``: the gateway in front of a built-in echo upstream, with a ready-made policy that shows the
guards.

The echo upstream is a plain aiohttp WebSocket server: it sends every message back, answers ``close:CODE``
text messages by closing with that code, and offers the ``chat`` and ``echo`` subprotocols. Two routes lead
to it: ``/echo``, open, and ``/secure``, behind an HS256 token, an Origin allowlist and small limits.

The token's secret is random per run and lives only in this process: it reaches the policy loader through
the environment variable the policy names (``secret_env``), which is removed again once the policy is
loaded, and it is never printed, logged or written to disk. What is printed is the policy as loaded, a token
signed with that secret, and one shell line per answer the guards give, each of which works as printed.
"""

from __future__ import annotations

import errno
import os
import secrets
import shlex
import socket
import sys
import textwrap
import time

import jwt
from aiohttp import WSMsgType, web

from proxy.errors import CloseCode
from proxy.policy.load import parse_policy
from proxy.policy.model import Address, Policy

#: The environment variable the demo policy's provider reads its HMAC secret from.
SECRET_ENV = "WSGATE_DEMO_SECRET"
#: The one Origin the guarded route admits (a client sending no Origin, not a browser, passes too).
ALLOWED_ORIGIN = "https://app.example.com"
#: The command the printed lines run: the one README's set-up shell has (``python3 -m venv .venv``).
WSGATE = ".venv/bin/wsgate"
#: How long the printed token is valid.
TOKEN_LIFETIME_S = 3600
#: A well-formed ``Sec-WebSocket-Key`` (16 bytes, base64) for the curl lines.
_CURL_KEY = "AAAAAAAAAAAAAAAAAAAAAA=="

DEMO_POLICY = """\
version: 1
listen: {{address: "{listen}"}}
admin: {{address: "{admin}"}}
limits:
  max_message_size: 1MiB
  idle_timeout: 5m
auth:
  demo:
    algorithms: [HS256]
    secret_env: {secret_env}   # random per run, set by wsgate demo and never written anywhere
    issuer: wsgate-demo
routes:
  - path: /echo
    upstream: ws://127.0.0.1:{upstream_port}/
    auth: none
  - path: /secure
    upstream: ws://127.0.0.1:{upstream_port}/
    auth: demo
    origins: ["{origin}"]
    limits:
      max_message_size: 1KiB
      messages_per_connection: 2/s
      message_burst: 5
      handshakes_per_ip: 1/s
      handshake_burst: 5
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


def load_demo_policy(text: str, secret: str) -> Policy:
    """The demo policy through the normal loader, its provider's secret passed the way ``secret_env`` is
    read; the variable does not outlive the load (nothing else in the process needs it)."""
    os.environ[SECRET_ENV] = secret
    try:
        return parse_policy(text)
    finally:
        del os.environ[SECRET_ENV]


def demo_token(secret: str, now: float) -> str:
    """A token the ``/secure`` route admits until ``TOKEN_LIFETIME_S`` after ``now``."""
    issued = int(now)
    claims = {"sub": "demo", "iss": "wsgate-demo", "iat": issued, "exp": issued + TOKEN_LIFETIME_S}
    return jwt.encode(claims, secret, algorithm="HS256")


def _curl(url: str, *headers: str, options: str = "-si") -> str:
    upgrade = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13")
    flags = " ".join(f"-H {shlex.quote(header)}" for header in (*upgrade, f"Sec-WebSocket-Key: {_CURL_KEY}"))
    extra = "".join(f" -H {shlex.quote(header)}" for header in headers)
    return f"curl {options} {flags}{extra} {url}"


def try_lines(host: str, port: int, token: str) -> list[tuple[str, str]]:
    """What to paste to see each answer: (what it shows, the shell line), in an order where none trips the
    handshake rate for the next (the handshake-rate loop comes last)."""
    secure = f"http://{host}:{port}/secure"
    ws_secure = f"ws://{host}:{port}/secure"
    bearer = f"Authorization: Bearer {token}"
    return [
        (
            "101: the token and an allowed Origin are admitted (curl then waits on the open WebSocket: "
            "--max-time ends it)",
            _curl(secure, f"Origin: {ALLOWED_ORIGIN}", bearer, options="-si --max-time 2"),
        ),
        ("401 auth_missing: no token", _curl(secure)),
        (
            "403 origin: an Origin that is not allowed (judged before any token)",
            _curl(secure, "Origin: https://evil.example"),
        ),
        (
            "close 1008 rate limit exceeded: 10 messages at once, 5 allowed (then 2 a second)",
            f"{WSGATE} client {ws_secure} --token {token} --send hello --repeat 10",
        ),
        (
            "close 1009: a message of 2KiB, above the route's max_message_size of 1KiB",
            f"{WSGATE} client {ws_secure} --token {token} --send-size 2KiB",
        ),
        (
            "429 rate_limited: 10 handshakes at once, 5 allowed per IP (then 1 a second); they count "
            "before the token is checked",
            "for i in $(seq 10); do "
            + _curl(secure, options="-s -o /dev/null -w '%{http_code} '")
            + "; done; echo",
        ),
    ]


def banner(policy_text: str, listen: str, admin: str, token: str) -> str:
    """Everything ``wsgate demo`` prints before it serves."""
    host, _, port_text = listen.rpartition(":")
    port = int(port_text)
    lines = [
        "wsgate demo: an echo service behind two routes; this is the policy serving them:",
        textwrap.indent(policy_text, "  | ").rstrip("\n"),
        "",
        f"  open route:    ws://{host}:{port}/echo  every message comes back; send close:4000 and the echo "
        "service's close code reaches you unchanged",
        f"  guarded route: ws://{host}:{port}/secure  a token, the Origin {ALLOWED_ORIGIN} (or none), "
        "messages up to 1KiB, 2 messages a second, 1 handshake a second per IP",
        f"  admin:         http://{admin}/  the admin page; also /metrics, /healthz, /readyz, /policy",
        f"  token (HS256, sub demo, valid for one hour): {token}",
        "",
        "Paste these in another shell, in the directory where you ran the set-up (each prints what the "
        "client sees):",
        "  # the open route: a WebSocket client, and a plain HTTP request refused with 426",
        f"  {WSGATE} client ws://{host}:{port}/echo --send hello --send close:4000",
        f"  curl -si http://{host}:{port}/echo",
    ]
    for shows, line in try_lines(host, port, token):
        lines += [f"  # {shows}", f"  {line}"]
    lines += ["", "Stop with Ctrl-C."]
    return "\n".join(lines)


def address_in_use(address: Address) -> str | None:
    """Why ``address`` cannot be listened on by itself, or None.

    The gateway's listeners set SO_REUSEPORT (a restart's next process listens beside the old one), so
    a second demo would silently share the ports of a first one, and its printed token would fail on
    every other connection. A bind without SO_REUSEPORT, closed at once, tells.
    """
    if address.port == 0:
        return None
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not in use
        try:
            probe.bind((address.host, address.port))
        except OSError as error:
            reason = (error.strerror or str(error)).lower()
            return f"{reason}; another wsgate demo?" if error.errno == errno.EADDRINUSE else reason
    return None


async def run_demo(listen: str, admin: str) -> int:
    """Start the echo upstream and a gateway in front of it; print how to see each guard; serve until a
    signal."""
    from proxy.app import serve

    runner, upstream_port = await start_echo_upstream()
    try:
        secret = secrets.token_urlsafe(32)
        policy_text = DEMO_POLICY.format(
            listen=listen,
            admin=admin,
            upstream_port=upstream_port,
            secret_env=SECRET_ENV,
            origin=ALLOWED_ORIGIN,
        )
        policy = load_demo_policy(policy_text, secret)
        for address, option in ((policy.listen.address, "--listen"), (policy.admin, "--admin")):
            taken = address_in_use(address)
            if taken is not None:
                print(f"wsgate demo: {address} is in use ({taken}): pass {option} HOST:PORT", file=sys.stderr)
                return 1
        token = demo_token(secret, time.time())
        print(banner(policy_text, str(policy.listen.address), str(policy.admin), token), flush=True)
        return await serve(policy)
    finally:
        await runner.cleanup()
