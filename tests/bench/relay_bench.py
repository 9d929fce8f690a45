"""Relay benchmark: direct to an echo upstream vs through wsgate (vs through nginx when installed).

Not collected by pytest. Run:  .venv/bin/python tests/bench/relay_bench.py [--quick]

Three processes share the machine: a minimal uvloop echo upstream, the proxy under test, and this client.
Both the upstream and the client are raw-frame uvloop protocols, so what is measured is mostly the proxy.

Figures printed per target:
- latency: p50/p99 round trip of one 64-byte message at a time on one connection;
- throughput: messages/s echoed by ``--connections`` connections, each with ``--window`` messages in flight;
- proxy CPU: user+system CPU-seconds of the proxy process per 100k messages relayed (an echo relays 2).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- a minimal echo upstream (runs in its own process) ----------------------------------------------


class EchoUpstream(asyncio.Protocol):
    """Answers the upgrade, then echoes every masked client frame back unmasked (same opcode)."""

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        self.buffer = bytearray()
        self.upgraded = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            del self.buffer[: end + 4]
            key = next(
                line.split(":", 1)[1].strip()
                for line in head.split("\r\n")
                if line.lower().startswith("sec-websocket-key:")
            )
            import hashlib

            accept = base64.b64encode(
                hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            ).decode()
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
            )
            self.upgraded = True
        out = []
        buf = self.buffer
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, hlen = b1 & 0x7F, 2
            if length == 126:
                if len(buf) - pos < 4:
                    break
                length, hlen = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if len(buf) - pos < 10:
                    break
                length, hlen = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            masked = b1 & 0x80
            total = hlen + (4 if masked else 0) + length
            if len(buf) - pos < total:
                break
            payload = bytes(buf[pos + total - length : pos + total])
            if masked:
                key = buf[pos + hlen : pos + hlen + 4]
                mask = (bytes(key) * (length // 4 + 1))[:length]
                unmasked = int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")
                payload = unmasked.to_bytes(length, "big")
            opcode = b0 & 0x0F
            if opcode == 0x8:
                self.transport.write(bytes([0x88, len(payload)]) + payload)
                self.transport.close()
                return
            out.append(_frame(opcode, payload, None, fin=bool(b0 & 0x80)))
            pos += total
        del buf[:pos]
        if out:
            self.transport.write(b"".join(out))


def run_upstream(port: int) -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(EchoUpstream, "127.0.0.1", port, backlog=512)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# -- client ---------------------------------------------------------------------------------------


def _frame(opcode: int, payload: bytes, mask: bytes | None, fin: bool = True) -> bytes:
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        head = bytes([first, mask_bit | length])
    elif length < 65536:
        head = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if mask is None:
        return head + payload
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return head + mask + masked


class Client(asyncio.Protocol):
    """Counts whole messages received (a proxy may pass a message on as several frames: the frames that
    end one are counted); wakes a waiter at a target count."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.received = 0
        self.target = 0
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:12])
            del buf[: end + 4]
            if b" 101" not in status:
                self.upgraded.set_exception(RuntimeError(f"handshake failed: {status!r}"))
                return
            self.upgraded.set_result(None)
        pos, n = 0, len(buf)
        count = 0
        while n - pos >= 2:
            length, hlen = buf[pos + 1] & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, hlen = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, hlen = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n - pos < hlen + length:
                break
            if buf[pos] & 0x80 and not buf[pos] & 0x08:
                count += 1
            pos += hlen + length
        del buf[:pos]
        self.received += count
        if self.waiter is not None and self.received >= self.target and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait_for(self, total: int) -> None:
        if self.received >= total:
            return
        self.target = total
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter


async def connect(port: int, path: str = "/echo") -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(Client, "127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    client.transport.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await asyncio.wait_for(client.upgraded, 10)
    return client


#: Whether the client sends text (checked as UTF-8 by default) instead of binary messages; set by --text.
TEXT_MESSAGES = False


def _message(size: int) -> tuple[int, bytes]:
    """An (opcode, payload) of the kind the run measures."""
    if TEXT_MESSAGES:
        return 0x1, ("é" * (size // 2)).encode()[:size].ljust(size, b"x")
    return 0x2, os.urandom(size)


async def latency(port: int, rounds: int, size: int, path: str = "/echo") -> tuple[float, float]:
    client = await connect(port, path)
    frame = _frame(*_message(size), os.urandom(4))
    samples = []
    for index in range(rounds):
        started = time.perf_counter()
        client.transport.write(frame)
        await client.wait_for(index + 1)
        samples.append(time.perf_counter() - started)
    client.transport.abort()
    samples = samples[rounds // 10 :]  # warm-up out
    quantiles = statistics.quantiles(samples, n=100)
    return quantiles[49] * 1e6, quantiles[98] * 1e6


async def throughput(
    port: int, connections: int, per_connection: int, window: int, size: int, path: str = "/echo"
) -> float:
    clients = [await connect(port, path) for _ in range(connections)]
    batch = b"".join(_frame(*_message(size), os.urandom(4)) for _ in range(window))

    async def pump(client: Client) -> None:
        sent = 0
        while sent < per_connection:
            client.transport.write(batch)
            sent += window
            await client.wait_for(sent - window // 2 if sent < per_connection else sent)

    started = time.perf_counter()
    await asyncio.gather(*(pump(client) for client in clients))
    elapsed = time.perf_counter() - started
    for client in clients:
        client.transport.abort()
    total = sum(client.received for client in clients)
    return total / elapsed


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


# -- proxies ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


BENCH_SECRET = "relay-benchmark-secret-0123456789abcdef"


def guarded_path() -> str:
    """The guarded route, with a valid token in the query (the raw client sends no headers)."""
    import jwt

    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, BENCH_SECRET, algorithm="HS256")
    return f"/guarded?access_token={token}"


def start_wsgate(
    upstream_port: int, workdir: Path, repo: Path = REPO
) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    """``wsgate serve`` from the checkout ``repo`` (this one unless --baseline names another)."""
    port = free_port()
    policy = workdir / f"bench-{port}.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            listen: {{address: "127.0.0.1:{port}"}}
            admin: {{address: "127.0.0.1:0"}}
            limits: {{max_message_size: 1MiB, idle_timeout: 0}}
            trusted_proxies: [10.0.0.0/8]
            firewall: {{default: allow, rules: [{{deny: 192.0.2.0/24}}, {{allow: 127.0.0.0/8}}]}}
            auth:
              bench: {{algorithms: [HS256], secret_env: WSGATE_BENCH_SECRET, token_sources: [header, query]}}
            routes:
              - path: /echo
                upstream: ws://127.0.0.1:{upstream_port}/echo
                auth: none
              # every per-message guard on, with limits far above the load: the cost of checking
              - path: /guarded
                upstream: ws://127.0.0.1:{upstream_port}/echo
                auth: bench
                forward_claims: {{sub: X-User-Id}}
                limits:
                  messages_per_connection: 10000000/s
                  message_burst: 10000000
                  bytes_per_connection: 10GiB/s
                  byte_burst: 10GiB
                messages:
                  client: {{types: [text, binary]}}
                  upstream: {{types: [text, binary], max_message_size: 1MiB}}
            """
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "-c", str(policy), "--log-level", "warning"],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "WSGATE_BENCH_SECRET": BENCH_SECRET},
    )
    wait_port(port)
    return process, port, [process.pid]


def start_nginx(upstream_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int, list[int]] | None:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        return None
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            worker_processes 1;
            daemon off;
            pid {workdir}/nginx.pid;
            error_log {workdir}/nginx-error.log warn;
            events {{ worker_connections 4096; }}
            http {{
              access_log off;
              client_body_temp_path {workdir};
              proxy_temp_path {workdir};
              fastcgi_temp_path {workdir};
              uwsgi_temp_path {workdir};
              scgi_temp_path {workdir};
              server {{
                listen 127.0.0.1:{port};
                location /echo {{
                  proxy_pass http://127.0.0.1:{upstream_port};
                  proxy_http_version 1.1;
                  proxy_set_header Upgrade $http_upgrade;
                  proxy_set_header Connection "upgrade";
                  proxy_read_timeout 1h;
                }}
              }}
            }}
            """
        )
    )
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL)
    wait_port(port)
    time.sleep(0.2)
    pgrep = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    children = pgrep.stdout.split()
    return process, port, [process.pid, *map(int, children)]


def stop_all(procs: list[subprocess.Popen[bytes]], upstream: multiprocessing.Process) -> None:
    """SIGTERM the proxies (a graceful drain), kill what does not exit, stop the upstream."""
    for process in procs:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
    upstream.terminate()


# -- main ------------------------------------------------------------------------------------------


async def measure(
    name: str, port: int, pids: list[int], args: argparse.Namespace, path: str = "/echo"
) -> dict[str, float]:
    p50, p99 = await latency(port, args.rounds, 64, path)
    before = tree_cpu_seconds(pids) if pids else 0.0
    rate = await throughput(port, args.connections, args.messages, args.window, args.size, path)
    total_messages = args.connections * args.messages
    cpu = (tree_cpu_seconds(pids) - before) if pids else 0.0
    relayed = total_messages * 2  # each echo is relayed once each way
    return {
        "p50_us": p50,
        "p99_us": p99,
        "msgs_per_s": rate,
        "cpu_s_per_100k": cpu / relayed * 100_000 if pids else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5000, help="latency round trips (default 5000)")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--messages", type=int, default=10000, help="messages per connection")
    parser.add_argument("--window", type=int, default=50, help="messages in flight per connection")
    parser.add_argument("--size", type=int, default=256, help="payload bytes (throughput)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the work, for a smoke run")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--text", action="store_true", help="text messages (UTF-8 checked) instead of binary")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout of wsgate, measured in turn with this one (A B A B)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the wsgate targets; medians shown")
    args = parser.parse_args()
    global TEXT_MESSAGES
    TEXT_MESSAGES = args.text
    if args.quick:
        args.rounds, args.messages = args.rounds // 10, args.messages // 10

    upstream_port = free_port()
    upstream = multiprocessing.Process(target=run_upstream, args=(upstream_port,), daemon=True)
    upstream.start()
    wait_port(upstream_port)
    results: dict[str, dict[str, float]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            import uvloop

            runner = uvloop.run
            results["direct"] = runner(measure("direct", upstream_port, [], args))
            gateways = {"wsgate": start_wsgate(upstream_port, workdir)}
            if args.baseline is not None:
                gateways["baseline"] = start_wsgate(upstream_port, workdir, args.baseline.resolve())
            procs.extend(process for process, _, _ in gateways.values())
            rounds: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.repeat):
                for name, (_, port, pids) in gateways.items():
                    for target, path in ((name, "/echo"), (f"{name}+guards", guarded_path())):
                        rounds.setdefault(target, []).append(runner(measure(target, port, pids, args, path)))
            for target, runs in rounds.items():
                results[target] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            if not args.no_nginx:
                started = start_nginx(upstream_port, workdir)
                if started is not None:
                    procs.append(started[0])
                    results["nginx"] = runner(measure("nginx", started[1], started[2], args))
        finally:
            stop_all(procs, upstream)
    print(
        f"\nrelay benchmark: latency {args.rounds} round trips of 64 B; "
        f"throughput {args.connections} conns x {args.messages} msgs of {args.size} B, "
        f"window {args.window}; {os.cpu_count()} CPUs"
    )
    print(f"{'target':<14} {'p50 µs':>8} {'p99 µs':>8} {'msgs/s':>10} {'proxy CPU-s/100k msgs':>22}")
    for name, figures in results.items():
        print(
            f"{name:<14} {figures['p50_us']:>8.0f} {figures['p99_us']:>8.0f} {figures['msgs_per_s']:>10.0f} "
            f"{figures['cpu_s_per_100k']:>22.3f}"
        )


if __name__ == "__main__":
    main()
