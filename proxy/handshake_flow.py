"""One client handshake, from its parsed upgrade request to a live session or to exactly one refusal.

The steps: judge the request (:class:`~proxy.handshake.Pipeline`: route, client IP, the guard registry),
connect the upstream (its 101 comes before ours, so an unreachable upstream is an honest 502), answer 101,
register the :class:`~proxy.sessions.Session` and start its relay.

Guarantees:

- the limiter slots the caps take belong to one :class:`~proxy.guards.slots.LimiterSlots`, released once:
  when the handshake fails at any step (refused, upstream down, client gone, draining, cancelled, a bug),
  or when the session it became ends;
- every refusal is answered by :meth:`HandshakeFlow.reject`: one ``handshake.rejected`` line, one metric;
- a bug costs one handshake, never the process: one ``handshake.error`` line with its traceback and a 500
  ``internal_error``, from one place;
- a handshake judged by a policy that was replaced before its session started is judged by the new one
  too (and closed 1008 "policy changed" if that refuses it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from proxy import logs
from proxy.deflate import Agreement, accept_client_offer
from proxy.errors import DRAINING, INTERNAL, Rejection, UpstreamError
from proxy.frames import accept_key
from proxy.guards.slots import LimiterSlots
from proxy.handshake import Admission, Pipeline
from proxy.headers import header_values
from proxy.listener import HandshakeProtocol, http_response
from proxy.metrics import NO_ROUTE, Metrics
from proxy.pool import Endpoint, Pools
from proxy.relay import start_relay
from proxy.reload import enforce
from proxy.request import ClientCertificate, HandshakeRequest
from proxy.sessions import Session, SessionRegistry
from proxy.upstream import UpstreamConnection, connect_upstream


class HandshakeFlow:
    """The handshakes of one gateway process, and the end of the sessions they become."""

    def __init__(
        self,
        *,
        pipeline: Callable[[], Pipeline],
        draining: Callable[[], bool],
        sessions: SessionRegistry,
        metrics: Metrics,
        upgraded: Callable[[HandshakeProtocol], None],
        track: Callable[[asyncio.Task[Any]], None],
        pools: Pools | None = None,
    ) -> None:
        """``pipeline``: the current policy's pipeline (a reload replaces it); ``draining``: whether the
        gateway is stopping; ``upgraded``: told of a connection that got its 101 and is a handshake no more;
        ``track``: keeps a background task referenced until it is done; ``pools``: the routes' upstream
        pools with their endpoints' health (kept across reloads)."""
        self._pipeline = pipeline
        self._draining = draining
        self._sessions = sessions
        self._metrics = metrics
        self._upgraded = upgraded
        self._track = track
        self._pools = pools if pools is not None else Pools()

    async def run(self, connection: HandshakeProtocol, request: HandshakeRequest) -> None:
        """Take one request to a live session, or answer it with one refusal."""
        started = time.monotonic()
        pipeline = self._pipeline()
        slots = LimiterSlots(pipeline.limiter)
        session: Session | None = None
        try:
            session = await self._open(pipeline, slots, connection, request, started)
        except Rejection as rejection:
            self.reject(connection, rejection, request, started)
        except Exception:  # noqa: BLE001 - logged with its traceback, answered with 500
            logs.LOGGER.exception("handshake.error", extra={"fields": {"request_id": request.request_id}})
            if connection.answered:
                connection.transport.abort()  # the 101 is out: no answer is left to give
            else:
                self.reject(connection, INTERNAL(), request, started)
        finally:
            if session is None:
                await slots.release()
        current = self._pipeline()
        if session is not None and current is not pipeline:
            # The policy was reloaded while this handshake was in flight: judge it by the new one too.
            enforce((session,), current.policy)

    def reject(
        self,
        connection: HandshakeProtocol,
        rejection: Rejection,
        request: HandshakeRequest | None = None,
        started: float | None = None,
    ) -> None:
        """Answer ``rejection`` (also for requests refused before they were parsed), logged and counted."""
        policy = self._pipeline().policy
        route = policy.match_route(request.path, request.host) if request is not None else None
        self._metrics.rejected(
            route.path if route is not None else NO_ROUTE,
            rejection.reason,
            time.monotonic() - started if started is not None else None,
        )
        logs.event(
            "handshake.rejected",
            logging.INFO if rejection.status < 500 else logging.WARNING,
            request_id=connection.request_id,
            client_ip=request.client_ip if request else connection.peer_ip,
            route=route.path if route is not None else None,
            host=request.host if request else None,
            path=request.path if request else None,
            token=request.token_fingerprint if request else None,
            provider=request.token_provider if request else None,
            client_subject=_subject(connection.client_certificate),
            status=rejection.status,
            reason=rejection.reason,
            detail=rejection.detail,
        )
        connection.reject(rejection)

    async def _open(
        self,
        pipeline: Pipeline,
        slots: LimiterSlots,
        connection: HandshakeProtocol,
        request: HandshakeRequest,
        started: float,
    ) -> Session | None:
        """The session the request became, or None when the client left first (or the gateway began to
        stop, which was answered).

        Raises:
            Rejection: a guard's refusal, 503 ``draining``, 502 ``upstream_unavailable``.
        """
        admission = await pipeline.admit(request, slots, self._draining())
        connect_started = time.monotonic()
        try:
            upstream = await connect_upstream(request, admission, self._pools.pool(admission.route))
        except UpstreamError as error:
            raise Rejection(502, "upstream_unavailable", str(error)) from None
        self._metrics.upstream_connected(admission.route.path, time.monotonic() - connect_started)
        try:
            if connection.lost or self._draining():
                upstream.transport.abort()
                if not connection.lost:
                    self.reject(connection, DRAINING(), request, started)
                return None
            return self._start_session(connection, request, admission, upstream, slots, started)
        except BaseException:
            upstream.transport.abort()
            raise

    def _start_session(
        self,
        connection: HandshakeProtocol,
        request: HandshakeRequest,
        admission: Admission,
        upstream: UpstreamConnection,
        slots: LimiterSlots,
        started: float,
    ) -> Session:
        """Answer 101, register the session (it owns ``slots`` from here on) and start its relay."""
        route = admission.route
        client_deflate = (
            accept_client_offer(header_values(request.headers, "sec-websocket-extensions"))
            if route.compression.client
            else None
        )
        connection.accept(_switching_protocols(request, upstream, client_deflate))
        self._upgraded(connection)
        identity = admission.identity
        endpoint = upstream.endpoint
        session = Session(
            asyncio.get_running_loop(),
            request_id=request.request_id,
            route=route,
            client_ip=admission.client_ip,
            subprotocol=upstream.subprotocol,
            on_finish=self._session_finished if endpoint is None else self._finished_on(endpoint),
            identity=identity,
            slots=slots if slots.held else None,  # most sessions hold none: keep no object for them
            request_path=request.path,
            origin=request.header("origin"),
            host=request.host,
            client_certificate=request.client_certificate,
            endpoint=endpoint.label if endpoint is not None else route.upstream.endpoints[0].label,
        )
        self._sessions.add(session)
        if endpoint is not None:
            endpoint.sessions += 1  # given back by on_finish
        try:
            self._relay(session, connection, request, admission, upstream, started, client_deflate)
        except BaseException:
            self._sessions.remove(session)  # never relayed, so it would never finish by itself
            if endpoint is not None:
                endpoint.sessions -= 1
            raise
        return session

    def _relay(
        self,
        session: Session,
        connection: HandshakeProtocol,
        request: HandshakeRequest,
        admission: Admission,
        upstream: UpstreamConnection,
        started: float,
        client_deflate: Agreement | None,
    ) -> None:
        """Count and log the session's opening, and start relaying its frames."""
        route, identity = admission.route, admission.identity
        handshake_seconds = time.monotonic() - started
        self._metrics.session_opened(route.path, handshake_seconds)
        logs.event(
            "session.open",
            request_id=request.request_id,
            client_ip=admission.client_ip,
            route=route.path,
            host=request.host,
            endpoint=session.endpoint,
            upstream=session.endpoint,  # the endpoint's older name, kept for existing log readers
            subprotocol=upstream.subprotocol,
            subject=identity.subject if identity else None,
            provider=identity.provider if identity else None,
            token=identity.fingerprint if identity else None,
            client_subject=_subject(request.client_certificate),
            handshake_ms=round(handshake_seconds * 1000, 1),
            client_deflate=client_deflate.header if client_deflate else None,
            upstream_deflate=upstream.deflate.header if upstream.deflate else None,
        )
        start_relay(
            session,
            connection.transport,
            upstream.transport,
            connection.pending,
            upstream.pending,
            upstream.handshake.lost,
            client_deflate,
            upstream.deflate,
        )

    def _finished_on(self, endpoint: Endpoint) -> Callable[[Session], None]:
        """A session's end that also gives its endpoint's session count back."""

        def finished(session: Session) -> None:
            endpoint.sessions -= 1
            self._session_finished(session)

        return finished

    def _session_finished(self, session: Session) -> None:
        self._sessions.remove(session)
        self._metrics.session_closed(session)
        if session.slots is not None and session.slots.held:
            self._track(asyncio.get_running_loop().create_task(session.slots.release()))
        identity = session.identity
        client_checker = session.client.checker
        logs.event(
            "session.close",
            request_id=session.request_id,
            client_ip=session.client_ip,
            route=session.route.path,
            host=session.host,
            endpoint=session.endpoint,
            initiator=session.initiator,
            code=session.close_code,
            reason=session.close_reason,
            duration_s=round(session.duration, 3),
            client_messages=session.client.messages,
            client_bytes=session.client.bytes,
            upstream_messages=session.upstream.messages,
            upstream_bytes=session.upstream.bytes,
            dropped=client_checker.dropped if client_checker else 0,
            subject=identity.subject if identity else None,
            provider=identity.provider if identity else None,
            token=identity.fingerprint if identity else None,
            client_subject=_subject(session.client_certificate),
        )


def _subject(certificate: ClientCertificate | None) -> str | None:
    return certificate.subject if certificate is not None else None


def _switching_protocols(
    request: HandshakeRequest, upstream: UpstreamConnection, client_deflate: Agreement | None
) -> bytes:
    """The 101 for the client: its accept key, the upstream's subprotocol and response headers, and the
    gateway's own answer to the client's permessage-deflate offer (the upstream's is its own hop's)."""
    headers: list[tuple[str, str]] = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(request.header("sec-websocket-key") or "")),
    ]
    if upstream.subprotocol is not None:
        headers.append(("Sec-WebSocket-Protocol", upstream.subprotocol))
    if client_deflate is not None:
        headers.append(("Sec-WebSocket-Extensions", client_deflate.header))
    headers.append(("X-Request-Id", request.request_id))
    headers.extend(upstream.response_headers)
    return http_response(101, headers)
