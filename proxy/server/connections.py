"""Client connections: the cap on how many are open, and the open-file limit behind it.

aiohttp bounds each connection's wait for its next request head with its keep-alive timer
(``server.keepalive_timeout``), so idle and trickling clients are closed on their own; what
it does not bound is how many connections there are. Over ``server.max_connections`` the
oldest connection that is waiting for a request (idle keep-alive, or still sending its head)
is closed to make room; when every one is busy, the new connection is closed instead.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("model_proxy")

#: File descriptors kept back from the client cap: listening socket, logs, config reads.
RESERVED_FDS = 64


def raise_open_file_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        target = hard
    else:
        target = max(soft, hard)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. a hard limit above the kernel's nr_open
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_bound(open_files: int, upstream_connections: int) -> int:
    """The most client connections ``open_files`` descriptors can carry, leaving room for one
    upstream connection per request in flight and a few descriptors of the proxy's own."""
    return max(1, open_files - upstream_connections - RESERVED_FDS)


class ConnectionCap:
    """Holds the number of open client connections of ``server`` at ``limit()``."""

    def __init__(self, server: web.Server, limit: Callable[[], int]) -> None:
        self.server = server
        self.limit = limit
        self.open = 0
        self.shed = 0
        self._made = server.connection_made
        self._lost = server.connection_lost
        # The server's own hooks, which every RequestHandler calls, wrapped per instance.
        server.connection_made = self._connection_made  # type: ignore[method-assign]
        server.connection_lost = self._connection_lost  # type: ignore[method-assign]

    def _connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._made(handler, transport)
        self.open += 1
        if self.open > self.limit():
            self._make_room(handler)

    def _connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        self._lost(handler, exc)

    def _make_room(self, newcomer: RequestHandler) -> None:
        self.shed += 1
        for handler in self.server.connections:
            if handler is not newcomer and _waiting_for_request(handler):
                handler.force_close()
                return
        newcomer.force_close()


def _waiting_for_request(handler: RequestHandler) -> bool:
    # aiohttp's own keep-alive timer uses the same test: the handler's loop is parked on
    # ``_waiter`` until a whole request head has arrived (tests/hardening/test_deadlines.py
    # would notice if that changed).
    waiter: asyncio.Future[None] | None = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


__all__ = ["ConnectionCap", "connection_bound", "raise_open_file_limit"]
