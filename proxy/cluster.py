"""Session control across replicas, over the limiter's Redis pub/sub.

Why: an operator closing a user's sessions (``POST /sessions/close``) talks to one replica, but the
sessions live on all of them. :meth:`Cluster.close_everywhere` publishes the request on
``{key_prefix}sessions.close``; every replica subscribed (the caller included, through its own
subscription) closes its matching sessions with its ``local_close`` and answers on
``{key_prefix}sessions.closed``. The caller waits up to :data:`REPLY_TIMEOUT` for as many answers as
``PUBLISH`` said received the request.

Messages are JSON: a request ``{"id", "selector", "reason", "mac"}``, a reply ``{"id", "replica",
"closed"}``. A message that is not one of these is ignored (one debug log line).

Anyone who may ``PUBLISH`` on the Redis could otherwise close sessions without the admin token, so a
request carries ``mac``, an HMAC-SHA256 keyed by the admin token (``admin.token_env``) over its id,
selector and reason: a replica acts only on a request whose ``mac`` its own token confirms, and a
replica without an admin token acts on none. The selector and reason are checked as the admin API
checks them (no empty selector, a reason that fits a close frame) by ``local_close``. The
subscription comes back by itself after Redis does; nothing here can stop the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy import logs
from proxy.errors import LimiterUnavailable, WsgateError
from proxy.limiter.redis import CLOSE_TIMEOUT, REDIS_FAILURES, connect, describe, redacted_url, replica_id
from proxy.policy.model import RedisLimiter as RedisSettings

#: A message on the channels larger than this is not parsed (a request is a selector and a reason).
MAX_MESSAGE_BYTES = 16 * 1024
#: How long :meth:`Cluster.close_everywhere` waits for the replicas' answers.
REPLY_TIMEOUT = 1.0
#: Seconds between attempts to subscribe again while Redis is away.
RESUBSCRIBE_INTERVAL = 0.5
#: The bound on one publish and on each socket operation of the subscription.
COMMAND_TIMEOUT = 1.0

#: Closes this replica's sessions matching a selector, with a reason; returns how many it closed.
LocalClose = Callable[[dict[str, Any], str], "int | Awaitable[int]"]


def _no_sessions(selector: dict[str, Any], reason: str) -> int:
    return 0


def _mac(secret: str, request: dict[str, Any]) -> str:
    """The request's signature: HMAC-SHA256 keyed by the admin token over its canonical JSON."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()


@dataclass
class _Waiting:
    """One request of ours, collecting its replies."""

    replies: dict[str, int] = field(default_factory=dict)
    expected: int | None = None
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self) -> None:
        if self.expected is not None and len(self.replies) >= self.expected:
            self.complete.set()


class Cluster:
    """This replica's end of session control over Redis: subscribed from :meth:`start` to :meth:`close`."""

    def __init__(
        self,
        settings: RedisSettings,
        local_close: LocalClose = _no_sessions,
        replica: str | None = None,
        secret: str | None = None,
    ) -> None:
        self.local_close = local_close
        #: The admin token: signs this replica's requests and checks everyone's (None: acts on none).
        self.secret = secret
        self.replica = replica or replica_id()
        self.requests = f"{settings.key_prefix}sessions.close"
        self.replies = f"{settings.key_prefix}sessions.closed"
        self.where = redacted_url(settings.url)
        self._redis = connect(
            settings, max(settings.timeout, COMMAND_TIMEOUT), max_connections=8, keepalive=True
        )
        self._waiting: dict[str, _Waiting] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded, and a cancellation of close() itself still propagates.
            await asyncio.wait([self._task], timeout=CLOSE_TIMEOUT)
        with contextlib.suppress(*REDIS_FAILURES):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._redis.aclose()

    async def close_everywhere(self, selector: dict[str, Any], reason: str) -> dict[str, int]:
        """Close the sessions matching ``selector`` on every replica; ``{"closed": n, "replicas": m}``,
        ``m`` the replicas that answered within :data:`REPLY_TIMEOUT`.

        Raises:
            LimiterUnavailable: Redis could not carry the request.
        """
        if not self.subscribed.is_set():
            # Its own sessions would be left out of the answer: say so, and let the caller close them.
            raise LimiterUnavailable(f"this replica is not subscribed to Redis ({self.where})")
        request_id = uuid.uuid4().hex
        waiting = self._waiting[request_id] = _Waiting()
        try:
            request = {"id": request_id, "selector": selector, "reason": reason}
            message = json.dumps({**request, "mac": _mac(self.secret or "", request)})
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    waiting.expected = int(await self._redis.publish(self.requests, message))
            except REDIS_FAILURES as error:
                raise LimiterUnavailable(f"Redis ({self.where}) is unavailable: {describe(error)}") from None
            waiting.check()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPLY_TIMEOUT):
                    await waiting.complete.wait()
            return {"closed": sum(waiting.replies.values()), "replicas": len(waiting.replies)}
        finally:
            del self._waiting[request_id]

    # -- the subscription -----------------------------------------------------------------

    async def _listen(self) -> None:
        """Subscribe, handle messages; when Redis goes away, subscribe again every
        :data:`RESUBSCRIBE_INTERVAL` until it is back."""
        lost = False
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.requests, self.replies)
                self.subscribed.set()
                logs.event("cluster.subscribed", redis=self.where, again=lost)
                lost = False
                while True:
                    message = await pubsub.get_message(timeout=COMMAND_TIMEOUT)
                    if message is not None and message.get("type") == "message":
                        await self._received(message["channel"], message["data"])
            except Exception as error:  # noqa: BLE001 - whatever happens, subscribe again: never stop here
                self.subscribed.clear()
                if not isinstance(error, REDIS_FAILURES):
                    logs.LOGGER.exception("cluster.error")
                if not lost:
                    logs.event(
                        "cluster.unsubscribed", logging.WARNING, redis=self.where, error=describe(error)
                    )
                    lost = True
            finally:
                with contextlib.suppress(*REDIS_FAILURES):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(RESUBSCRIBE_INTERVAL)

    async def _received(self, channel: bytes, data: bytes) -> None:
        try:
            if len(data) > MAX_MESSAGE_BYTES:
                raise ValueError(f"{len(data)} bytes; a request or a reply is at most {MAX_MESSAGE_BYTES}")
            message = json.loads(data)
            if not isinstance(message, dict) or not isinstance(message.get("id"), str):
                raise ValueError("not an object with an id")
            if channel == self.requests.encode():
                selector, reason = message["selector"], message["reason"]
                if not isinstance(selector, dict) or not isinstance(reason, str):
                    raise ValueError("a request needs a selector object and a reason string")
                request = {"id": message["id"], "selector": selector, "reason": reason}
                mac = message.get("mac")
                if (
                    self.secret is None
                    or not isinstance(mac, str)
                    or not hmac.compare_digest(mac, _mac(self.secret, request))
                ):
                    logs.event(
                        "cluster.refused",
                        logging.WARNING,
                        request_id=message["id"][:64],
                        reason="no admin token on this replica" if self.secret is None else "bad signature",
                    )
                    return
                await self._close_here(message["id"], selector, reason)
            else:
                replica, closed = message["replica"], message["closed"]
                if not isinstance(replica, str) or type(closed) is not int:
                    raise ValueError("a reply needs a replica string and a closed count")
                waiting = self._waiting.get(message["id"])
                if waiting is not None:
                    waiting.replies[replica] = closed
                    waiting.check()
        except (ValueError, KeyError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            logs.event(
                "cluster.bad_message",
                logging.DEBUG,
                channel=channel.decode(errors="replace"),
                error=str(error),
            )

    async def _close_here(self, request_id: str, selector: dict[str, Any], reason: str) -> None:
        try:
            outcome = self.local_close(selector, reason)
            closed = await outcome if inspect.isawaitable(outcome) else outcome
        except WsgateError as error:  # a selector or reason the admin API would refuse too
            logs.event("cluster.refused", logging.WARNING, request_id=request_id[:64], reason=str(error))
            closed = 0
        except Exception:  # noqa: BLE001 - a selector this replica cannot apply must not end the subscription
            logs.LOGGER.exception("cluster.close_error", extra={"fields": {"request_id": request_id}})
            closed = 0
        reply = json.dumps({"id": request_id, "replica": self.replica, "closed": int(closed)})
        async with asyncio.timeout(COMMAND_TIMEOUT):
            await self._redis.publish(self.replies, reply)
