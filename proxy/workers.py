"""``wsgate serve --workers N``: a supervisor process and N worker processes, each a whole gateway.

The supervisor holds the client address (bound, not listening: the port chosen for port 0 stays the same
for every worker and every restart), starts the workers (``python -m proxy serve ... --worker-index I``),
and serves ``admin.address`` (:mod:`proxy.admin_parent`). Each worker listens on the client address with
``SO_REUSEPORT``, so the kernel spreads new connections over them, and reports its private admin address
on a socket pair it inherits (:mod:`proxy.worker`).

What the supervisor guarantees:

* start: it returns (exit 1) once any worker fails before it reported, after stopping the others; the
  worker's own ``error:`` line says why;
* SIGHUP is passed to every worker (each also watches the policy file itself);
* SIGTERM or SIGINT is passed to every worker, each drains (1001) as a single process does, ``/readyz``
  answers 503 at once, and the supervisor exits 0 when every worker exited (1 if one did not exit 0); a
  second signal is passed on too, and every worker cuts its sessions at once;
* a worker that dies outside a shutdown is logged (``worker.exited``) and started again
  (``worker.started``) after a backoff: 0.5 s, doubling up to 10 s, back to 0.5 s once a worker lived 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from proxy import logs
from proxy.accept import bind_sockets
from proxy.admin_parent import SupervisorAdmin, SupervisorView, WorkerEndpoint
from proxy.errors import StartupError
from proxy.policy.model import Address, Policy

#: How long a starting worker has to report its admin address.
START_TIMEOUT = 30.0
#: Restart backoff: the first delay, its ceiling, and how long a worker must live to reset it.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
BACKOFF_RESET_AFTER = 30.0
#: A worker still running this long after the drain should have ended (``drain_timeout`` plus this), or
#: this long after the second signal, is killed: a stopped or wedged worker must not hold the stop.
KILL_AFTER_DRAIN = 10.0
KILL_AFTER_SECOND_SIGNAL = 5.0


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower() if error.errno else str(error)


@dataclass(slots=True)
class WorkerSlot:
    """Worker ``index``: its current process (if any) and its restart backoff."""

    index: int
    process: asyncio.subprocess.Process | None = None
    endpoint: WorkerEndpoint | None = None
    #: The supervisor's end of the socket pair the worker reported on; its end tells the worker to drain.
    channel: asyncio.StreamWriter | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_FIRST
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    #: What sets ``exited`` when the current process ends.
    waiter: asyncio.Future[int] | None = None


class Supervisor:
    """Runs ``count`` workers of the policy file ``config`` until a signal stops them."""

    def __init__(self, policy: Policy, config: str, count: int, worker_args: list[str]) -> None:
        self.policy = policy
        self.config = os.path.abspath(config)
        self.count = count
        self.worker_args = worker_args
        self.slots = [WorkerSlot(index) for index in range(count)]
        self.restarts = 0
        self._stopped = asyncio.Event()
        self._port = 0
        self._held: list[socket.socket] = []
        self._watchers: set[asyncio.Task[None]] = set()
        self._kill_timers: list[asyncio.TimerHandle] = []
        self.admin = SupervisorAdmin(
            SupervisorView(
                workers=self.endpoints,
                expected=count,
                draining=lambda: self.stopping,
                restarts=lambda: self.restarts,
            )
        )

    @property
    def stopping(self) -> bool:
        """Whether a signal (or a failed start) is stopping the workers."""
        return self._stopped.is_set()

    def endpoints(self) -> list[WorkerEndpoint]:
        return [slot.endpoint for slot in self.slots if slot.endpoint is not None]

    async def run(self) -> int:
        """Start everything, serve until stopped; the exit code.

        Raises:
            StartupError: an address cannot be bound, or a worker did not start.
        """
        listen = self.policy.listen.address
        try:
            self._held = await bind_sockets(listen, 0, listen=False)
        except OSError as error:
            raise StartupError(f"cannot listen on {listen} (listen.address): {_reason(error)}") from None
        port = int(self._held[0].getsockname()[1])
        try:
            try:
                admin = await self.admin.start(self.policy.admin)
            except OSError as error:
                message = f"cannot listen on {self.policy.admin} (admin.address): {_reason(error)}"
                raise StartupError(message) from None
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(signum, self._on_signal, signum)
            await self._start_all(port)
            logs.event(
                "supervisor.listening",
                address=str(Address(listen.host, port)),
                admin=str(admin),
                workers=self.count,
                pids=[slot.process.pid for slot in self.slots if slot.process is not None],
            )
            await self._until_all_exited()
        finally:
            await self._cleanup()
        codes = [slot.process.returncode for slot in self.slots if slot.process is not None]
        logs.event("supervisor.stopped", exit_codes=codes)
        return 0 if all(code == 0 for code in codes) else 1

    # -- starting workers -----------------------------------------------------------------

    async def _start_all(self, port: int) -> None:
        """Start every worker; if one fails, stop the others and raise.

        Raises:
            StartupError: a worker did not start.
        """
        self._port = port
        started = await asyncio.gather(*(self._start(slot) for slot in self.slots), return_exceptions=True)
        failed = [result for result in started if isinstance(result, BaseException)]
        if failed:
            stopped_by_signal = self._stopped.is_set()
            self._stopped.set()
            self._signal_all(signal.SIGTERM)
            await asyncio.gather(*(slot.exited.wait() for slot in self.slots if slot.process is not None))
            if stopped_by_signal:  # told to stop while starting: the workers that did start drained
                return
            if isinstance(failed[0], StartupError):
                raise failed[0]
            raise StartupError(f"cannot start the workers: {failed[0]}") from failed[0]
        for slot in self.slots:
            self._watch(slot)

    async def _start(self, slot: WorkerSlot) -> None:
        """Start worker ``slot.index`` and wait for its report.

        Raises:
            StartupError: it exited, or did not report in time.
        """
        ours, theirs = socket.socketpair()
        command = [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "-c",
            self.config,
            *self.worker_args,
            "--worker-index",
            str(slot.index),
            "--worker-of",
            str(self.count),
            "--worker-port",
            str(self._port),
            "--worker-fd",
            str(theirs.fileno()),
        ]
        slot.exited = asyncio.Event()
        slot.endpoint = None
        try:
            slot.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                # A group of its own: a terminal's Ctrl-C reaches the supervisor only, which passes it on
                # once (twice would mean "cut every session now").
                start_new_session=True,
            )
        except OSError as error:  # EAGAIN, ENOMEM, EMFILE: no process, so nothing will ever exit
            ours.close()
            slot.exited.set()
            raise StartupError(f"cannot start worker {slot.index}: {error.strerror or error}") from None
        finally:
            theirs.close()
        process = slot.process
        slot.started_at = time.monotonic()
        if self.stopping:  # a signal came while it was being started
            process.send_signal(signal.SIGTERM)
        exited = slot.exited
        exit_task = slot.waiter = asyncio.ensure_future(process.wait())
        exit_task.add_done_callback(lambda _: exited.set())
        if slot.channel is not None:
            slot.channel.close()
        reader, slot.channel = await asyncio.open_unix_connection(sock=ours)
        report = asyncio.ensure_future(reader.readline())
        done, _ = await asyncio.wait(
            {report, exit_task}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if report not in done or report.exception() is not None or not report.result():
            report.cancel()
            if process.returncode is None:
                process.kill()
            raise StartupError(f"worker {slot.index} (pid {process.pid}) did not start")
        try:
            line = json.loads(report.result())
            host, admin_port = line["admin"]
            endpoint = WorkerEndpoint(slot.index, process.pid, Address(str(host), int(admin_port)))
        except (ValueError, KeyError, TypeError) as error:
            process.kill()
            raise StartupError(
                f"worker {slot.index} (pid {process.pid}) reported {report.result()!r}"
            ) from error
        slot.endpoint = endpoint
        logs.event("worker.started", index=slot.index, pid=process.pid, admin=str(endpoint.admin))

    # -- watching them --------------------------------------------------------------------

    def _watch(self, slot: WorkerSlot) -> None:
        task = asyncio.get_running_loop().create_task(self._keep_alive(slot))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _keep_alive(self, slot: WorkerSlot) -> None:
        """Restart worker ``slot`` each time it dies, until the supervisor stops (bounded by the backoff)."""
        start_failed = False  # the last start failed, and said so: no exit to report for it
        while not self._stopped.is_set():
            await slot.exited.wait()
            if self._stopped.is_set():
                return
            slot.endpoint = None
            if not start_failed:
                process = slot.process
                assert process is not None  # a started slot
                code = process.returncode
                lived = time.monotonic() - slot.started_at
                fields: dict[str, object] = {
                    "index": slot.index,
                    "pid": process.pid,
                    "lived_s": round(lived, 3),
                }
                if code is not None and code < 0:
                    fields["signal"] = signal.Signals(-code).name
                else:
                    fields["exit_code"] = code
                if lived >= BACKOFF_RESET_AFTER:
                    slot.backoff = BACKOFF_FIRST
                logs.event("worker.exited", logging.ERROR, **fields, restart_in_s=slot.backoff)
            start_failed = False
            await asyncio.sleep(slot.backoff)
            slot.backoff = min(slot.backoff * 2, BACKOFF_MAX)
            if self._stopped.is_set():
                return
            try:
                await self._start(slot)
            except StartupError as error:
                logs.event(
                    "worker.start_failed",
                    logging.ERROR,
                    index=slot.index,
                    error=str(error),
                    retry_in_s=slot.backoff,
                )
                start_failed = True
                continue
            self.restarts += 1

    async def _until_all_exited(self) -> None:
        """Until a signal stopped the supervisor and every worker exited."""
        await self._stopped.wait()
        await asyncio.gather(*(slot.exited.wait() for slot in self.slots))

    # -- signals --------------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            logs.event("supervisor.signal", signal=name, action="reload")
            self._signal_all(signum)
            return
        first = not self.stopping
        logs.event("supervisor.signal", signal=name, action="drain" if first else "exit now")
        self._stopped.set()
        self._signal_all(signum)
        if first:
            after, why = self.policy.limits.drain_timeout + KILL_AFTER_DRAIN, "the drain took too long"
        else:
            after, why = KILL_AFTER_SECOND_SIGNAL, "no exit after the second signal"
        self._kill_timers.append(asyncio.get_running_loop().call_later(after, self._kill_remaining, why))

    def _kill_remaining(self, why: str) -> None:
        """SIGKILL every worker still running (stopped, wedged, or ignoring its signals)."""
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                logs.event("worker.killed", logging.ERROR, index=slot.index, pid=process.pid, why=why)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # it exited just now; its watcher says so
                    process.send_signal(signum)

    async def _cleanup(self) -> None:
        for timer in self._kill_timers:
            timer.cancel()
        for task in list(self._watchers):
            task.cancel()
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.close()
                slot.channel = None
        await self.admin.stop()
        for sock in self._held:
            sock.close()
