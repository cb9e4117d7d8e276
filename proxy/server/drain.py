"""Graceful shutdown: let in-flight work finish, then end the streams that are left cleanly.

The relay registers the task of every stream it is relaying. On shutdown (aiohttp's
``on_shutdown``, which runs after the listening sockets are closed) the proxy waits up to
``server.shutdown_grace`` for in-flight upstream requests to end, then cancels the streams
still running with ``ending`` set; the relay sees that flag and, instead of cutting the
connection, sends a final SSE error event and ends the stream properly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.errors import Unavailable

#: How often shutdown looks whether the work has drained.
POLL_SECONDS = 0.05
#: Time the ended streams get to write their final event.
FINAL_WRITE_SECONDS = 2.0

SHUTTING_DOWN = Unavailable(
    "the proxy is shutting down and could not finish this answer in time",
    code="shutting_down",
)


class Drain:
    """The streams being relayed now; the relay adds and removes its own task."""

    __slots__ = ("ending", "streams")

    def __init__(self) -> None:
        self.streams: set[asyncio.Task[Any]] = set()
        #: Set just before the remaining streams are cancelled, so the relay can tell this
        #: cancellation from a client that went away.
        self.ending = False

    async def shutdown(self, grace: float, busy: Callable[[], bool]) -> int:
        """Wait up to ``grace`` s while ``busy()``, then end the remaining streams.

        Returns how many streams had to be ended.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Polling, once, at shutdown: an event would cost every request a check.
        while busy() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL_SECONDS)
        if not self.streams:
            return 0
        self.ending = True
        ended = list(self.streams)
        for task in ended:
            task.cancel()
        deadline = loop.time() + FINAL_WRITE_SECONDS
        while self.streams and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL_SECONDS)
        return len(ended)
