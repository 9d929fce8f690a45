"""Session benchmark: handshakes per second and memory per idle session, through wsgate (and nginx).

Not collected by pytest. Run:  .venv/bin/python tests/bench/sessions_bench.py [--sessions 2000]

Opens ``--sessions`` WebSocket sessions one after another (each a full upgrade through the proxy to the
minimal echo upstream of relay_bench.py), keeps them all open, and prints:
- handshakes/s: sessions opened per second, sequentially, over one client connection each;
- RSS per session: the proxy's resident memory growth divided by the sessions held open;
- proxy CPU per handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay_bench import (  # the sibling benchmark, found through the sys.path line above
    connect,
    free_port,
    run_upstream,
    start_nginx,
    start_wsgate,
    stop_all,
    tree_cpu_seconds,
    wait_port,
)


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


async def measure(port: int, pids: list[int], sessions: int) -> dict[str, float]:
    warm = [await connect(port) for _ in range(20)]
    for client in warm:
        client.transport.abort()
    await asyncio.sleep(0.5)
    rss_before = rss_bytes(pids)
    cpu_before = tree_cpu_seconds(pids)
    started = time.perf_counter()
    clients = [await connect(port) for _ in range(sessions)]
    elapsed = time.perf_counter() - started
    cpu = tree_cpu_seconds(pids) - cpu_before
    await asyncio.sleep(0.5)
    rss_after = rss_bytes(pids)
    for client in clients:
        client.transport.abort()
    return {
        "handshakes_per_s": sessions / elapsed,
        "kib_per_session": (rss_after - rss_before) / sessions / 1024,
        "cpu_ms_per_handshake": cpu / sessions * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--baseline", type=Path, help="another checkout of wsgate, measured after this one")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.sessions * 2 + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.sessions * 2 + 100), hard))

    import uvloop

    upstream_port = free_port()
    upstream = multiprocessing.Process(target=run_upstream, args=(upstream_port,), daemon=True)
    upstream.start()
    wait_port(upstream_port)
    results: dict[str, dict[str, float]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            process, port, pids = start_wsgate(upstream_port, workdir)
            procs.append(process)
            results["wsgate"] = uvloop.run(measure(port, pids, args.sessions))
            if args.baseline is not None:
                process, port, pids = start_wsgate(upstream_port, workdir, args.baseline.resolve())
                procs.append(process)
                results["baseline"] = uvloop.run(measure(port, pids, args.sessions))
            if not args.no_nginx:
                started = start_nginx(upstream_port, workdir)
                if started is not None:
                    procs.append(started[0])
                    results["nginx"] = uvloop.run(measure(started[1], started[2], args.sessions))
        finally:
            stop_all(procs, upstream)
    print(f"\nsession benchmark: {args.sessions} sessions opened one by one and held open")
    print(f"{'target':<9} {'handshakes/s':>13} {'KiB/session':>12} {'CPU ms/handshake':>17}")
    for name, figures in results.items():
        print(
            f"{name:<9} {figures['handshakes_per_s']:>13.0f} {figures['kib_per_session']:>12.1f} "
            f"{figures['cpu_ms_per_handshake']:>17.3f}"
        )


if __name__ == "__main__":
    main()
