"""The ``wsgate`` command: argument parsing only; the work is done by :mod:`proxy.app`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from proxy import __version__, logs
from proxy.errors import ArgumentError, PolicyError, StartupError
from proxy.policy.load import load_policy


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without it
        return asyncio.run(coro)
    return int(uvloop.run(coro))


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "text"),
        default=None,
        help="json lines, readable text, or auto: text on a terminal, json otherwise "
        "(default: the policy's log.format, else auto)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=None,
        help="default: the policy's log.level, else info",
    )


#: More workers than this is a typo, not a plan (one per core is the most that helps).
MAX_WORKERS = 256


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}")
    return count


#: A larger message is not a demonstration of anything but the client's memory.
MAX_FILLER_BYTES = 64 * 1024 * 1024


def _filler_message(text: str) -> str:
    from proxy.policy.units import parse_size

    try:
        size = parse_size(int(text) if text.isdigit() else text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size > MAX_FILLER_BYTES:
        raise argparse.ArgumentTypeError("must be at most 64MiB")
    return "x" * size


def _repeat_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError("must be a whole number between 1 and 100000")
    return int(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The ``wsgate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="wsgate", description="A security-enforcing WebSocket reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"wsgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway", description="Run the gateway with a policy.")
    serve.add_argument("-c", "--config", required=True, metavar="FILE", help="policy file (YAML)")
    serve.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="worker processes, each a whole gateway on the same listen.address (SO_REUSEPORT), under a "
        "supervisor that serves admin.address with every worker's totals, passes SIGHUP and SIGTERM on, "
        "and restarts a worker that dies (default: 1, one process and no supervisor). Per-IP and "
        "per-subject limits then need limiter.redis",
    )
    # Set by the supervisor for each worker it starts (see proxy.workers); not for people.
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-port", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    _add_log_options(serve)

    check = commands.add_parser(
        "check",
        help="validate a policy file",
        description="Validate a policy file: exit 0 if valid, else 1 with file:line: key: message. A "
        "secret_env variable that is not set here is a warning (wsgate serve refuses it).",
    )
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="policy file (YAML)")

    schema = commands.add_parser(
        "schema",
        help="print the policy's JSON Schema",
        description="Print the JSON Schema (draft 2020-12) of policy files, for editors to check a policy "
        "as it is typed, or (--format markdown) the reference table of every policy key.",
    )
    schema.add_argument("--format", choices=("json", "markdown"), default="json", help="default: json")

    demo = commands.add_parser(
        "demo",
        help="run the gateway in front of a built-in echo service",
        description="Start a built-in echo upstream and the gateway in front of it: an open route /echo "
        "and a guarded route /secure (an HS256 token, an Origin allowlist, small limits). It prints the "
        "policy, a token valid for one hour, and a shell line showing each answer the guards give.",
    )
    demo.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="default: 127.0.0.1:8080"
    )
    demo.add_argument(
        "--admin",
        default="127.0.0.1:9090",
        metavar="HOST:PORT",
        help="the admin listener (page, /metrics, /healthz); default: 127.0.0.1:9090",
    )
    _add_log_options(demo)

    client = commands.add_parser(
        "client",
        help="open one WebSocket and show what the gateway answers",
        description="Open one WebSocket, send the given messages (without --send or --send-size: each "
        "line of stdin), print each message received, then how it ended: a refused handshake's status "
        "and reason, or the close code and reason. Exit 0 for a session that ended with 1000, 2 for a "
        "refused handshake or another close code, 1 when the address cannot be reached.",
    )
    client.add_argument("url", metavar="URL", help="ws:// or wss:// URL")
    client.add_argument("--token", metavar="JWT", help="sent as Authorization: Bearer JWT")
    client.add_argument("--origin", metavar="ORIGIN", help="sent as the Origin header")
    client.add_argument(
        "--send",
        dest="messages",
        action="append",
        metavar="TEXT",
        help="a text message to send (repeatable, sent in order)",
    )
    client.add_argument(
        "--send-size",
        dest="messages",
        action="append",
        type=_filler_message,
        metavar="SIZE",
        help="a text message of SIZE bytes (x repeated), e.g. 2KiB (repeatable, in order with --send)",
    )
    client.add_argument(
        "--repeat", type=_repeat_count, default=1, metavar="N", help="send the messages N times (default: 1)"
    )
    client.add_argument(
        "--wait",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="after the last message, how long nothing may arrive before the client closes (default: 1)",
    )

    explain = commands.add_parser(
        "explain",
        help="show how a policy judges one handshake",
        description="Show which route a request matches, each guard's verdict in order, and the answer the "
        "client would get, without starting a server. Exit 0 if the handshake would be admitted, 2 if it "
        "would be refused, 1 if the policy or the arguments are invalid or the answer needs a secret that "
        "is not set here.",
    )
    explain.add_argument("-c", "--config", required=True, metavar="FILE", help="policy file (YAML)")
    explain.add_argument("--ip", required=True, metavar="IP", help="the client IP (as resolved)")
    explain.add_argument("--origin", metavar="ORIGIN", help="the Origin header, if any")
    explain.add_argument(
        "--host",
        metavar="HOST",
        help="the Host header (routes are matched on it; default: none, so only routes without a host match)",
    )
    explain.add_argument(
        "--client-cert", metavar="FILE.pem", help="judge as if TLS had verified this client certificate"
    )
    credentials = explain.add_mutually_exclusive_group()
    credentials.add_argument("--token", metavar="JWT", help="a token, verified as the gateway would")
    credentials.add_argument(
        "--claims", metavar="JSON", help="claims to judge as if a valid signature carried them"
    )
    explain.add_argument("path", metavar="PATH", help="request path (and query), e.g. /chat/room?x=1")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wsgate`` and ``python -m proxy``; returns the exit code."""
    args = build_parser().parse_args(argv)
    commands = {
        "check": _check,
        "serve": _serve,
        "demo": _demo,
        "client": _client,
        "explain": _explain,
        "schema": _schema,
    }
    try:
        return commands[args.command](args)
    except (PolicyError, StartupError, ArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    policy = load_policy(args.config, require_secrets=False)
    for warning in policy.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {args.config}: {len(policy.routes)} route(s), sha256 {policy.sha256[:12]}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    import json

    from proxy.policy.schema import policy_schema, reference_table

    if args.format == "markdown":
        sys.stdout.write(reference_table())
    else:
        sys.stdout.write(json.dumps(policy_schema(), indent=2) + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from proxy.app import serve
    from proxy.worker import WorkerRole, unshared_limits_problem

    policy = load_policy(args.config)
    role = None
    if args.worker_index is not None:
        role = WorkerRole(args.worker_index, args.worker_of, args.worker_fd, args.worker_port)
        role.tag_logs()
    workers = role.workers if role is not None else args.workers
    problem = unshared_limits_problem(policy, workers)
    if problem is not None:
        raise problem
    logs.apply_settings(policy.log, args.log_format, args.log_level)
    if role is None and workers > 1:
        from proxy.workers import Supervisor

        passed = [
            f"--log-{name}={value}"
            for name, value in (("format", args.log_format), ("level", args.log_level))
            if value
        ]
        return _run(Supervisor(policy, args.config, workers, passed).run())
    return _run(serve(policy, log_format=args.log_format, log_level=args.log_level, worker=role))


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    logs.configure(args.log_format or "auto", args.log_level or "info")
    return _run(run_demo(args.listen, args.admin))


def _client(args: argparse.Namespace) -> int:
    from proxy.client import run_client

    try:
        return _run(run_client(args.url, args.token, args.origin, args.messages, args.repeat, args.wait))
    except KeyboardInterrupt:
        return 130


def _explain(args: argparse.Namespace) -> int:
    import ipaddress
    import json

    from proxy.explain import explain
    from proxy.request import ClientCertificate

    policy = load_policy(args.config, require_secrets=False)
    try:
        client_ip = str(ipaddress.ip_address(args.ip))
    except ValueError:
        raise ArgumentError(f"--ip: not an IP address: {args.ip!r}") from None
    claims = None
    if args.claims is not None:
        try:
            claims = json.loads(args.claims)
        except ValueError as error:
            raise ArgumentError(f"--claims: not JSON: {error}") from None
        if not isinstance(claims, dict):
            raise ArgumentError("--claims: expected a JSON object")
    certificate = None
    if args.client_cert is not None:
        try:
            certificate = ClientCertificate.from_pem(Path(args.client_cert).read_bytes())
        except OSError as error:
            raise ArgumentError(f"--client-cert: cannot read {args.client_cert}: {error.strerror}") from None
        except ValueError:
            raise ArgumentError(f"--client-cert: not a PEM certificate: {args.client_cert}") from None
    logs.configure("text", "warning")

    async def judge() -> int:
        result = await explain(
            policy, args.path, client_ip, args.origin, args.token, claims, args.host, certificate
        )
        sys.stdout.write(result.render())
        if result.undecided:
            return 1
        return 0 if result.admitted else 2

    return _run(judge())
