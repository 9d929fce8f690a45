"""The owner of one handshake's limiter slots (connections per IP, per subject).

Every slot a cap takes is taken through a :class:`LimiterSlots`, and given back by it: once, all at once,
whether the handshake failed at a later step, was cancelled, or became a session that has now ended.
"""

from __future__ import annotations

from proxy.limiter import Limiter


class LimiterSlots:
    """The concurrency slots one handshake holds, from its caps until they are released."""

    __slots__ = ("_held", "_limiter")

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._held: list[str] = []

    @property
    def held(self) -> tuple[str, ...]:
        """The keys held, in the order they were taken."""
        return tuple(self._held)

    async def acquire(self, key: str, cap: int) -> bool:
        """Take one of ``cap`` slots of ``key``; False (nothing taken) when all are in use."""
        if not await self._limiter.acquire(key, cap):
            return False
        self._held.append(key)
        return True

    async def release(self) -> None:
        """Give back every slot held. Calling it again gives back nothing more; a release cancelled
        halfway keeps the keys not yet given back, for the next call. A key is forgotten here before
        its release is awaited: one cancelled during that await is never released twice (a second
        release could give back another session's slot of the same key)."""
        while self._held:
            await self._limiter.release(self._held.pop())
