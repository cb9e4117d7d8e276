"""A clock that moves only when a test moves it, for the breaker, limiter, retries and
cool-downs (``proxy.upstream.clock``)."""

from __future__ import annotations

import asyncio

from proxy.upstream.clock import Clock


class FakeClock(Clock):
    """``now()`` is what :meth:`advance` made it. ``sleep(seconds)`` is recorded in
    ``slept``; with ``auto`` it moves the clock on by ``seconds`` and returns at once, else it
    waits until :meth:`advance` has moved the clock past its end."""

    def __init__(self, start: float = 1000.0, *, auto: bool = False) -> None:
        super().__init__(self._now, self._sleep)
        self.time = start
        self.auto = auto
        self.slept: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def _now(self) -> float:
        return self.time

    async def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.auto:
            self.time += max(seconds, 0.0)
            await asyncio.sleep(0)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.time + seconds, waiter))
        try:
            await waiter
        finally:
            self._sleepers = [s for s in self._sleepers if s[1] is not waiter]

    @property
    def sleeping(self) -> int:
        """How many sleeps wait for the clock to move."""
        return len(self._sleepers)

    @property
    def due(self) -> float | None:
        """When the first sleep still waiting for the clock ends; ``None`` if none waits."""
        pending = [due for due, waiter in self._sleepers if not waiter.done()]
        return min(pending) if pending else None

    def advance(self, seconds: float) -> None:
        self.time += seconds
        for due, waiter in self._sleepers:
            if due <= self.time and not waiter.done():
                waiter.set_result(None)
