"""Limiter state shared by every replica through one Redis: handshake rates and connection caps.

Why: with several wsgate processes behind one load balancer, an in-process limiter gives each client N
times its budget. Here every decision is one atomic Lua script run by Redis, on Redis's clock
(``redis.call('TIME')``), so replicas' clocks never matter and two replicas never both take the last slot.

What is guaranteed:

- A rate (GCRA) admits at most ``burst`` handshakes at once and then ``rate`` per second, summed over
  every replica sharing the Redis and ``key_prefix``.
- A cap admits at most ``cap`` concurrent sessions over every replica. Each slot is a *lease* that the
  replica holding it refreshes every ``lease_ttl / 3``; a replica that dies without releasing (SIGKILL,
  a lost host) stops refreshing, and its slots are free again within ``lease_ttl``. A refresh re-adds its
  leases, so slots lost with a Redis restart are counted again within ``lease_ttl / 3`` of its return,
  and so are sessions admitted while Redis was away.
- Every call is bounded by ``timeout``. A decision Redis cannot make in time follows ``on_error``:
  ``allow`` admits (a cap then records a *phantom* slot, released without Redis and counted in Redis
  once it is back), ``deny`` raises :class:`~proxy.errors.LimiterUnavailable` (503 to the client). While
  Redis is known to be down, decisions do not wait: they follow ``on_error`` at once, and a probe (a
  short-lived write every 0.5 s, so that a full or read-only Redis stays down) brings the limiter back.
  ``limiter.down`` and ``limiter.up`` are logged once per change of state, never per request, and never
  with the password. At most :data:`MAX_CONNECTIONS` decisions are in flight; the others queue here.
  Queueing costs only that decision, and so does a timeout while Redis answered other calls within
  ``timeout`` or answers a check write (this process's loop running late under a burst): they never
  mark Redis down. A hung Redis is found by that check within :data:`VERIFY_TIMEOUT` (or ``timeout``).
- A slot released while Redis cannot hear it, or taken by a handshake cancelled while Redis answered, is
  removed once Redis is back (at most :data:`MAX_UNANSWERED` of them), not left for ``lease_ttl``.

Redis key layout (``{p}`` is ``limiter.redis.key_prefix``, ``wsgate:`` by default; the rest is the
guard's key: ``hs:``, ``ip:`` or ``sub:`` and the client, see :mod:`proxy.guards.limits`):

- ``{p}hs:{client}`` (string): a handshake rate's GCRA arrival time, microseconds on Redis's clock.
  Expires when that time passes: at most ``burst / rate`` seconds after the client's last handshake.
- ``{p}ip:{client}``, ``{p}sub:{provider}:{subject}`` (sorted set): one member per slot held, the lease
  id ``{host}:{pid}:{random}:{n}`` scored with its expiry (ms, Redis's clock). Expires ``lease_ttl``
  after its last acquire or refresh; gone as soon as its last lease is released.
- ``{p}probe`` (string): written by a replica's probe while its Redis was down; expires in 5 s.
- ``{p}sessions.close`` and ``{p}sessions.closed``: pub/sub channels of :mod:`proxy.cluster` (no keys).

Memory, measured with ``MEMORY USAGE`` on Redis 7.0 (jemalloc, 64-bit), default prefix, a 33-character
replica id: a rate key is 72 bytes for an IPv4 client (88 for an IPv6 /64); a cap key is 136 bytes with
one lease and about 48 bytes per further lease up to 128 leases (listpack), about 160 bytes per lease
beyond (skiplist). An idle client holds no rate key; a client with no live session holds no cap key. So
100k clients each with a session and a recent handshake cost about 21 MB, plus Redis's own overhead
(its dictionaries of keys and expiries).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy import logs
from proxy.errors import LimiterUnavailable
from proxy.policy.model import RedisLimiter as RedisSettings

#: What a failed call to Redis raises: its own errors, socket errors, and our own bound (asyncio.timeout).
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

#: Seconds between probes while Redis is down; a probe writes one short-lived key.
PROBE_INTERVAL = 0.5
PROBE_TTL_MS = 5_000
#: The shortest bound on the check that tells a timed-out call's slow Redis from a late loop.
VERIFY_TIMEOUT = 0.25

#: Connections one limiter opens to Redis at most, and so its decisions in flight; the others queue.
MAX_CONNECTIONS = 32
#: How long a decision may queue for one of those connections. Beyond it, that decision follows
#: ``on_error`` (the gateway is overloaded, not Redis), and the limiter stays up.
QUEUE_TIMEOUT = 1.0
#: How long close() waits for its background tasks, and then for the connections to close.
CLOSE_TIMEOUT = 2.0

#: Unanswered lease requests remembered for removal; beyond these, a lease Redis took after its caller
#: gave up lingers until lease_ttl.
MAX_UNANSWERED = 10_000

#: Leases refreshed by one script call (Lua's unpack has a stack limit near 8000).
REFRESH_CHUNK = 1000

#: GCRA on Redis's clock, in microseconds. KEYS[1]: the rate key. ARGV: emission interval, tolerance
#: (interval * (burst - 1)). Returns 0 when the event is admitted (and counted), else the microseconds
#: until it would be. The key lives until its arrival time passes: an idle client holds nothing.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then return math.max(1, math.ceil(tat - tolerance - now)) end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1)
return 0
"""

#: One lease of a cap. KEYS[1]: the cap key. ARGV: cap, lease ttl in ms, lease id. Expired leases (of a
#: replica that stopped refreshing) are dropped first. Returns 1 when the lease was taken, else 0.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
return 0
"""

#: A replica's leases of one key pushed forward. KEYS[1]: the cap key. ARGV: lease ttl in ms, then lease
#: ids. A plain ZADD (not XX): a lease Redis lost (a restart) is counted again.
REFRESH = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = expiry
  args[#args + 1] = ARGV[i]
end
redis.call('ZADD', KEYS[1], unpack(args))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""

_T = TypeVar("_T")


def redacted_url(url: str) -> str:
    """``url`` without its user and password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def replica_id() -> str:
    """A name unique to this process among replicas: host, pid and a random part (pids repeat across
    containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


#: TCP keepalive of every connection to Redis: probe after 5 s idle, every 2 s, give up after 3.
_KEEPALIVE: dict[int, int] = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}


def connect(
    settings: RedisSettings, timeout: float, max_connections: int = MAX_CONNECTIONS, keepalive: bool = False
) -> aioredis.Redis:
    """A client for the policy's Redis: password and CA file from the policy, sockets bounded by
    ``timeout``, no retries (the caller decides what a failure means), at most ``max_connections``.

    ``keepalive`` (for a connection that waits, such as a subscription): TCP keepalive finds a Redis
    host that vanished without a reset (a failover behind a virtual IP) within about 11 s, where the
    subscription would otherwise wait on a silent connection for ever. The limiter's own connections
    need none: each decision is bounded by ``timeout``."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # Once, at once, on a broken connection only: a pooled connection Redis closed while idle (its
        # timeout, a restart, CLIENT KILL) is replaced, not taken for Redis being down.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "max_connections": max_connections,
        "timeout": QUEUE_TIMEOUT,  # waiting for a free connection (the limiter's gate queues first)
    }
    if keepalive:
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = _KEEPALIVE
    if settings.password is not None:
        options["password"] = settings.password
    if urlsplit(settings.url).scheme == "rediss" and settings.ca_file is not None:
        options["ssl_ca_certs"] = str(settings.ca_file)
    pool = aioredis.BlockingConnectionPool.from_url(settings.url, **options)
    return aioredis.Redis.from_pool(pool)


def describe(error: BaseException) -> str:
    """A failure as one short line (a timeout's message is empty)."""
    return str(error) or type(error).__name__


class RedisLimiter:
    """The :class:`~proxy.limiter.Limiter` protocol on a shared Redis (see the module docstring).

    ``settings`` is the policy's ``limiter.redis``; ``on_error`` its ``limiter.on_error``. Call
    :meth:`start` (in the event loop) before use and :meth:`close` at the end.
    """

    backend = "redis"

    def __init__(
        self, settings: RedisSettings, on_error: Literal["allow", "deny"], replica: str | None = None
    ) -> None:
        self.settings = settings
        self.on_error = on_error
        self.replica = replica or replica_id()
        self.where = redacted_url(settings.url)
        self._timeout = settings.timeout
        self._ttl_ms = max(1, round(settings.lease_ttl * 1000))
        self._prefix = settings.key_prefix
        self._redis = connect(settings, settings.timeout)
        self._gcra = self._redis.register_script(GCRA)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._refresh = self._redis.register_script(REFRESH)
        self._counter = itertools.count(1)
        #: This process's leases by cap key (without the prefix): ids in Redis, and phantoms (slots given
        #: while Redis could not be asked). All leases of a key are interchangeable.
        self._leases: dict[str, list[str]] = {}
        self._phantoms: dict[str, int] = {}
        #: Leases asked for without an answer: Redis may still take them (a hung server runs what it has
        #: read once it resumes), so they are removed once it is back, rather than linger for lease_ttl.
        self._unanswered: list[tuple[str, str]] = []
        #: Leases released while a refresh was under way: the refresh may have re-added them.
        self._released_in_refresh: list[tuple[str, str]] | None = None
        #: Decisions in flight, at most one per pooled connection: waiting here is queueing in this
        #: process, which says nothing about Redis (only a call that was sent can mark it down).
        self._gate = asyncio.Semaphore(MAX_CONNECTIONS)
        #: When Redis last answered a call (monotonic), and the check a timeout started, if one runs.
        self._answered_at = 0.0
        self._verifying: asyncio.Task[None] | None = None
        self._up = True
        self._down = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._cleanups: set[asyncio.Task[None]] = set()
        #: One refresh at a time (the refresher's and a recovery's), so a lease released meanwhile is
        #: seen by the refresh that may have re-added it.
        self._refreshing = asyncio.Lock()
        self._closed = False

    # -- state ----------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """False while Redis is known to be unreachable (decisions follow ``on_error``)."""
        return self._up

    @property
    def held(self) -> int:
        """Slots this process holds (leases and phantoms)."""
        return sum(map(len, self._leases.values())) + sum(self._phantoms.values())

    def start(self) -> None:
        """Start the lease refresher and the probe (idempotent)."""
        if self._tasks or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._refresher()), loop.create_task(self._prober())]

    async def close(self) -> None:
        """Stop the background tasks, give back the leases still held (best effort, bounded), close the
        connections."""
        if self._closed:
            return
        self._closed = True
        pending = [*self._tasks, *self._cleanups, *([self._verifying] if self._verifying else [])]
        for task in pending:
            task.cancel()
        if pending:
            # Bounded, and without swallowing a cancellation of close() itself: a task that does not
            # end (a client library that ate its cancellation) must not hang a shutdown.
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
        leases, self._leases = self._leases, {}
        self._phantoms.clear()
        self._idle.set()
        if self._up and leases:
            with contextlib.suppress(*REDIS_FAILURES):
                async with asyncio.timeout(max(self._timeout, 1.0)):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key, ids in leases.items():
                            pipe.zrem(self._prefix + key, *ids)
                        await pipe.execute()
        with contextlib.suppress(*REDIS_FAILURES):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._redis.aclose()

    async def wait_idle(self) -> None:
        """Until this process holds no slot."""
        while self.held:
            self._idle.clear()
            await self._idle.wait()

    # -- the Limiter protocol -------------------------------------------------------------

    async def hit(self, key: str, rate: float, burst: int) -> float:
        interval = 1_000_000.0 / rate
        tolerance = interval * (max(burst, 1) - 1)
        waited = await self._call(
            lambda: self._gcra(keys=[self._prefix + key], args=[repr(interval), repr(tolerance)])
        )
        if waited is None:
            return 0.0
        return int(waited) / 1_000_000.0

    async def acquire(self, key: str, cap: int) -> bool:
        lease = f"{self.replica}:{next(self._counter)}"
        sent = self._up and not self._closed
        try:
            taken = await self._call(
                lambda: self._acquire(keys=[self._prefix + key], args=[cap, self._ttl_ms, lease])
            )
        except LimiterUnavailable:
            self._unanswered_lease(sent, key, lease)
            raise
        except asyncio.CancelledError:
            # Redis may have taken the lease before the handshake was cancelled: remove it now.
            if sent:
                self._remove_later(key, lease)
            raise
        if taken is None:
            self._unanswered_lease(sent, key, lease)
            self._phantoms[key] = self._phantoms.get(key, 0) + 1
            return True
        if not int(taken):
            return False
        self._leases.setdefault(key, []).append(lease)
        return True

    async def release(self, key: str) -> None:
        phantoms = self._phantoms.get(key, 0)
        if phantoms:
            if phantoms > 1:
                self._phantoms[key] = phantoms - 1
            else:
                del self._phantoms[key]
            self._check_idle()
            return
        leases = self._leases.get(key)
        if not leases:
            return
        lease = leases.pop()
        if not leases:
            del self._leases[key]
        self._check_idle()
        if self._released_in_refresh is not None:
            self._released_in_refresh.append((key, lease))
        # Not refreshed any more. Redis that cannot hear this now gets it once it is back (the slot
        # would otherwise stay taken for lease_ttl after its session ended).
        if self._closed:
            return
        try:
            await self._forget(key, lease)
        except asyncio.CancelledError:  # the lease is no longer this process's: remove it all the same
            self._remove_later(key, lease)
            raise

    def _unanswered_lease(self, sent: bool, key: str, lease: str) -> None:
        if sent and len(self._unanswered) < MAX_UNANSWERED:
            self._unanswered.append((key, lease))

    async def _forget(self, key: str, lease: str) -> None:
        """Remove a lease nobody holds; one Redis cannot hear now is removed once it is back."""
        if not self._up or not await self._quietly(lambda: self._redis.zrem(self._prefix + key, lease)):
            self._unanswered_lease(True, key, lease)

    def _remove_later(self, key: str, lease: str) -> None:
        """:meth:`_forget` in the background (a cancelled caller cannot wait for it)."""
        task = asyncio.get_running_loop().create_task(self._forget(key, lease))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _check_idle(self) -> None:
        if not self._leases and not self._phantoms:
            self._idle.set()

    # -- calls to Redis -------------------------------------------------------------------

    async def _call(self, command: Callable[[], Awaitable[_T]]) -> _T | None:
        """One decision: its result, or None when Redis could not make it and ``on_error`` allows.

        Raises:
            LimiterUnavailable: Redis could not decide and ``on_error`` is deny.
        """
        if self._up and not self._closed:
            try:
                async with asyncio.timeout(QUEUE_TIMEOUT):
                    await self._gate.acquire()
            except TimeoutError:
                pass  # overloaded here: this decision follows on_error; Redis is not to blame
            else:
                try:
                    async with asyncio.timeout(self._timeout):
                        result = await command()
                    self._answered_at = time.monotonic()
                    return result
                except REDIS_FAILURES as error:
                    self._failed(error)
                finally:
                    self._gate.release()
        if self.on_error == "deny":
            raise LimiterUnavailable(f"the limiter's Redis ({self.where}) is unavailable")
        return None

    async def _quietly(self, command: Callable[[], Awaitable[object]]) -> bool:
        """A call whose failure changes no decision (a release): skipped while Redis is down. Whether
        Redis ran it."""
        if not self._up or self._closed:
            return False
        try:
            async with asyncio.timeout(self._timeout):
                await command()
        except REDIS_FAILURES as error:
            self._failed(error)
            return False
        self._answered_at = time.monotonic()
        return True

    def _failed(self, error: BaseException) -> None:
        """A call failed: that call follows ``on_error``. An error Redis or the network gave marks Redis
        down at once. A timeout may be this process's loop running late (a burst of handshakes: the
        answer came but was read too late), so it marks Redis down only when Redis has answered nothing
        within ``timeout`` and a check of its own (one write, :data:`VERIFY_TIMEOUT` at least) fails."""
        if not isinstance(error, TimeoutError):
            self._went_down(error)
            return
        if time.monotonic() - self._answered_at < self._timeout or self._verifying is not None:
            return
        self._verifying = asyncio.get_running_loop().create_task(self._verify())

    async def _write_probe(self) -> None:
        """One short-lived write: what tells a Redis that takes leases from one that only answers."""
        await self._redis.set(self._prefix + "probe", self.replica, px=PROBE_TTL_MS)

    async def _verify(self) -> None:
        try:
            async with asyncio.timeout(max(self._timeout, VERIFY_TIMEOUT)):
                await self._write_probe()
        except REDIS_FAILURES as error:
            self._went_down(error)
        else:
            self._answered_at = time.monotonic()
        finally:
            self._verifying = None

    def _went_down(self, error: BaseException) -> None:
        if not self._up:
            return
        self._up = False
        self._down.set()
        logs.event(
            "limiter.down",
            logging.ERROR if self.on_error == "deny" else logging.WARNING,
            redis=self.where,
            error=describe(error),
            on_error=self.on_error,
        )

    def _came_up(self) -> None:
        self._up = True
        self._down.clear()
        # Sessions admitted while Redis was away count again from the next refresh on.
        for key, count in self._phantoms.items():
            leases = self._leases.setdefault(key, [])
            leases.extend(f"{self.replica}:{next(self._counter)}" for _ in range(count))
        self._phantoms.clear()
        logs.event("limiter.up", redis=self.where)

    async def _remove(self, leases: list[tuple[str, str]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, lease in leases:
                pipe.zrem(self._prefix + key, lease)
            await pipe.execute()

    # -- background -----------------------------------------------------------------------

    async def _prober(self) -> None:
        """While Redis is down, probe it every :data:`PROBE_INTERVAL`; the first success brings it up and
        refreshes every lease at once (Redis may have restarted empty)."""
        probe_timeout = max(self._timeout, PROBE_INTERVAL)
        while True:
            await self._down.wait()
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                async with asyncio.timeout(probe_timeout):
                    # A write, not a PING: a Redis at maxmemory or a read-only replica answers PING
                    # but refuses every lease, and would make the limiter flap up and down.
                    await self._write_probe()
            except REDIS_FAILURES:
                if self._closed:
                    return
                continue
            try:
                await self._recovered()
            except Exception:  # noqa: BLE001 - a bug here must not stop the probe for good
                logs.LOGGER.exception("limiter.error", extra={"fields": {"task": "probe"}})

    async def _recovered(self) -> None:
        self._came_up()
        unanswered, self._unanswered = self._unanswered, []
        if unanswered and not await self._quietly(lambda: self._remove(unanswered)):
            self._unanswered = [*unanswered, *self._unanswered][:MAX_UNANSWERED]
        await self._refresh_all()

    async def _refresher(self) -> None:
        """Push every lease's expiry forward every ``lease_ttl / 3``."""
        while True:
            await asyncio.sleep(self.settings.lease_ttl / 3)
            if not self._up:
                continue
            try:
                await self._refresh_all()
            except Exception:  # noqa: BLE001 - a bug here must not stop refreshing for good
                logs.LOGGER.exception("limiter.error", extra={"fields": {"task": "refresh"}})

    async def _refresh_all(self) -> None:
        async with self._refreshing:
            await self._refresh_now()

    async def _refresh_now(self) -> None:
        calls = [
            (key, ids[start : start + REFRESH_CHUNK])
            for key, ids in self._leases.items()
            for start in range(0, len(ids), REFRESH_CHUNK)
        ]
        if not calls:
            return
        released: list[tuple[str, str]] = []
        self._released_in_refresh = released
        try:
            async with asyncio.timeout(max(self._timeout, self.settings.lease_ttl / 3)):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, ids in calls:
                        await self._refresh(keys=[self._prefix + key], args=[self._ttl_ms, *ids], client=pipe)
                    await pipe.execute()
        except REDIS_FAILURES as error:
            self._went_down(error)
            return
        finally:
            self._released_in_refresh = None
        if released:
            await self._quietly(lambda: self._remove(released))
