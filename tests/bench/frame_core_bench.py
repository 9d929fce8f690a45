"""Frame core micro-benchmark: CPU-µs per ``FrameReader.receive_data`` of one masked 64-byte binary frame.

Not collected by pytest. Run:  .venv/bin/python tests/bench/frame_core_bench.py [--frames N] [--repeat N]

The reader is a client-side one (masked frames in, re-masked frames out) with the guards of a route:
message types and a message and byte rate (limits far above the load). Each implementation runs in a
subprocess of its own: "compiled" imports the package as installed here (the mypyc extension when it was
built), "pure" imports a copy of its ``.py`` files only. Both are printed when both can be imported.
Times are the process's CPU time (a machine shared with other work slows the wall clock more than that).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def measure(frames: int, repeat: int, size: int) -> None:
    """Runs in the subprocess: prints the implementation and the median µs per call."""
    from proxy import protocol
    from proxy.frames import apply_mask
    from proxy.policy.model import MessageRate, MessageRules
    from proxy.rules import MessageChecker

    key = b"\x01\x02\x03\x04"
    frame = bytes((0x82, 0x80 | size)) + key + bytes(apply_mask(bytes(range(size)), key))
    rules = MessageRules(max_message_bytes=1 << 20, types=frozenset({1, 2}))
    rate = MessageRate(messages_per_second=1e7, message_burst=10**7, bytes_per_second=1e10, byte_burst=10**10)
    reader = protocol.FrameReader(True, 1 << 20, 1024, MessageChecker(rules, rate, 0.0))
    receive = reader.receive_data
    assert len(receive(frame, 0.0)) == 1
    results = []
    for _ in range(repeat):
        now = 1.0
        start = time.process_time()
        for _ in range(frames):
            receive(frame, now)
            now += 1e-6
        results.append((time.process_time() - start) / frames * 1e6)
    assert reader.messages == repeat * frames + 1 and not reader.events
    kind = "compiled" if protocol.COMPILED else "pure"
    print(
        f"{kind:9} {statistics.median(results):6.3f} µs/frame  (min {min(results):.3f}; {protocol.__file__})"
    )


def run(kind: str, args: argparse.Namespace) -> None:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--frames",
        str(args.frames),
        "--repeat",
        str(args.repeat),
    ]
    command += ["--size", str(args.size)]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if kind == "pure":
            shutil.copytree(
                REPO / "proxy", Path(tmp) / "proxy", ignore=shutil.ignore_patterns("*.so", "*.pyd")
            )
            env["PYTHONPATH"] = tmp
        else:
            env["PYTHONPATH"] = str(REPO)
        subprocess.run(command, env=env, cwd=tmp, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=200_000, help="calls per round (default 200000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the median is printed (default 5)")
    parser.add_argument("--size", type=int, default=64, help="payload bytes, at most 125 (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="A B A B: each implementation this many times")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 <= args.size <= 125:
        parser.error("--size is at most 125 (a one-byte length)")
    if args.child:
        measure(args.frames, args.repeat, args.size)
        return
    compiled = any((REPO / "proxy").glob("protocol.*.so")) or any((REPO / "proxy").glob("protocol.*.pyd"))
    kinds = ["compiled", "pure"] if compiled else ["pure"]
    if not compiled:
        print("no compiled build in proxy/ (pip install -e . with a C compiler builds one): pure only")
    for _ in range(args.rounds):
        for kind in kinds:
            run(kind, args)


if __name__ == "__main__":
    main()
