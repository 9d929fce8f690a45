"""Upstream pools at run time: each endpoint's health, how a session's endpoint is picked, and the active
health checker.

A route's ``upstream`` is a pool (:class:`~proxy.policy.model.UpstreamPool`): one URL is a pool of one,
and behaves as before. Per endpoint this module keeps:

- **passive health**: a failed connect (refused, timed out, TLS failure, closed during the handshake, a 5xx
  or a broken 101 instead of a valid 101) takes the endpoint out for 2 s, doubling with each failure in a
  row up to 30 s (:data:`PASSIVE_BACKOFF`, :data:`PASSIVE_BACKOFF_MAX`). Once that time is over it is
  tried again, so it is *up* again (``wsgate_upstream_up`` 1: wsgate would send a session there now);
  its failures in a row are forgotten only when a connect (or an active check) succeeds;
- **active health** (when the pool has a ``health_check``): ``fall`` failed checks in a row take it out,
  ``rise`` passed checks bring it back (HAProxy's rule; defaults 3 and 2); a passed check also clears a
  passive mark, since the endpoint just answered;
- live sessions (``wsgate_upstream_sessions``) and handshakes in flight, which ``least_connections`` reads.

An endpoint is *up* when neither kind of health holds it out now. The logs tell the verdict instead:
``upstream.down`` when failed connects or checks first hold it out, ``upstream.up`` when a connect or
check succeeds again, once per change, with the route's label and the endpoint's, never its query.

Picking an order (:meth:`RoutePool.order`) puts the endpoints that may be tried now first, by the pool's
``balance``, and the others after them: the connector tries them in that order within one deadline, so a
pool whose every endpoint is marked down still tries them all rather than refusing on stale marks.

``hash_client_ip`` and ``hash_subject`` use rendezvous (highest random weight) hashing: each endpoint's
weight for a key is a hash of the key and the endpoint's label, and the key goes to the heaviest endpoint
that may be tried. An endpoint leaving moves only the keys it held; one coming back takes back exactly
those. The hash (BLAKE2b) is the same in every process, so workers and replicas agree.

State survives a reload for an endpoint that stays (same route host, path and match; same label); a
removed endpoint's state is dropped and its checks stop (its live sessions run on), a new one starts up
with fresh state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterator

import aiohttp

from proxy import logs
from proxy.policy.model import HealthCheck, Policy, Route, Upstream
from proxy.policy.values import url_host
from proxy.upstream import probe_websocket, upstream_tls_context

#: How long the first failed connect takes an endpoint out; each further failure in a row doubles it.
PASSIVE_BACKOFF = 2.0
#: The longest an endpoint is taken out by failed connects before it is tried again.
PASSIVE_BACKOFF_MAX = 30.0

#: A route's identity among the pools: its host, path and match (an exact and a prefix route may share a
#: path, and so may routes for two hosts).
RouteKey = tuple[str | None, str, str]


def route_key(route: Route) -> RouteKey:
    return (route.host, route.path, route.match)


class Endpoint:
    """One endpoint of one route: its health, its sessions, its active checker.

    Methods are called once per connect, check or session; none does I/O except :meth:`_log_change`'s
    one log line per change of :attr:`up`.
    """

    __slots__ = (
        "active_up",
        "check",
        "checker",
        "connect_failures",
        "connecting",
        "failures",
        "label",
        "passive_down",
        "retry_at",
        "route",
        "sessions",
        "streak",
        "target",
        "upstream",
    )

    def __init__(self, route: str, upstream: Upstream, target: str) -> None:
        #: The route's label (its host and path): the ``route`` of metrics and log lines.
        self.route = route
        self.upstream = upstream
        self.label = upstream.label
        #: The request target an active WebSocket check sends (what a client on the route's own path gets).
        self.target = target
        self.sessions = 0
        self.connecting = 0
        self.connect_failures = 0
        #: Passive: failed connects in a row, whether they hold it out, and when it may be tried again.
        self.failures = 0
        self.passive_down = False
        self.retry_at = 0.0
        #: Active: the checks' verdict, and checks in a row that disagree with it.
        self.active_up = True
        self.streak = 0
        self.check: HealthCheck | None = None
        self.checker: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        """Whether a new session would be sent here now (``wsgate_upstream_up``): not held out by active
        checks, nor in the backoff of failed connects (once it has run out, the next session tries it)."""
        return self.may_try(time.monotonic())

    @property
    def held_out(self) -> bool:
        """Whether failed connects or checks hold the endpoint out, its backoff run out or not, until a
        connect or check succeeds: what the ``upstream.down`` and ``upstream.up`` lines tell."""
        return not self.active_up or self.passive_down

    def may_try(self, now: float) -> bool:
        """Whether a new session may go here now: up, or out by failed connects whose backoff is over."""
        return self.active_up and (not self.passive_down or now >= self.retry_at)

    @property
    def load(self) -> int:
        """Live sessions and handshakes in flight: what ``least_connections`` compares."""
        return self.sessions + self.connecting

    # -- passive health -----------------------------------------------------------------------------

    def connect_failed(self, cause: str) -> None:
        """A connect to this endpoint failed: out for the backoff, doubled since the last success."""
        was_held_out = self.held_out
        self.connect_failures += 1
        self.failures += 1
        self.passive_down = True
        backoff = min(PASSIVE_BACKOFF_MAX, PASSIVE_BACKOFF * 2 ** min(self.failures - 1, 16))
        self.retry_at = time.monotonic() + backoff
        self._log_change(was_held_out, cause, retry_in_s=backoff)

    def connect_succeeded(self) -> None:
        """A connect got its 101: failed connects are forgotten."""
        if self.failures or self.passive_down:
            was_held_out = self.held_out
            self.failures = 0
            self.passive_down = False
            self._log_change(was_held_out, "connected")

    # -- active health ------------------------------------------------------------------------------

    def checked(self, failure: str | None, check: HealthCheck) -> None:
        """One active check's outcome (``failure`` None: passed), counted against ``rise`` and ``fall``."""
        was_held_out = self.held_out
        if failure is None:
            self.failures = 0
            self.passive_down = False
            self.streak = 0 if self.active_up else self.streak + 1
            if not self.active_up and self.streak >= check.rise:
                self.active_up, self.streak = True, 0
            cause = "health check passed"
        else:
            self.streak = self.streak + 1 if self.active_up else 0
            if self.active_up and self.streak >= check.fall:
                self.active_up, self.streak = False, 0
            cause = f"health check failed: {failure}"
        self._log_change(was_held_out, cause)

    def checks_removed(self) -> None:
        """The pool no longer has a health check: checks can hold the endpoint out no longer."""
        was_held_out = self.held_out
        self.active_up, self.streak = True, 0
        self._log_change(was_held_out, "health check removed")

    def _log_change(self, was_held_out: bool, cause: str, **fields: object) -> None:
        if self.held_out == was_held_out:
            return
        logs.event(
            "upstream.down" if self.held_out else "upstream.up",
            logging.WARNING if self.held_out else logging.INFO,
            route=self.route,
            endpoint=self.label,
            cause=cause,
            **fields,
        )


def _weight(key: str, label: str) -> int:
    """The rendezvous weight of ``label`` for ``key``: the same in every process."""
    digest = hashlib.blake2b(f"{key}\0{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, labels: list[str]) -> list[str]:
    """``labels`` heaviest first for ``key`` (ties, which a 64-bit hash makes unlikely, by label)."""
    return sorted(labels, key=lambda label: (-_weight(key, label), label))


class RoutePool:
    """The endpoints of one route with their state, and the pick of a new session's order."""

    def __init__(self, route: Route, endpoints: list[Endpoint], turn: int = 0) -> None:
        self.route = route
        self.endpoints = endpoints
        #: Round robin's turn (and least_connections' tie-break), kept across reloads.
        self.turn = turn

    def order(self, client_ip: str, subject: str | None) -> list[Endpoint]:
        """Every endpoint, in the order a new session tries them: those that may be tried now, by the
        pool's balance, then the others (soonest to be retried first)."""
        now = time.monotonic()
        ready = [endpoint for endpoint in self.endpoints if endpoint.may_try(now)]
        resting = [endpoint for endpoint in self.endpoints if not endpoint.may_try(now)]
        balance = self.route.upstream.balance
        if balance in ("hash_client_ip", "hash_subject"):
            key = subject if balance == "hash_subject" and subject is not None else client_ip
            rank = {
                label: index
                for index, label in enumerate(rendezvous_order(key, [e.label for e in self.endpoints]))
            }
            ready.sort(key=lambda endpoint: rank[endpoint.label])
            resting.sort(key=lambda endpoint: rank[endpoint.label])
            return ready + resting
        turn = self.turn
        self.turn += 1
        if ready:
            shift = turn % len(ready)
            ready = ready[shift:] + ready[:shift]
        if balance == "least_connections":
            ready.sort(key=lambda endpoint: endpoint.load)  # stable: ties keep the round robin's order
        resting.sort(key=lambda endpoint: endpoint.retry_at)
        return ready + resting


class Pools:
    """Every route's pool, kept across reloads, and the active checkers of their endpoints."""

    def __init__(self) -> None:
        self._pools: dict[RouteKey, RoutePool] = {}
        self._http: aiohttp.ClientSession | None = None

    def endpoints(self) -> Iterator[Endpoint]:
        """Every endpoint of every route (what the metrics export)."""
        for pool in self._pools.values():
            yield from pool.endpoints

    def pool(self, route: Route) -> RoutePool:
        """The pool of ``route``; for a route a reload removed while its handshake was judged, a pool of
        its own endpoints with fresh state, kept nowhere."""
        pool = self._pools.get(route_key(route))
        if pool is not None:
            return pool
        return RoutePool(route, [_new_endpoint(route, upstream) for upstream in route.upstream.endpoints])

    def apply(self, policy: Policy) -> None:
        """Take ``policy``'s pools: endpoints that stay keep their state and checker, removed ones are
        dropped (their checks stop), new ones start up. Starts or restarts the active checks as the
        pools now say (needs a running loop)."""
        kept = {
            (key, endpoint.label): endpoint
            for key, pool in self._pools.items()
            for endpoint in pool.endpoints
        }
        pools: dict[RouteKey, RoutePool] = {}
        for route in policy.routes:
            key = route_key(route)
            endpoints = []
            for upstream in route.upstream.endpoints:
                endpoint = kept.pop((key, upstream.label), None)
                if endpoint is None:
                    endpoint = _new_endpoint(route, upstream)
                else:
                    endpoint.upstream = upstream
                    endpoint.target = _check_target(route, upstream)
                endpoints.append(endpoint)
                self._schedule(endpoint, route.upstream.health_check)
            previous = self._pools.get(key)
            pools[key] = RoutePool(route, endpoints, previous.turn if previous is not None else 0)
        for removed in kept.values():
            _stop_checker(removed)
        self._pools = pools

    async def close(self) -> None:
        """Stop every check (the gateway stops)."""
        for endpoint in self.endpoints():
            _stop_checker(endpoint)
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- active checks ------------------------------------------------------------------------------

    def _schedule(self, endpoint: Endpoint, check: HealthCheck | None) -> None:
        if check == endpoint.check and (check is None or endpoint.checker is not None):
            return
        _stop_checker(endpoint)
        endpoint.check = check
        if check is None:
            endpoint.checks_removed()
            return
        endpoint.checker = asyncio.get_running_loop().create_task(self._check_forever(endpoint, check))

    async def _check_forever(self, endpoint: Endpoint, check: HealthCheck) -> None:
        """Check ``endpoint`` every ``interval`` (the first at once) until stopped. A bug in one check
        is logged and counts as a failed check; the checks go on."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                failure = await self._check_once(endpoint, check)
            except Exception:  # noqa: BLE001 - logged with its traceback, counted as a failed check
                logs.LOGGER.exception(
                    "upstream.check_error",
                    extra={"fields": {"route": endpoint.route, "endpoint": endpoint.label}},
                )
                failure = "internal error (see upstream.check_error)"
            endpoint.checked(failure, check)
            await asyncio.sleep(max(0.0, check.interval - (loop.time() - started)))

    async def _check_once(self, endpoint: Endpoint, check: HealthCheck) -> str | None:
        """One check within ``timeout``: None when it passed, else why it failed."""
        if check.path is None:
            return await probe_websocket(endpoint.upstream, endpoint.target, check.timeout)
        upstream = endpoint.upstream
        url = f"{'https' if upstream.secure else 'http'}://{url_host(upstream.host)}:{upstream.port}{check.path}"
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                headers={"User-Agent": "wsgate-health-check"},
            )
        try:
            async with self._http.get(
                url,
                ssl=upstream_tls_context(upstream) or False,  # in the try: a rotated file may not load
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=check.timeout),
            ) as response:
                if 200 <= response.status < 400:
                    return None
                return f"GET {check.path} answered HTTP {response.status}"
        except TimeoutError:
            return f"GET {check.path} got no answer within {check.timeout:g}s"
        except aiohttp.ClientError as error:
            return f"GET {check.path} failed: {error or type(error).__name__}"
        except OSError as error:  # the TLS files no longer load (ssl.SSLError is an OSError)
            return f"TLS files of upstream_tls do not load: {error.strerror or error}"


def _check_target(route: Route, upstream: Upstream) -> str:
    return route.upstream_target(route.path, "", upstream)


def _new_endpoint(route: Route, upstream: Upstream) -> Endpoint:
    return Endpoint(route.label, upstream, _check_target(route, upstream))


def _stop_checker(endpoint: Endpoint) -> None:
    if endpoint.checker is not None:
        endpoint.checker.cancel()
        endpoint.checker = None
    endpoint.check = None
