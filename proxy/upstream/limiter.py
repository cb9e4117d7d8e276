"""Backpressure: at most ``max_concurrency`` upstream requests at once, a bounded FIFO queue.

A request that finds every slot taken waits in the queue (``max_queue`` long, at most
``queue_timeout`` seconds); a request that finds the queue full is refused at once with
``Overloaded`` (429 with ``Retry-After``). A released slot is handed straight to the oldest
waiter, so a newcomer cannot overtake the queue. Sizes can change on reload.
"""

from __future__ import annotations

import asyncio
from collections import deque

from proxy.config import LimitsSection
from proxy.errors import Overloaded
from proxy.upstream.clock import SYSTEM, Clock

#: ``Retry-After`` for a full queue: slots turn over in seconds, so ask for a short wait.
RETRY_AFTER_SECONDS = 1.0


class _Expired(Exception):
    """The wait in the queue ran out."""


class Limiter:
    """Counts upstream slots; ``acquire`` and ``release`` must pair exactly.

    ``active`` and ``waiting`` are read by the metrics gauges at scrape time, so the request
    path pays no gauge updates.
    """

    __slots__ = ("active", "clock", "max_active", "max_waiting", "queue_timeout", "waiters")

    def __init__(self, limits: LimitsSection, clock: Clock = SYSTEM) -> None:
        #: Its ``sleep`` times the wait in the queue.
        self.clock = clock
        self.active = 0
        #: The queue, first come first served (its length is ``waiting``).
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.max_active = limits.max_concurrency
        self.max_waiting = limits.max_queue
        self.queue_timeout = limits.queue_timeout

    @property
    def waiting(self) -> int:
        return len(self.waiters)

    def configure(self, limits: LimitsSection) -> None:
        """Apply new sizes; waiters that now fit get their slot at once."""
        self.max_active = limits.max_concurrency
        self.max_waiting = limits.max_queue
        self.queue_timeout = limits.queue_timeout
        while self.waiters and self.active < self.max_active:
            if self._hand_over():
                self.active += 1

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be; raise ``Overloaded`` when full.

        Cancellation while waiting leaves no trace: the waiter is removed, and a slot that was
        handed over in the same instant is passed on.
        """
        if self.active < self.max_active and not self.waiters:
            self.active += 1
            return
        if len(self.waiters) >= self.max_waiting:
            raise Overloaded(
                f"the upstream is at its limit of {self.max_active} concurrent requests and "
                f"{self.max_waiting} waiting; try again shortly",
                retry_after=RETRY_AFTER_SECONDS,
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self.waiters.append(waiter)
        # only a request that queues pays for a timer task
        timer = asyncio.ensure_future(self.clock.sleep(self.queue_timeout))

        def expire(_: object) -> None:
            if not waiter.done():
                waiter.set_exception(_Expired())

        timer.add_done_callback(expire)
        try:
            await waiter
        except _Expired:
            raise Overloaded(
                f"waited {self.queue_timeout:g} s for an upstream slot; try again shortly",
                retry_after=RETRY_AFTER_SECONDS,
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over, but nobody will use it
            raise
        finally:
            timer.cancel()
            if not waiter.done():
                waiter.cancel()
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass  # already taken off by ``release``

    def release(self) -> None:
        """Give a slot back: to the oldest waiter if there is one, else to the pool."""
        if self.active <= self.max_active:
            while self.waiters:
                if self._hand_over():
                    return  # the slot moves on; ``active`` is unchanged
        self.active -= 1

    def _hand_over(self) -> bool:
        waiter = self.waiters.popleft()
        if waiter.done():
            return False  # timed out or cancelled in the meantime
        waiter.set_result(None)
        return True
