"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and ``/policy``.

It listens on its own address (``admin.address``, loopback by default) and shares nothing with the client
listener, so none of these paths is ever reachable by WebSocket clients. Its connections are accepted by
:class:`~proxy.accept.Acceptor`, like the client listener's: a scrape while the process is out of file
descriptors waits in the backlog instead of spinning asyncio's accept loop.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from proxy import logs
from proxy.accept import Acceptor, bind_sockets
from proxy.policy.model import Address, Policy

#: Admin connections the kernel may queue (scrapers and probes, a few at a time).
ADMIN_BACKLOG = 128


@dataclass(slots=True)
class AdminState:
    """What the admin endpoints report, read at request time."""

    policy: Callable[[], Policy]
    #: Whether the client listener is up and the gateway is not draining.
    ready: Callable[[], bool]
    draining: Callable[[], bool]
    policy_loaded_at: Callable[[], float]
    started_at: float


class AdminServer:
    """An aiohttp application on the admin address."""

    def __init__(self, registry: CollectorRegistry, state: AdminState) -> None:
        self.registry = registry
        self.state = state
        self._runner: web.AppRunner | None = None
        self._acceptor: Acceptor | None = None
        self._connecting: set[asyncio.Task[object]] = set()
        self.address: Address | None = None

    async def start(self, address: Address, on_accept_error: Callable[[str, str], None]) -> Address:
        """Listen on ``address``; ``on_accept_error(listener, reason)`` counts failed accepts.

        Raises:
            OSError: the address cannot be bound.
        """
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/policy", self.policy)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            sockets = await bind_sockets(address, ADMIN_BACKLOG)
        except BaseException:
            await self.stop()
            raise
        self._acceptor = Acceptor("admin", sockets, self._accepted, on_accept_error)
        self._acceptor.start()
        self.address = Address(*self._acceptor.address)
        return self.address

    def _accepted(self, sock: socket.socket) -> None:
        server = self._runner.server if self._runner is not None else None
        if server is None:  # stopping
            sock.close()
            return
        loop = asyncio.get_running_loop()
        task: asyncio.Task[object] = loop.create_task(loop.connect_accepted_socket(server, sock))
        self._connecting.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        self._connecting.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: the scraper left at once
            logs.LOGGER.error("admin.error", exc_info=error)

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        for task in list(self._connecting):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format, or OpenMetrics when the scraper's ``Accept`` asks for it."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        """The process is alive and its event loop answers."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """200 while the policy is loaded and the client listener is up; 503 while draining."""
        if self.state.draining():
            return web.json_response({"status": "draining"}, status=503)
        if not self.state.ready():
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ready"})

    async def policy(self, request: web.Request) -> web.Response:
        """The active policy's identity, never its contents (no secrets, no key material)."""
        policy = self.state.policy()
        loaded_at = self.state.policy_loaded_at()
        return web.json_response(
            {
                "version": policy.version,
                "sha256": policy.sha256,
                "source": str(policy.source) if policy.source is not None else None,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded_at)),
                "loaded_at_unix": loaded_at,
                "routes": [route.path for route in policy.routes],
                "uptime_s": round(time.time() - self.state.started_at, 3),
            }
        )
