"""Time as the reliability layers read it, as one object they are given.

The circuit breaker, the limiter's queue, the retry waits, the pipeline's timings and the
upstreams' cool-downs read ``clock.now()`` and wait with ``await clock.sleep(seconds)``; the
application passes :data:`SYSTEM` unless told otherwise, and tests pass a clock they move by
hand, so that no test waits out a cool-down or asserts how long something took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Clock:
    """``now()``: seconds on a monotonic scale; ``sleep(seconds)``: wait that long."""

    __slots__ = ("now", "sleep")

    def __init__(self, now: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.now = now
        self.sleep = sleep


#: The real clock.
SYSTEM = Clock()
