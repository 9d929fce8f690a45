"""The admin listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/policy``, the page and ``/sessions``.

It listens on its own address (``admin.address``, loopback by default) and shares nothing with the client
listener, so none of these paths is ever reachable by WebSocket clients. Its connections are accepted by
:class:`~proxy.accept.Acceptor`, like the client listener's: a scrape while the process is out of file
descriptors waits in the backlog instead of spinning asyncio's accept loop.

``/sessions`` and ``/sessions/close`` name who is connected and can close them: they answer only with
``Authorization: Bearer <admin token>`` (compared in constant time, read from the policy active at the time
of the request), and do not exist (404, as any unknown path) when the policy sets no ``admin.token_env``.
The page (``/``) and ``/status.json`` hold counts only, like ``/metrics``, and need no token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from proxy import logs
from proxy.admin_listener import AdminListener
from proxy.admin_page import PolicyInfo, StatusHistory, load_page, status
from proxy.errors import AdminRequestError
from proxy.policy.model import Address, Policy
from proxy.session_control import (
    CloseSessions,
    Selector,
    close_request,
    describe,
    local_close,
    matching,
)
from proxy.sessions import Session

#: The largest request body the admin listener reads (a close request is a few fields): 413 above.
MAX_ADMIN_BODY = 16 * 1024


@dataclass(slots=True)
class AdminState:
    """What the admin endpoints report, read at request time."""

    policy: Callable[[], Policy]
    #: Whether the client listener is up and the gateway is not draining.
    ready: Callable[[], bool]
    draining: Callable[[], bool]
    policy_loaded_at: Callable[[], float]
    started_at: float
    #: The live sessions of this process, for ``GET /sessions``.
    sessions: Callable[[], Iterable[Session]] = lambda: ()
    #: How ``POST /sessions/close`` closes sessions (see :data:`CloseSessions`); its dict is the answer.
    close_sessions: CloseSessions = field(default_factory=lambda: local_close(lambda: ()))


class AdminServer:
    """An aiohttp application on the admin address."""

    def __init__(
        self, registry: CollectorRegistry, state: AdminState, history: StatusHistory | None = None
    ) -> None:
        self.registry = registry
        self.state = state
        #: Sampled from ``registry`` every ``history.interval`` seconds while serving.
        self.history = history or StatusHistory()
        self.page = load_page()
        self._sampler: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._listener: AdminListener | None = None
        self.address: Address | None = None

    async def start(self, address: Address, on_accept_error: Callable[[str, str], None]) -> Address:
        """Listen on ``address``; ``on_accept_error(listener, reason)`` counts failed accepts.

        Raises:
            OSError: the address cannot be bound.
        """
        app = web.Application(client_max_size=MAX_ADMIN_BODY)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/policy", self.policy)
        app.router.add_get("/", self.index)
        app.router.add_get("/status.json", self.status)
        # Any method: the token check comes first, so that without admin.token_env a wrong method is
        # 404 like any unknown path rather than a 405 that tells the path exists.
        app.router.add_route("*", "/sessions", self.sessions)
        app.router.add_route("*", "/sessions/close", self.close_sessions)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._listener = AdminListener(self._runner, "admin", on_accept_error)
        try:
            self.address = await self._listener.start(address)
        except BaseException:
            await self.stop()
            raise
        self._sampler = asyncio.get_running_loop().create_task(self._sample_periodically())
        self._sampler.add_done_callback(self._sampler_done)
        return self.address

    async def _sample_periodically(self) -> None:
        """One history sample per interval until :meth:`stop` cancels it."""
        while True:
            self.history.sample(self.registry.collect())
            await asyncio.sleep(self.history.interval)

    def _sampler_done(self, task: asyncio.Task[None]) -> None:
        # Only a bug ends the sampler early: said once; /status.json then shows what history it has.
        error = None if task.cancelled() else task.exception()
        if error is not None:
            logs.LOGGER.error("admin.sampler_failed", exc_info=error)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
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

    # -- the page -------------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        """The admin page: one self-contained HTML document that polls ``/status.json``."""
        return web.Response(
            body=self.page.html,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": self.page.content_security_policy,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    async def status(self, request: web.Request) -> web.Response:
        """Counts for the page: routes and live sessions, refusals per minute, message rates, policy."""
        policy = self.state.policy()
        info = PolicyInfo(sha256=policy.sha256, routes=tuple(route.path for route in policy.routes))
        document = status(self.registry.collect(), self.history, info)
        return web.json_response(document, headers={"Cache-Control": "no-store"})

    # -- sessions (token-protected) -------------------------------------------------------------------

    def _authorize(self, request: web.Request, method: str) -> None:
        """Let the request through only with the active policy's admin token, then only by ``method``.

        Raises:
            web.HTTPNotFound: the policy sets no admin token: these paths do not exist.
            web.HTTPUnauthorized: no bearer token, or another one.
            web.HTTPMethodNotAllowed: the right token, another method than ``method``.
        """
        policy = self.state.policy()
        if policy.admin_token_env is None:
            raise web.HTTPNotFound()
        expected = policy.admin_token
        scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not offered.strip():
            raise _unauthorized('Bearer realm="wsgate admin"', "a bearer token is required")
        # Compared as bytes: compare_digest takes str only when both are ASCII.
        given = offered.strip().encode("utf-8", "surrogateescape")
        if not expected or not hmac.compare_digest(given, expected.encode("utf-8")):
            raise _unauthorized('Bearer realm="wsgate admin", error="invalid_token"', "wrong token")
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, [method])

    async def sessions(self, request: web.Request) -> web.Response:
        """The live sessions the query's selector names (all without one), oldest first."""
        self._authorize(request, "GET")
        try:
            selector = Selector.from_query(request.query.items())
        except AdminRequestError as error:
            return _bad_request(str(error))
        found = matching(self.state.sessions(), selector)
        return web.json_response([describe(session) for session in found])

    async def close_sessions(self, request: web.Request) -> web.Response:
        """Close the sessions the body's selector names with 1008 and its reason: ``{"closed": N, ...}``."""
        self._authorize(request, "POST")
        if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
            raise web.HTTPRequestEntityTooLarge(MAX_ADMIN_BODY, request.content_length)
        raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors;
            # RecursionError: a body of nothing but brackets, nested deeper than the decoder goes.
            return _bad_request("the body must be a JSON object")
        try:
            selector, reason = close_request(body)
        except AdminRequestError as error:
            return _bad_request(str(error))
        result = await self.state.close_sessions(selector, reason)
        fields: dict[str, Any] = {**selector.to_mapping(), "reason": reason, "remote": request.remote}
        for key, value in result.items():
            if isinstance(value, int | str) and key not in fields:
                fields[key] = value
        logs.event("admin.sessions_closed", **fields)
        # Some replicas could not be reached (their Redis is down): what was closed here is said, with 503.
        return web.json_response(result, status=503 if "error" in result else 200)


def _unauthorized(challenge: str, message: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=json.dumps({"error": "unauthorized", "detail": message}),
        content_type="application/json",
        headers={"WWW-Authenticate": challenge},
    )


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": "bad_request", "detail": message}, status=400)
