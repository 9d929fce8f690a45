"""Autobahn|Testsuite conformance: the same echo upstream straight and through wsgate, compared case by case.

Run from the repository root (about 45 s on a 2-core machine, plus 20-40 s the first time, to build the
Python 2.7 venv)::

    .venv/bin/python tests/autobahn/run.py [--cases 1.* 6.* ...] [--timeout SECONDS]

What it does:

1. ``tests/autobahn/setup.sh`` builds (once) ``.autobahn/venv``, a Python 2.7 virtualenv with the pinned
   ``autobahntestsuite`` (its ``wstest`` only runs on 2.7);
2. an aiohttp echo upstream starts in this process on 127.0.0.1 (ephemeral port): text back as text,
   binary back as binary, no message size limit, pings answered;
3. ``python -m proxy serve -c POLICY`` starts in front of it, with a policy relaxed for cases 9.*
   (``max_message_size: 16MiB``, ``max_fragments: 1000000``, no message rate, ``auth: none``; every other
   limit at its default);
4. ``wstest -m fuzzingclient`` runs cases 1-7, 9 and 10 against agent ``direct`` (the upstream) and agent
   ``wsgate`` (the same upstream through wsgate). Cases 12 and 13 (permessage-deflate; the upstream
   accepts it, as wsgate does on both hops) take about 18 minutes: run them with ``--cases 12.* 13.*``;
5. both results are ranked OK > NON-STRICT > INFORMATIONAL > UNIMPLEMENTED > FAILED, for ``behavior`` and
   ``behaviorClose`` alike (WRONG CODE, UNCLEAN, FAILED BY CLIENT and NO_CLOSE rank as FAILED), and a
   summary prints the counts per behaviour per agent and every case whose results differ.

Exit status: 0 when every case ran for both agents and none is worse through wsgate than direct; 1 when a
case is worse or missing; 2 when the run itself failed (setup, a process that did not start, a time-out).
``tests/autobahn/known_differences.json`` names the cases where wsgate is knowingly worse, each with the
one result accepted for it and why (anything worse still fails); ``--strict`` accepts none of them.

The report lands in ``.autobahn/report/``: ``index.html`` (wstest's report, with each case's wire log),
``index.json``, and the logs of this run (``wstest.log``, ``wsgate.log``). Every process this script starts
is stopped when it ends, also on failure or Ctrl-C, and every wait is bounded. Not collected by pytest
(the suite's ``testpaths`` are ``tests/unit`` and ``tests/e2e``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from aiohttp import WSMsgType, web

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = REPO / ".autobahn"
KNOWN = HERE / "known_differences.json"
CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
AGENTS = ("direct", "wsgate")
RANK = {"OK": 4, "NON-STRICT": 3, "INFORMATIONAL": 2, "UNIMPLEMENTED": 1, "FAILED": 0}
ORDER = [*RANK, "WRONG CODE", "UNCLEAN", "FAILED BY CLIENT", "NO_CLOSE"]  # the last four rank as FAILED

POLICY = """\
version: 1
listen: {{address: "127.0.0.1:0"}}
admin: {{address: "127.0.0.1:0"}}
limits:
  max_message_size: 16MiB    # cases 9.1.6 and 9.2.6 send 16 MiB messages
  max_fragments: 1000000     # cases 9.3.1 and 9.4.1 send 4 MiB in fragments of 64 B: 65,536 of them
  drain_timeout: 5s
routes:
  - path: /echo
    upstream: ws://127.0.0.1:{port}/echo
    auth: none
"""

# Python 2.7, run in the testsuite's venv: the case ids a spec selects, as wstest itself expands them.
LIST_CASES = """\
import json, sys
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, CaseSetname, CaseBasename
from autobahntestsuite.caseset import CaseSet
spec = json.load(open(sys.argv[1]))
caseset = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
print(json.dumps(caseset.parseSpecCases(spec)))
"""


def rel(path: str | Path) -> str:
    """``path`` as the messages show it: relative to the current directory."""
    return os.path.relpath(path)


class RunError(Exception):
    """The run itself failed (exit 2), as opposed to a conformance difference (exit 1)."""


# -- the echo upstream ------------------------------------------------------------------------------


async def echo(request: web.Request) -> web.WebSocketResponse:
    # compress=True: the direct agent accepts permessage-deflate (cases 12 and 13), as wsgate does
    ws = web.WebSocketResponse(max_msg_size=0, autoping=True, compress=True)
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def start_upstream() -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/echo", echo)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


# -- child processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when this script dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


async def spawn(*args: str, **kwargs: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *args,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, stopped as one
        preexec_fn=_die_with_parent,
        **kwargs,
    )


async def stop(process: asyncio.subprocess.Process | None, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; returns within ``grace`` + 5 s."""
    if process is None or process.returncode is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), wait)
            return
        except TimeoutError:
            continue
    print(f"warning: process {process.pid} did not exit after SIGKILL", file=sys.stderr)


async def pump(stream: asyncio.StreamReader, log: TextIO, on_line: Any = None) -> None:
    """Copies a child's output to ``log`` line by line (so its pipe never fills), calling ``on_line``."""
    while line := await stream.readline():
        text = line.decode("utf-8", "replace")
        log.write(text)
        log.flush()
        if on_line is not None:
            on_line(text)


async def start_wsgate(policy: Path, log: TextIO, tasks: list[asyncio.Task[None]]) -> tuple[Any, int]:
    """``python -m proxy serve -c POLICY``; the process and its port, once it logs ``gateway.listening``."""
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_line(text: str) -> None:
        with contextlib.suppress(ValueError):
            entry = json.loads(text)
            if isinstance(entry, dict) and entry.get("event") == "gateway.listening" and not listening.done():
                listening.set_result(str(entry["address"]))

    process = await spawn(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "-c",
        str(policy),
        "--log-format",
        "json",
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    tasks.append(asyncio.create_task(pump(process.stdout, log, on_line)))
    exited = asyncio.ensure_future(process.wait())
    waiting: set[asyncio.Future[Any]] = {listening, exited}
    try:
        done, _ = await asyncio.wait(waiting, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if listening not in done:
        why = f"exited with {process.returncode}" if exited in done else "logged no gateway.listening in 20 s"
        raise RunError(f"wsgate {why}; see {rel(log.name)}")
    return process, int(listening.result().rsplit(":", 1)[1])


# -- the run ----------------------------------------------------------------------------------------


def build_venv() -> Path:
    """Runs setup.sh (idempotent) and returns the path of wstest; setup.sh and its pips stop with it."""
    process = subprocess.Popen(
        ["bash", str(HERE / "setup.sh")],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        out, _ = process.communicate(timeout=900)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
        raise
    if process.returncode != 0:
        raise RunError("tests/autobahn/setup.sh failed")
    return REPO / out.strip().splitlines()[-1]


def expected_cases(wstest: Path, spec_file: Path) -> list[str]:
    python = wstest.parent / "python"
    result = subprocess.run(
        [str(python), "-c", LIST_CASES, str(spec_file)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RunError(f"listing the spec's cases failed: {result.stderr.strip()}")
    return list(json.loads(result.stdout))


async def run_wstest(wstest: Path, spec_file: Path, outdir: Path, log: TextIO, timeout: float) -> None:
    started = time.monotonic()
    current: list[str] = []

    def progress(text: str) -> None:
        # "Running test case ID 6.4.1 for agent wsgate from peer tcp4:...": one line per agent and group
        words = text.split()
        if text.startswith("Running test case ID") and len(words) > 7:
            group = (words[7], words[4].split(".")[0])
            if group != tuple(current):
                current[:] = group
                print(f"  {time.monotonic() - started:6.1f} s  {group[0]:<6} cases {group[1]}.*", flush=True)

    process = await spawn(
        str(wstest),
        "-m",
        "fuzzingclient",
        "-s",
        str(spec_file),
        cwd=outdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        await asyncio.wait_for(pump(process.stdout, log, progress), timeout)
        code = await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        raise RunError(f"wstest did not finish within {timeout:.0f} s; see {rel(log.name)}") from None
    finally:
        await stop(process, grace=5)
    if code != 0:
        raise RunError(f"wstest exited with {code}; see {rel(log.name)}")
    print(f"  wstest finished in {time.monotonic() - started:.1f} s", flush=True)


async def run(wstest: Path, cases: list[str], timeout: float, outdir: Path) -> dict[str, Any]:
    """Everything up to wstest's index.json; every process and server it starts is stopped on the way out."""
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    if outdir.exists():
        if any(outdir.iterdir()) and not (outdir / "wstest.log").exists():
            raise RunError(f"{rel(outdir)} is not empty and holds no earlier report: not clearing it")
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    tasks: list[asyncio.Task[None]] = []
    upstream: web.AppRunner | None = None
    wsgate = None
    with (
        tempfile.TemporaryDirectory(prefix="wsgate-autobahn-") as tmp,
        open(outdir / "wsgate.log", "w") as wsgate_log,
        open(outdir / "wstest.log", "w") as wstest_log,
    ):
        try:
            upstream, upstream_port = await start_upstream()
            policy = Path(tmp) / "policy.yaml"
            policy.write_text(POLICY.format(port=upstream_port))
            wsgate, wsgate_port = await start_wsgate(policy, wsgate_log, tasks)
            spec = {
                "outdir": str(outdir),
                "servers": [
                    {"agent": "direct", "url": f"ws://127.0.0.1:{upstream_port}/echo"},
                    {"agent": "wsgate", "url": f"ws://127.0.0.1:{wsgate_port}/echo"},
                ],
                "cases": cases,
                "exclude-cases": [],
                "exclude-agent-cases": {},
            }
            spec_file = Path(tmp) / "fuzzingclient.json"
            spec_file.write_text(json.dumps(spec, indent=2))
            expected = expected_cases(wstest, spec_file)
            print(f"{len(expected)} cases per agent; direct :{upstream_port}, wsgate :{wsgate_port}")
            await run_wstest(wstest, spec_file, outdir, wstest_log, timeout)
            if wsgate.returncode is not None:
                raise RunError(f"wsgate exited with {wsgate.returncode} mid-run; see {rel(wsgate_log.name)}")
        finally:
            await stop(wsgate)
            for pump_task in tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pump_task, 5)
            if upstream is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(upstream.cleanup(), 10)
    index = outdir / "index.json"
    if not index.exists():
        raise RunError(f"wstest wrote no {rel(index)}")
    return {"expected": expected, "results": json.loads(index.read_text())}


# -- the comparison ---------------------------------------------------------------------------------


def rank(behaviour: str) -> int:
    return RANK.get(behaviour, RANK["FAILED"])


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split("."))


def behaviour_order(name: str) -> tuple[int, str]:
    return (ORDER.index(name), "") if name in ORDER else (len(ORDER), name)


def load_known(path: Path) -> dict[str, tuple[str, str]]:
    """Case id -> the (behavior, behaviorClose) accepted through wsgate although direct does better."""
    known: dict[str, tuple[str, str]] = {}
    for group in json.loads(path.read_text())["groups"]:
        for case in group["cases"]:
            known[case] = (group["wsgate"]["behavior"], group["wsgate"]["behaviorClose"])
    return known


def compare(
    expected: list[str], results: dict[str, dict[str, Any]], known: dict[str, tuple[str, str]]
) -> tuple[list[str], int, int]:
    """The summary's lines; how many cases are worse through wsgate (and not known to be) or missing; how
    many are worse as ``known`` accepts."""
    counts = {agent: Counter[tuple[str, str]]() for agent in AGENTS}
    for agent in AGENTS:
        for case in results.get(agent, {}).values():
            counts[agent]["behavior", case["behavior"]] += 1
            counts[agent]["behaviorClose", case["behaviorClose"]] += 1
    names = sorted({name for counter in counts.values() for _, name in counter}, key=behaviour_order)
    lines = [f"{'':32}" + "".join(f"{agent:>10}" for agent in AGENTS)]
    for field in ("behavior", "behaviorClose"):
        for name in names:
            row = [counts[agent][field, name] for agent in AGENTS]
            if any(row):
                lines.append(f"{field:<14}{name:<18}" + "".join(f"{n:>10}" for n in row))
    lines.append(f"{'cases run':<32}" + "".join(f"{len(results.get(agent, {})):>10}" for agent in AGENTS))

    bad = accepted = 0
    differences: list[str] = []
    stale: list[str] = []
    every_case = set(expected) | {case for agent in AGENTS for case in results.get(agent, {})}
    for case in sorted(every_case, key=case_key):
        direct, wsgate = got = [results.get(agent, {}).get(case) for agent in AGENTS]
        if direct is None or wsgate is None or case not in expected:
            missing = [agent for agent, entry in zip(AGENTS, got, strict=True) if entry is None]
            notes = [f"MISSING for {', '.join(missing)}"] if missing else []
            if case not in expected:
                notes.append("not in the spec")
            differences.append(f"  {case:<8} {'; '.join(notes)}")
            bad += 1
            continue
        pair = (wsgate["behavior"], wsgate["behaviorClose"])
        worse = any(rank(wsgate[key]) < rank(direct[key]) for key in ("behavior", "behaviorClose"))
        if case in known and not worse:
            stale.append(case)
        if (direct["behavior"], direct["behaviorClose"]) == pair:
            continue
        if not worse:
            verdict = ""
        elif known.get(case) == pair:
            verdict = "  <- worse, known"
            accepted += 1
        else:
            verdict = "  <- WORSE"
            bad += 1
        differences.append(
            f"  {case:<8} direct {direct['behavior']}/{direct['behaviorClose']}"
            f" (close {direct.get('remoteCloseCode')}),"
            f" wsgate {pair[0]}/{pair[1]} (close {wsgate.get('remoteCloseCode')}){verdict}"
        )
    lines.append("")
    if differences:
        lines.append(f"{len(differences)} case(s) differ (behavior/behaviorClose):")
        lines.extend(differences)
        if accepted:
            lines.append(f"known: accepted as {rel(KNOWN)} says, and why")
    else:
        lines.append("no case differs between direct and wsgate")
    if stale:
        lines.append(f"known differences that did not occur in this run: {' '.join(stale)}")
        lines.append(f"  (some depend on timing; remove an entry from {rel(KNOWN)} once it never occurs)")
    return lines, bad, accepted


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a cancelled CI job) raises KeyboardInterrupt, so the clean-up runs as it does on Ctrl-C."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=CASES, help="case patterns (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="bound on the wstest run, seconds")
    parser.add_argument("--outdir", type=Path, default=WORK / "report", help="report folder")
    parser.add_argument("--strict", action="store_true", help=f"accept no difference listed in {rel(KNOWN)}")
    args = parser.parse_args()
    outdir = args.outdir.resolve()
    known = {} if args.strict else load_known(KNOWN)
    started = time.monotonic()
    try:
        with sigterm_interrupts():
            wstest = build_venv()
        outcome = asyncio.run(run(wstest, args.cases, args.timeout, outdir))
    except RunError as error:
        print(f"autobahn: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("autobahn: interrupted", file=sys.stderr)
        return 2
    lines, bad, accepted = compare(outcome["expected"], outcome["results"], known)
    print("\n".join(lines))
    print(
        f"\nautobahn: {'FAIL' if bad else 'PASS'}: {bad} case(s) worse through wsgate or missing, "
        f"{accepted} known; {time.monotonic() - started:.0f} s; report {rel(outdir / 'index.html')}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
