"""One worker of ``wsgate serve --workers N``, as the worker sees it.

A worker is a whole gateway (its own listener, sessions, reload, drain), started by the supervisor
(:mod:`proxy.workers`) with hidden arguments. What differs from a single process, and lives here:

* it binds the client address the supervisor resolved (``SO_REUSEPORT``: every worker listens on it, and
  the kernel spreads connections over them), and its admin listener on 127.0.0.1 with a port of its own;
* it tells the supervisor that admin address on a socket inherited from it (never through the logs), and
  drains as on SIGTERM when that socket reaches its end: a supervisor that died leaves no orphan behind;
* every log line carries ``worker`` (its index);
* a policy whose per-IP or per-subject limits would be counted by each worker on its own is refused, at
  start and on reload (:func:`unshared_limits_problem`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from proxy import logs
from proxy.errors import PolicyError
from proxy.policy.model import Address, Limits, Policy

#: The limits each worker would count on its own with the in-process limiter.
PER_CLIENT_LIMITS = ("handshakes_per_ip", "connections_per_ip", "connections_per_subject")

#: Where a worker's admin listener binds: loopback, a port chosen by the kernel.
WORKER_ADMIN = Address("127.0.0.1", 0)


def unshared_limits_problem(policy: Policy, workers: int) -> PolicyError | None:
    """Why ``policy`` cannot run on ``workers`` processes, if it cannot.

    A per-IP or per-subject limit counted in process memory would be ``workers`` times looser (each worker
    counts only the clients the kernel gave it), so with more than one worker such a limit needs the
    shared limiter (``limiter.redis``). ``handshake_burst`` counts with ``handshakes_per_ip`` and is
    covered by it (a burst without its rate does nothing).
    """
    if workers <= 1 or policy.limiter.redis is not None:
        return None
    scopes: list[tuple[str, Limits]] = [("limits", policy.limits)]
    scopes += [(f"routes[{index}].limits", route.limits) for index, route in enumerate(policy.routes)]
    for where, limits in scopes:
        for field in PER_CLIENT_LIMITS:
            if getattr(limits, field) is not None:
                return PolicyError(
                    policy.source,
                    None,
                    f"{where}.{field}",
                    f"with --workers {workers} each worker counts on its own, so the limit would be "
                    f"{workers}x looser; configure limiter.redis",
                )
    return None


class WorkerLogField(logging.Filter):
    """Adds ``worker`` (the index) to every log record of wsgate's logger."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {"worker": self.index, **(getattr(record, "fields", None) or {})}
        return True


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What the supervisor told one worker: who it is and where to listen."""

    index: int
    workers: int
    #: The inherited socket to the supervisor.
    channel_fd: int
    #: The client port the supervisor holds (the policy's, or the one chosen for port 0).
    port: int

    def listen_address(self, policy: Policy) -> Address:
        return Address(policy.listen.address.host, self.port)

    def vet(self, policy: Policy) -> str | None:
        """Why a reload into ``policy`` is refused by this worker (None: it is not)."""
        problem = unshared_limits_problem(policy, self.workers)
        return None if problem is None else str(problem)

    def tag_logs(self) -> None:
        logs.LOGGER.addFilter(WorkerLogField(self.index))


class SupervisorChannel:
    """The worker's end of the socket to its supervisor: one JSON line up, then watch for its end."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self._sock = socket.socket(fileno=role.channel_fd)
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def report(self, address: Address, admin: Address, on_gone: Callable[[], None]) -> None:
        """Send ``{"index", "pid", "address", "admin": [host, port]}``; call ``on_gone`` once the supervisor
        is gone."""
        reader, writer = await asyncio.open_unix_connection(sock=self._sock)
        line = {
            "index": self.role.index,
            "pid": os.getpid(),
            "address": str(address),
            "admin": [admin.host, admin.port],
        }
        writer.write(json.dumps(line).encode() + b"\n")
        await writer.drain()

        async def watch() -> None:
            try:
                while await reader.read(4096):
                    pass  # the supervisor sends nothing; anything it might is ignored
            except OSError:
                pass  # a reset is an end like another
            logs.event("worker.orphaned", logging.WARNING, index=self.role.index)
            on_gone()

        self._task = asyncio.get_running_loop().create_task(watch())
        self._writer = writer

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
