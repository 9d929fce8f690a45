"""The ``wsgate`` command: argument parsing only; the work is done by :mod:`proxy.app`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from proxy import __version__, logs
from proxy.errors import PolicyError
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
        default="auto",
        help="json lines, readable text, or auto: text on a terminal, json otherwise (default)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info", help="default: info"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``wsgate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="wsgate", description="A security-enforcing WebSocket reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"wsgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway", description="Run the gateway with a policy.")
    serve.add_argument("-c", "--config", required=True, metavar="FILE", help="policy file (YAML)")
    _add_log_options(serve)

    check = commands.add_parser(
        "check",
        help="validate a policy file",
        description="Validate a policy file: exit 0 if valid, else 1 with file:line: key: message.",
    )
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="policy file (YAML)")

    demo = commands.add_parser(
        "demo",
        help="run the gateway in front of a built-in echo service",
        description="Start a built-in echo upstream and the gateway in front of it.",
    )
    demo.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="default: 127.0.0.1:8080"
    )
    _add_log_options(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wsgate`` and ``python -m proxy``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "check":
        try:
            policy = load_policy(args.config)
        except PolicyError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"ok: {args.config}: {len(policy.routes)} route(s), sha256 {policy.sha256[:12]}")
        return 0
    logs.configure(args.log_format, args.log_level)
    if args.command == "serve":
        try:
            policy = load_policy(args.config)
        except PolicyError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        from proxy.app import serve

        return _run(serve(policy))
    from proxy.demo import run_demo

    return _run(run_demo(args.listen))
