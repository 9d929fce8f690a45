"""Shared limiter state for handshake-time limits: rates (GCRA) and concurrency caps.

The :class:`Limiter` protocol is async so that a Redis implementation (many replicas sharing state) can
stand in for :class:`~proxy.limiter.memory.MemoryLimiter` without changing the guards.
"""

from __future__ import annotations

from typing import Protocol


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
