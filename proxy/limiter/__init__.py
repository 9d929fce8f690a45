"""Shared limiter state for handshake-time limits: rates (GCRA) and concurrency caps.

The :class:`Limiter` protocol is async so that a Redis implementation (many replicas sharing state) can
stand in for :class:`~proxy.limiter.memory.MemoryLimiter` without changing the guards:
:class:`~proxy.limiter.redis.RedisLimiter`, shared by every replica. :func:`build_limiter` picks one from
the policy's ``limiter`` section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.limiter.memory import MemoryLimiter
    from proxy.limiter.redis import RedisLimiter
    from proxy.policy.model import LimiterSettings


class Limiter(Protocol):
    """Rate and concurrency bookkeeping keyed by strings such as ``ip:203.0.113.7``."""

    async def hit(self, key: str, rate: float, burst: int) -> float:
        """Count one event against ``rate`` per second with ``burst``; 0.0 when allowed, else seconds
        until the next event would be."""
        ...

    async def acquire(self, key: str, cap: int) -> bool:
        """Take one of ``cap`` concurrent slots; False (and nothing taken) when all are in use."""
        ...

    async def release(self, key: str) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        ...


def build_limiter(settings: LimiterSettings) -> MemoryLimiter | RedisLimiter:
    """The limiter ``settings`` (the policy's ``limiter`` section) asks for: in this process, or on the
    shared Redis (call its ``start`` in the event loop, and ``close`` when done with it)."""
    # Imported here: the in-process limiter (and ``wsgate check``) need no Redis client loaded.
    from proxy.limiter.memory import MemoryLimiter
    from proxy.limiter.redis import RedisLimiter

    if settings.redis is None:
        return MemoryLimiter()
    return RedisLimiter(settings.redis, settings.on_error)
