"""The supervisor's admin listener (``admin.address`` under ``wsgate serve --workers N``).

Each worker has a private admin listener on 127.0.0.1; this one answers for the whole gateway:

* ``/metrics``: every worker's scrape, fetched concurrently, merged (:mod:`proxy.metrics_merge`), plus the
  supervisor's own ``wsgate_workers``, ``wsgate_worker_restarts_total`` and ``wsgate_workers_scraped`` (how
  many workers answered this scrape in time; a slow one is left out rather than failing the scrape);
* ``/readyz``: 200 only when every worker answers 200; otherwise 503 naming the workers that do not;
* ``/healthz``: the supervisor's loop answers; ``/policy``: worker 0's answer;
* ``/status.json`` (the admin page's document): computed here from the merged metrics, sampled every
  ``StatusHistory.interval`` into the supervisor's own history, so the page counts every worker;
* ``GET /sessions``: every worker's list, concatenated; ``POST /sessions/close``: sent to every worker,
  ``closed`` summed, unless the workers share a Redis (then worker 0's close reached them all, and its
  answer is the answer). A worker's 401, 404 or 400 is passed on as is;
* any other path is forwarded to worker 0 unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from proxy import logs
from proxy.admin import MAX_ADMIN_BODY
from proxy.admin_listener import AdminListener
from proxy.admin_page import PolicyInfo, StatusHistory, status
from proxy.metrics_merge import MergedMetrics
from proxy.policy.model import Address

#: How long a worker's admin listener gets to answer one request of the supervisor's.
WORKER_TIMEOUT = 2.0
#: Request headers forwarded to a worker (the rest describe the hop, not the request).
_FORWARDED = ("Accept", "Authorization", "Content-Type")


@dataclass(frozen=True, slots=True)
class WorkerEndpoint:
    """A worker that reported its admin address."""

    index: int
    pid: int
    admin: Address

    def url(self, path: str) -> str:
        return f"http://{self.admin.host}:{self.admin.port}{path}"


@dataclass(slots=True)
class SupervisorView:
    """What the supervisor's admin endpoints read, at request time."""

    #: Workers up and reported, by index order.
    workers: Callable[[], list[WorkerEndpoint]]
    expected: int
    draining: Callable[[], bool]
    restarts: Callable[[], int]


@dataclass(frozen=True, slots=True)
class _Answer:
    worker: WorkerEndpoint
    status: int
    body: bytes
    content_type: str


class SupervisorAdmin:
    """An aiohttp application on ``admin.address`` that answers from the workers' admin listeners."""

    def __init__(self, view: SupervisorView) -> None:
        self.view = view
        self._runner: web.AppRunner | None = None
        self._listener: AdminListener | None = None
        self._client: aiohttp.ClientSession | None = None
        self.address: Address | None = None
        #: Each worker's last scrape, by index, with the pid it came from.
        self._last_scrape: dict[int, tuple[int, MergedMetrics]] = {}
        #: The counters of workers' processes that are gone and were replaced.
        self._retired = MergedMetrics()
        #: The admin page's history, sampled from the merged metrics.
        self.history = StatusHistory()
        self._sampler: asyncio.Task[None] | None = None

    async def start(self, address: Address) -> Address:
        """Listen on ``address`` (``SO_REUSEPORT``, as every wsgate listener; bounded as the workers'
        admin listeners are, see :mod:`proxy.admin_listener`).

        Raises:
            OSError: the address cannot be bound.
        """
        app = web.Application(client_max_size=MAX_ADMIN_BODY)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/sessions", self.sessions)
        app.router.add_post("/sessions/close", self.close_sessions)
        app.router.add_get("/status.json", self.status)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._listener = AdminListener(self._runner, "supervisor")
        try:
            self.address = await self._listener.start(address)
        except BaseException:
            await self.stop()
            raise
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT))
        self._sampler = asyncio.get_running_loop().create_task(self._sample_periodically())
        return self.address

    async def _sample_periodically(self) -> None:
        """One history sample of the merged metrics per interval, until :meth:`stop`."""
        while True:
            await asyncio.sleep(self.history.interval)
            try:
                self.history.sample((await self._merged()).collect())
            except Exception:  # noqa: BLE001 - a bug costs the page one sample, never the supervisor
                logs.LOGGER.exception("supervisor.sample_failed")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- talking to workers -----------------------------------------------------------------

    async def _ask(
        self,
        worker: WorkerEndpoint,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None = None,
    ) -> _Answer | None:
        """One request to one worker; None when it does not answer in time (or cannot be reached)."""
        if self._client is None:  # stopping
            return None
        try:
            async with self._client.request(method, worker.url(path), headers=headers, data=body) as response:
                content = await response.read()
                return _Answer(worker, response.status, content, response.headers.get("Content-Type", ""))
        except (TimeoutError, aiohttp.ClientError) as error:
            logs.event("supervisor.worker_unanswered", index=worker.index, path=path, error=repr(error))
            return None

    async def _ask_all(
        self,
        request: web.Request,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        workers: list[WorkerEndpoint] | None = None,
    ) -> list[_Answer | None]:
        """The same request to every worker, at once; the answers in the order of ``workers``."""
        sent = _forwarded_headers(request) if headers is None else headers
        asked = (
            self._ask(worker, request.method, path, sent, body)
            for worker in (self.view.workers() if workers is None else workers)
        )
        return list(await asyncio.gather(*asked))

    @staticmethod
    def _passed_on(answer: _Answer) -> web.Response:
        return web.Response(
            status=answer.status, body=answer.body, headers={"Content-Type": answer.content_type}
        )

    # -- endpoints --------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        """Every worker's metrics merged, in the format the scraper's ``Accept`` asks for."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(await self._merged())
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def status(self, request: web.Request) -> web.Response:
        """The admin page's document over every worker: the merged metrics, and worker 0's policy."""
        merged = await self._merged()
        self.history.sample(merged.collect())
        info = None
        workers = self.view.workers()
        if workers:
            answer = await self._ask(workers[0], "GET", "/policy", {})
            policy = _json(answer.body) if answer is not None and answer.status == 200 else None
            if isinstance(policy, dict):
                routes = policy.get("routes")
                info = PolicyInfo(
                    sha256=policy.get("sha256") if isinstance(policy.get("sha256"), str) else None,
                    routes=tuple(str(path) for path in routes) if isinstance(routes, list) else None,
                )
        document = status(merged.collect(), self.history, info)
        return web.json_response(document, headers={"Cache-Control": "no-store"})

    async def _merged(self) -> MergedMetrics:
        """Every worker's scrape merged, with what gone and slow workers counted, and the supervisor's own."""
        workers = self.view.workers()
        answers = await asyncio.gather(*(self._ask(worker, "GET", "/metrics", {}) for worker in workers))
        merged = MergedMetrics()
        fresh: set[int] = set()
        for worker, answer in zip(workers, answers, strict=True):
            last = self._last_scrape.get(worker.index)
            if last is not None and last[0] != worker.pid:  # a new process: the old one's counters retire
                self._retired.merge(last[1], monotonic_only=True)
                del self._last_scrape[worker.index]
            parsed = self._parsed(answer)
            if parsed is not None:
                self._last_scrape[worker.index] = (worker.pid, parsed)
                merged.merge(parsed)
                fresh.add(worker.index)
        for index, (_, last_metrics) in self._last_scrape.items():
            if index not in fresh:  # gone or too slow now: what it counted still counts
                merged.merge(last_metrics, monotonic_only=True)
        merged.merge(self._retired)
        merged.add_metric(GaugeMetricFamily("wsgate_workers", "Worker processes up.", value=len(workers)))
        merged.add_metric(
            GaugeMetricFamily(
                "wsgate_workers_scraped", "Workers whose metrics this scrape holds.", value=len(fresh)
            )
        )
        merged.add_metric(
            CounterMetricFamily(
                "wsgate_worker_restarts", "Workers started again after they died.", value=self.view.restarts()
            )
        )
        return merged

    @staticmethod
    def _parsed(answer: _Answer | None) -> MergedMetrics | None:
        if answer is None or answer.status != 200:
            return None
        try:
            return MergedMetrics.parse(answer.body.decode())
        except ValueError as error:  # UnicodeDecodeError too
            logs.event("supervisor.metrics_unreadable", index=answer.worker.index, error=str(error))
            return None

    async def healthz(self, request: web.Request) -> web.Response:
        """The supervisor is alive and its event loop answers."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when every worker is up and ready; 503 while draining or when one is not."""
        if self.view.draining():
            return web.json_response({"status": "draining"}, status=503)
        workers = self.view.workers()
        answers = await self._ask_all(request, "/readyz", headers={}, workers=workers)
        up = {worker.index for worker in workers}
        not_ready: list[dict[str, Any]] = [
            {"index": index, "status": "not running"}
            for index in range(self.view.expected)
            if index not in up
        ]
        for worker, answer in zip(workers, answers, strict=True):
            if answer is None or answer.status != 200:
                status = "no answer" if answer is None else _status_of(answer)
                not_ready.append({"index": worker.index, "pid": worker.pid, "status": status})
        if not_ready:
            not_ready.sort(key=lambda entry: entry["index"])
            return web.json_response({"status": "not ready", "workers": not_ready}, status=503)
        return web.json_response({"status": "ready", "workers": len(workers)})

    async def sessions(self, request: web.Request) -> web.Response:
        """Every worker's live sessions, one list."""
        answers = await self._ask_all(request, request.path_qs)
        refused = _first_refusal(answers)
        if refused is not None:
            return refused
        listed: list[Any] = []
        for answer in answers:
            assert answer is not None  # _first_refusal answered for a worker that did not
            body = _json(answer.body)
            if not isinstance(body, list):
                return _unexpected(answer, "a JSON list")
            listed.extend(body)
        return web.json_response(listed)

    async def close_sessions(self, request: web.Request) -> web.Response:
        """Close the sessions the body names, on every worker; ``{"closed": N, ...}``.

        Worker 0 is asked first. When the workers share a Redis, its close already reached every worker
        (and every other replica): its answer, with ``replicas``, is the whole answer. Otherwise (no Redis,
        or Redis unavailable: that worker closed only its own) the others are asked too, and their
        numbers are summed; an ``error`` one of them gave is kept.
        """
        workers = self.view.workers()
        if not workers:
            return web.json_response({"error": "no worker is running"}, status=503)
        body = await request.read()
        first = await self._ask_all(request, request.path_qs, body, workers=workers[:1])
        refused = _first_refusal(first)
        if refused is not None:
            return refused
        assert first[0] is not None  # _first_refusal answered for a worker that did not
        result = _json(first[0].body)
        if not isinstance(result, dict) or not isinstance(result.get("closed"), int):
            return _unexpected(first[0], 'a JSON object with "closed"')
        if "replicas" in result and "error" not in result:
            return self._passed_on(first[0])
        others = await self._ask_all(request, request.path_qs, body, workers=workers[1:])
        refused = _first_refusal(others)
        if refused is not None:
            return refused
        for answer in others:
            assert answer is not None  # as above
            more = _json(answer.body)
            if not isinstance(more, dict) or not isinstance(more.get("closed"), int):
                return _unexpected(answer, 'a JSON object with "closed"')
            for key, value in more.items():
                if isinstance(value, int) and isinstance(result.get(key), int):
                    result[key] += value
                else:
                    result.setdefault(key, value)
        return web.json_response(result)

    async def forward(self, request: web.Request) -> web.Response:
        """Anything else: worker 0's answer (``/policy``, the page, ``/status.json``...)."""
        workers = self.view.workers()
        if not workers:
            return web.json_response({"error": "no worker is running"}, status=503)
        headers = _forwarded_headers(request)
        answer = await self._ask(workers[0], request.method, request.path_qs, headers, await request.read())
        if answer is None:
            return web.json_response({"error": f"worker {workers[0].index} did not answer"}, status=504)
        return self._passed_on(answer)


def _forwarded_headers(request: web.Request) -> dict[str, str]:
    return {name: request.headers[name] for name in _FORWARDED if name in request.headers}


def _json(body: bytes) -> Any:
    """``body`` parsed, or None when it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        return None


def _status_of(answer: _Answer) -> str:
    body = _json(answer.body)
    status = body.get("status") if isinstance(body, dict) else None
    return str(status) if status else f"http {answer.status}"


def _first_refusal(answers: list[_Answer | None]) -> web.Response | None:
    """The first worker answer that is not 200, passed on as is; 504 if a worker did not answer."""
    for answer in answers:
        if answer is None:
            return web.json_response({"error": "a worker did not answer"}, status=504)
        if answer.status != 200:
            return SupervisorAdmin._passed_on(answer)
    return None


def _unexpected(answer: _Answer, expected: str) -> web.Response:
    message = f"worker {answer.worker.index} answered {answer.body[:80]!r}, not {expected}"
    return web.json_response({"error": message}, status=502)
