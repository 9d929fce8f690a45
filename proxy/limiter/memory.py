"""In-process limiter state, bounded in memory under an attack from many addresses."""

from __future__ import annotations

import time


class MemoryLimiter:
    """GCRA rates and concurrency counters in dicts.

    A rate entry whose theoretical arrival time has passed says nothing a missing entry would not, so a
    sweep at most every ``sweep_interval`` seconds drops them: memory holds only keys active within about
    ``burst / rate`` seconds. Counters are deleted when they fall to zero.
    """

    def __init__(self, sweep_interval: float = 10.0) -> None:
        self._arrival: dict[str, float] = {}
        self._slots: dict[str, int] = {}
        self._sweep_interval = sweep_interval
        self._next_sweep: float | None = None

    async def hit(self, key: str, rate: float, burst: int) -> float:
        return self.hit_now(key, rate, burst, time.monotonic())

    def hit_now(self, key: str, rate: float, burst: int, now: float) -> float:
        """:meth:`hit` at a given time (the arithmetic, for tests)."""
        if self._next_sweep is None:
            self._next_sweep = now + self._sweep_interval
        elif now >= self._next_sweep:
            self._sweep(now)
        interval = 1.0 / rate
        tolerance = interval * (max(burst, 1) - 1)
        arrival = max(self._arrival.get(key, now), now)
        if arrival - now > tolerance:
            return arrival - tolerance - now
        self._arrival[key] = arrival + interval
        return 0.0

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_interval
        expired = [key for key, arrival in self._arrival.items() if arrival <= now]
        for key in expired:
            del self._arrival[key]

    async def acquire(self, key: str, cap: int) -> bool:
        count = self._slots.get(key, 0)
        if count >= cap:
            return False
        self._slots[key] = count + 1
        return True

    async def release(self, key: str) -> None:
        count = self._slots.get(key, 0) - 1
        if count > 0:
            self._slots[key] = count
        else:
            self._slots.pop(key, None)

    @property
    def tracked_keys(self) -> int:
        """How many keys hold state (rates and counters): what an attack from many addresses costs."""
        return len(self._arrival) + len(self._slots)
