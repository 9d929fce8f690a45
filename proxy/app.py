"""Assembles a running gateway: the client listener, the handshake flow, reload, signals and drain.

This is the only module that wires the others together; what happens to one handshake is
:mod:`proxy.handshake_flow`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
import time
from functools import partial
from typing import Any

from proxy import logs
from proxy.accept import Acceptor, bind_sockets
from proxy.admin import AdminServer, AdminState
from proxy.cluster import Cluster, LocalClose
from proxy.errors import DRAINING, OVERLOADED, SHUTTING_DOWN, LimiterUnavailable, StartupError
from proxy.frames import MASK_IMPLEMENTATION
from proxy.handshake import Pipeline
from proxy.handshake_flow import HandshakeFlow
from proxy.limiter import build_limiter
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.listener import LINGER_SECONDS, HandshakeProtocol
from proxy.metrics import Metrics, build_registry
from proxy.policy.model import Address, Policy
from proxy.pool import Pools
from proxy.protocol import COMPILED
from proxy.reload import Reloader, enforce
from proxy.request import HandshakeRequest
from proxy.session_control import Selector, close_matching, close_request
from proxy.sessions import SessionRegistry
from proxy.tls_listener import handshake_failure_reason, listener_tls_context
from proxy.upstream import forget_tls_contexts
from proxy.worker import WORKER_ADMIN, SupervisorChannel, WorkerRole


def _reason(error: OSError) -> str:
    """An OS error as users read it: "address already in use", not the errno and the tuple."""
    return (error.strerror or str(error)).lower() if error.errno else str(error)


#: How long a limiter replaced by a reload stays open for handshakes already judged by the old policy,
#: before it closes once no session holds its slots.
RETIRE_GRACE = 10.0

#: Connections the kernel may queue on the client listener before wsgate accepts them.
LISTEN_BACKLOG = 1024


class Gateway:
    """One gateway process's state: the active policy, the listener, the live sessions.

    ``listen_address`` and ``admin_address``, when given, are bound instead of the policy's (a worker binds
    the port its supervisor holds, and a private admin listener); reloads still compare the policy's own.
    """

    def __init__(
        self, policy: Policy, listen_address: Address | None = None, admin_address: Address | None = None
    ) -> None:
        self.policy = policy
        self._listen_at = listen_address
        self._admin_at = admin_address
        self.sessions = SessionRegistry()
        self.metrics = Metrics(lambda: self.sessions)
        # -- the limiter and session control across replicas (a Redis when the policy names one)
        self.limiter: MemoryLimiter | RedisLimiter = build_limiter(policy.limiter)
        self.metrics.limiter_state = self._limiter_state
        #: Closes this replica's sessions matching a selector (in its wire form) with a reason, returning
        #: how many: what a close request from any replica runs here.
        self.local_close: LocalClose = lambda selector, reason: close_matching(
            self.sessions, *close_request({**selector, "reason": reason})
        )
        self.cluster: Cluster | None = self._build_cluster(policy)
        #: Limiters replaced by a reload, closed once no session holds their slots.
        self._retired: set[RedisLimiter] = set()
        #: The routes' upstream pools: endpoint health and sessions, kept across reloads.
        self.pools = Pools()
        self.metrics.upstream_endpoints = self.pools.endpoints
        self.registry = build_registry(self.metrics)
        self.pipeline = Pipeline(policy, self.limiter, on_jwks_refresh=self.metrics.jwks_refreshed)
        self.metrics.policy_loaded(policy)
        self.draining = False
        self.address: Address | None = None
        self.admin = AdminServer(
            self.registry,
            AdminState(
                policy=lambda: self.policy,
                ready=lambda: self._acceptor is not None and self._acceptor.serving,
                draining=lambda: self.draining,
                policy_loaded_at=lambda: self.metrics.policy_loaded_at,
                started_at=time.time(),
                sessions=lambda: self.sessions,
                close_sessions=self._close_sessions,
            ),
        )
        self.admin_address: Address | None = None
        self._acceptor: Acceptor | None = None
        self._tls_context: ssl.SSLContext | None = None
        #: Client connections before their 101, by stage: accepted and in their TLS handshake (each with the
        #: task that runs it), then connected until the 101 or their close (refused ones linger here).
        self._connecting: dict[HandshakeProtocol, asyncio.Task[None]] = {}
        self._handshakes: set[HandshakeProtocol] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self.handshakes = HandshakeFlow(
            pipeline=lambda: self.pipeline,
            draining=lambda: self.draining,
            sessions=self.sessions,
            metrics=self.metrics,
            upgraded=self._handshakes.discard,
            track=self.track,
            pools=self.pools,
        )

    @property
    def connection_count(self) -> int:
        """Client connections held: in their TLS handshake, sending or waiting on their upgrade request,
        refused and lingering, and live sessions. What ``limits.max_connections`` bounds."""
        return len(self._connecting) + len(self._handshakes) + len(self.sessions)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> Address:
        """Start listening; return the bound address (useful with port 0)."""
        listen = self.policy.listen
        listen_at = self._listen_at or listen.address
        admin_at = self._admin_at or self.policy.admin
        tls = self._tls_context = listener_tls_context(listen.tls) if listen.tls else None
        try:
            sockets = await bind_sockets(listen_at, LISTEN_BACKLOG)
        except OSError as error:
            message = f"cannot listen on {listen_at} (listen.address): {_reason(error)}"
            raise StartupError(message) from None
        acceptor = Acceptor("client", sockets, self._accepted, self.metrics.accept_failed)
        self.address = Address(*acceptor.address)
        try:
            self.admin_address = await self.admin.start(admin_at, self.metrics.accept_failed)
        except OSError as error:
            acceptor.close()
            raise StartupError(f"cannot listen on {admin_at} (admin.address): {_reason(error)}") from None
        except BaseException:
            acceptor.close()
            raise
        self._acceptor = acceptor
        self._start_shared()
        self.pools.apply(self.policy)
        acceptor.start()
        self._prefetch_keys()
        logs.event(
            "gateway.mask", implementation=MASK_IMPLEMENTATION, frame_core="compiled" if COMPILED else "pure"
        )
        logs.event(
            "gateway.listening",
            address=str(self.address),
            admin=str(self.admin_address),
            tls=tls is not None,
            routes=[route.path for route in self.policy.routes],
            policy_sha256=self.policy.sha256[:12],
        )
        self._warn(self.policy)
        return self.address

    def reload_files(self) -> None:
        """Read the certificate files again: the listener's certificates and client CA (new TLS handshakes
        get a context built from them; live sessions keep theirs) and the upstreams' CA files. Files that do
        not load are reported and the running context stays."""
        forget_tls_contexts()
        tls = self.policy.listen.tls
        if tls is None or self._tls_context is None:
            return
        certs = [str(pair.cert_file) for pair in tls.pairs]
        try:
            context = listener_tls_context(tls)
        except (OSError, ssl.SSLError, ValueError) as error:
            logs.event("tls.reload_failed", logging.ERROR, cert=certs, error=str(error))
            return
        self._tls_context = context
        logs.event("tls.reloaded", cert=certs)

    def apply_policy(self, policy: Policy) -> int:
        """Swap in a new valid policy: new handshakes use it at once; live sessions it would refuse are
        closed 1008 "policy changed". Returns how many were closed."""
        if policy.limiter != self.policy.limiter:
            self._swap_shared(policy)
        if self.cluster is not None:  # close requests are signed and checked with the new admin token
            self.cluster.secret = policy.admin_token
        self.pipeline = Pipeline(
            policy, self.limiter, previous=self.pipeline, on_jwks_refresh=self.metrics.jwks_refreshed
        )
        self.policy = policy
        self.pools.apply(policy)
        self.metrics.policy_loaded(policy)
        self._prefetch_keys()
        self._warn(policy)
        return enforce(self.sessions, policy)

    # -- the limiter and session control across replicas ---------------------------------

    async def _close_sessions(self, selector: Selector, reason: str) -> dict[str, Any]:
        """``POST /sessions/close``: on every replica when they share a Redis, else here. With Redis
        unavailable this replica's sessions are still closed, and the answer says the others were not
        reached."""
        if self.cluster is None:
            return {"closed": close_matching(self.sessions, selector, reason)}
        try:
            return await self.cluster.close_everywhere(selector.to_mapping(), reason)
        except LimiterUnavailable as error:
            closed = close_matching(self.sessions, selector, reason)
            return {"closed": closed, "replicas": 1, "error": f"other replicas not reached: {error}"}

    def _build_cluster(self, policy: Policy) -> Cluster | None:
        redis = policy.limiter.redis
        if redis is None:
            return None
        return Cluster(
            redis, lambda selector, reason: self.local_close(selector, reason), secret=policy.admin_token
        )

    def _limiter_state(self) -> tuple[str, bool]:
        limiter = self.limiter
        return (limiter.backend, limiter.up) if isinstance(limiter, RedisLimiter) else ("memory", True)

    def _start_shared(self) -> None:
        if isinstance(self.limiter, RedisLimiter):
            self.limiter.start()
        if self.cluster is not None:
            self.cluster.start()

    def _swap_shared(self, policy: Policy) -> None:
        """New handshakes count in the limiter ``policy`` names; live sessions give their slots back to
        the one they took them from (their LimiterSlots hold it), which closes once none is held."""
        old = self.limiter
        if isinstance(old, RedisLimiter) and policy.limiter.redis == self.policy.limiter.redis:
            old.on_error = policy.limiter.on_error  # the same Redis: only what a failure means changed
            return
        self.limiter = build_limiter(policy.limiter)
        if isinstance(old, RedisLimiter):
            self._retired.add(old)
            self.track(asyncio.get_running_loop().create_task(self._retire(old)))
        if policy.limiter.redis != self.policy.limiter.redis:
            if self.cluster is not None:
                self.track(asyncio.get_running_loop().create_task(self.cluster.close()))
            self.cluster = self._build_cluster(policy)
        self._start_shared()

    async def _retire(self, limiter: RedisLimiter) -> None:
        await asyncio.sleep(RETIRE_GRACE)
        await limiter.wait_idle()
        self._retired.discard(limiter)
        await limiter.close()

    async def _close_shared(self) -> None:
        """After the drain: give back what the limiters still hold and close their connections."""
        for limiter in (self.limiter, *self._retired):
            if isinstance(limiter, RedisLimiter):
                await limiter.close()
        self._retired.clear()
        if self.cluster is not None:
            await self.cluster.close()

    @staticmethod
    def _warn(policy: Policy) -> None:
        """Log what the loader warned about (a key that does nothing), once per policy applied."""
        for warning in policy.warnings:
            logs.event("policy.warning", logging.WARNING, warning=warning)

    def _prefetch_keys(self) -> None:
        """Fetch every JWKS not fetched yet, in the background: the first handshakes need not wait for
        it, and a wrong URL shows in the logs at start rather than at the first client."""
        loop = asyncio.get_running_loop()
        for verifier in self.pipeline.verifiers.values():
            if verifier.jwks is not None and not verifier.jwks.fetched:
                self.track(loop.create_task(verifier.jwks.refresh()))

    async def stop(self) -> None:
        """Graceful stop: refuse new connections, send 1001 to both sides of every session, wait up to
        ``drain_timeout``, then cut what is left."""
        if self.draining:
            return
        self.draining = True
        self.metrics.draining = True
        if self._acceptor is not None:
            self._acceptor.close()
        for connecting in list(self._connecting.values()):
            connecting.cancel()  # in their TLS handshake: nothing can be said to them before it ends
        for handshake in list(self._handshakes):
            if handshake.task is None and not handshake.answered:
                self.handshakes.reject(handshake, DRAINING())
        live = len(self.sessions)
        logs.event("gateway.draining", sessions=live, drain_timeout_s=self.policy.limits.drain_timeout)
        self.sessions.close_all(SHUTTING_DOWN)
        try:
            drained = await self.sessions.wait_empty(self.policy.limits.drain_timeout)
            if not drained:
                self.abort_all()
        finally:
            await self.admin.stop()
            await self.pools.close()
            await self._close_shared()
        logs.event("gateway.stopped", drained=drained, cut=0 if drained else live)
        self._stopped.set()

    def abort_all(self) -> None:
        """Cut every connection at once (second signal, or drain timeout)."""
        for session in self.sessions:
            session.client.transport.abort()
            session.upstream.transport.abort()
        for connecting in list(self._connecting.values()):
            connecting.cancel()
        for handshake in list(self._handshakes):
            handshake.transport.abort()

    async def wait_stopped(self) -> None:
        """Until :meth:`stop` finished."""
        await self._stopped.wait()

    # -- client connections ---------------------------------------------------------------

    def _accepted(self, sock: socket.socket) -> None:
        """A client connected: count it, and connect its socket (through TLS on a TLS listener) to the
        protocol that reads its request. Above ``max_connections`` that protocol answers 503 at once."""
        loop = asyncio.get_running_loop()
        policy = self.policy
        limits = policy.limits
        protocol = HandshakeProtocol(
            limits,
            tls=policy.listen.tls is not None,
            proxy_protocol=policy.listen.proxy_protocol,
            deadline=loop.time() + limits.handshake_timeout,
            on_open=self._opened,
            on_request=self._on_request,
            on_bad_request=self.handshakes.reject,
            on_close=self._handshakes.discard,
            refusal=OVERLOADED() if self.connection_count >= limits.max_connections else None,
        )
        task = loop.create_task(self._connect(sock, protocol, limits.handshake_timeout))
        self._connecting[protocol] = task
        task.add_done_callback(partial(self._connect_done, protocol))

    async def _connect(self, sock: socket.socket, protocol: HandshakeProtocol, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        tls = self._tls_context
        try:
            if tls is None:
                await loop.connect_accepted_socket(lambda: protocol, sock)
            else:
                # Bounded like the request itself: a client that never sends its ClientHello is cut after
                # handshake_timeout, and one that never answers our close_notify after LINGER_SECONDS, as
                # a plain connection's lingering close (the loops' defaults are 60 s and 30 s).
                await loop.connect_accepted_socket(
                    lambda: protocol,
                    sock,
                    ssl=tls,
                    ssl_handshake_timeout=timeout,
                    ssl_shutdown_timeout=LINGER_SECONDS,
                )
        except OSError as error:  # the TLS handshake failed or timed out, or the client left; socket closed
            if tls is not None:
                reason = handshake_failure_reason(error)
                self.metrics.tls_handshake_failed(reason)
                logs.event(
                    "tls.handshake_failed",
                    logging.DEBUG,
                    reason=reason,
                    error=str(error) or type(error).__name__,
                )

    def _connect_done(self, protocol: HandshakeProtocol, task: asyncio.Task[None]) -> None:
        # A failed TLS handshake never reaches the protocol (no connection_made, no connection_lost):
        # this is where such a connection stops being counted.
        self._connecting.pop(protocol, None)
        if not task.cancelled() and task.exception() is not None:
            logs.LOGGER.error("listener.error", exc_info=task.exception())

    def _opened(self, protocol: HandshakeProtocol) -> None:
        self._connecting.pop(protocol, None)
        self._handshakes.add(protocol)

    def _on_request(self, connection: HandshakeProtocol, request: HandshakeRequest) -> None:
        connection.task = asyncio.get_running_loop().create_task(self.handshakes.run(connection, request))

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference to a background task until it is done."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def serve(
    policy: Policy,
    watch_interval: float = 1.0,
    log_format: logs.LogFormat | None = None,
    log_level: str | None = None,
    worker: WorkerRole | None = None,
) -> int:
    """Run a gateway until SIGTERM/SIGINT; a second signal cuts every connection at once.

    When the policy came from a file, the file is watched and SIGHUP reloads it at once. ``log_format``
    and ``log_level`` (from the command line) win over the policy's ``log`` section, also after reloads.
    As one ``worker`` of a supervisor, it binds what the supervisor holds, reports its admin address to it,
    refuses reloads the role forbids, and drains when the supervisor is gone.
    """
    if worker is None:
        gateway = Gateway(policy)
    else:
        gateway = Gateway(policy, worker.listen_address(policy), WORKER_ADMIN)
    await gateway.start()
    # What start-up made (modules, the policy, the listeners) lives as long as the process: moved out of
    # the collector's generations, it is not walked again at every full collection while sessions churn.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    reloader: Reloader | None = None
    if policy.source is not None:

        def apply(new: Policy) -> int:
            if new.log != gateway.policy.log:
                logs.apply_settings(new.log, log_format, log_level)
            return gateway.apply_policy(new)

        reloader = Reloader(
            policy.source,
            lambda: gateway.policy,
            apply,
            gateway.metrics,
            interval=watch_interval,
            files_changed=gateway.reload_files,
            vet=worker.vet if worker is not None else None,
        )
        reloader.start()
        hup = reloader

        def on_hangup() -> None:
            task = loop.create_task(hup.reload("SIGHUP"))
            gateway.track(task)

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    forced = asyncio.Event()
    stop_task: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stop_task
        if stop_task is None:
            logs.event("gateway.signal", signal=signal.Signals(signum).name, action="drain")
            stop_task = loop.create_task(gateway.stop())
        else:
            logs.event("gateway.signal", signal=signal.Signals(signum).name, action="exit now")
            gateway.abort_all()
            forced.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    channel: SupervisorChannel | None = None
    if worker is not None:

        def on_supervisor_gone() -> None:
            if stop_task is None:
                on_signal(signal.SIGTERM)

        channel = SupervisorChannel(worker)
        assert gateway.address is not None and gateway.admin_address is not None  # set by start()
        await channel.report(gateway.address, gateway.admin_address, on_supervisor_gone)
    stopped = asyncio.ensure_future(gateway.wait_stopped())
    force = asyncio.ensure_future(forced.wait())
    await asyncio.wait({stopped, force}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (stopped, force):
        pending.cancel()
    if stop_task is not None and not stop_task.done():
        stop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stop_task
    if reloader is not None:
        await reloader.stop()
    if channel is not None:
        channel.close()
    return 1 if forced.is_set() else 0
