"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz`` and ``/policy``.

It listens on its own address (``admin.address``, loopback by default) and shares nothing with the client
listener, so none of these paths is ever reachable by WebSocket clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from proxy.policy.model import Address, Policy


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
        self.address: Address | None = None

    async def start(self, address: Address) -> Address:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/policy", self.policy)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, address.host, address.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await self.stop()
            raise
        host, port = self._runner.addresses[0][:2]
        self.address = Address(host, port)
        return self.address

    async def stop(self) -> None:
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
