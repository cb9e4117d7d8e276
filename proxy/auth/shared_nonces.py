"""The replay cache shared by every replica: used nonces kept in Redis.

Each replica's memory cache (``proxy.auth.nonces``) only knows the jobs that replica saw, so a
signed job replayed to another replica behind the same Service would pass. With
``auth.fxn_signatures.nonce_store: redis://...`` a nonce is claimed in Redis instead, with one
atomic ``SET key 1 NX EXAT <timestamp + window>`` (after a ``PING`` in the same round trip):
the first claim anywhere wins, and the key expires when the timestamp check alone refuses the
message.

The store fails closed: when Redis cannot answer (down, too slow, out of memory) or answers
anything but the two replies a claim can have (``OK``: claimed; nil: already claimed), signed
requests are refused with 503 ``nonce_store_unavailable`` rather than let through unchecked.
A claim is bounded in time as a whole, and in memory: replies are read with redis-py's own
RESP2 parser, which refuses any array or bulk string longer than a claim's replies can be
before buffering it (hiredis would take what a hostile server announces).
Run Redis with ``maxmemory-policy noeviction``: an evicted nonce could be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from proxy.errors import Unavailable, reason

log = logging.getLogger("model_proxy")

#: Seconds one Redis command (and a connect) may take before the request is refused.
TIMEOUT = 1.0
#: Longest array or bulk string accepted in a reply; a claim's replies (and the connection
#: handshake's) are far shorter.
MAX_REPLY_ITEMS = 4096
KEY_PREFIX = "model-proxy:nonce:"

UNAVAILABLE_MESSAGE = (
    "the shared nonce store cannot be reached, so signed requests cannot be checked for "
    "replays; they are refused until it is back"
)


class RedisNonces:
    """Claims ``(address, nonce)`` pairs in one Redis shared by every replica.

    ``claim`` returns ``True`` for the first claim of a pair within its window and ``False``
    for any later one (a replay), or raises ``Unavailable`` (503, ``nonce_store_unavailable``)
    when Redis does not answer in time or answers anything else. The URL (which may hold a
    password) is never logged.
    """

    __slots__ = ("_client", "_deadline", "down")

    def __init__(self, url: str, *, timeout: float = TIMEOUT) -> None:
        # redis-py is an optional dependency (the "redis" extra), imported only when used
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # one quick retry covers a pooled connection that a restarted Redis dropped
            retry=Retry(NoBackoff(), 1),
            protocol=2,
            parser_class=_bounded_parser(),
        )
        #: A whole claim: a connect and a command, each retried once.
        self._deadline = 4 * timeout
        self.down = False

    async def claim(self, address: str, nonce: str, timestamp: int, window: float) -> bool:
        key = f"{KEY_PREFIX}{address}:{nonce}"
        # window 0 (no timestamp check): a nonce is never forgotten
        expires = None if math.isinf(window) else timestamp + math.ceil(window) + 1
        try:
            async with asyncio.timeout(self._deadline):
                # PING in the same round trip: a server that answers nil to everything would
                # otherwise pass for a Redis that has seen every nonce
                pipe = self._client.pipeline(transaction=False)
                pipe.ping()
                pipe.set(key, b"1", nx=True, exat=expires)
                pong, reply = await pipe.execute()
            if pong is not True or (reply is not True and reply is not None):
                raise _NotUnderstood(f"{type(pong).__name__}, {type(reply).__name__}")
        except Exception as exc:  # whatever the store did, the claim is refused: fail closed
            self._went_down(exc)
            raise Unavailable(UNAVAILABLE_MESSAGE, code="nonce_store_unavailable") from exc
        if self.down:
            self.down = False
            log.warning("the shared nonce store answers again")
        return reply is True

    def _went_down(self, exc: Exception) -> None:
        if not self.down:
            self.down = True
            # its kind alone: a message could quote the store's reply or its address
            log.error("the shared nonce store is unavailable (%s); refusing signed "
                      "requests until it answers", reason(exc))

    async def close(self) -> None:
        """Close the shared store's connections (after the last request)."""
        with contextlib.suppress(Exception):  # best effort, at shutdown or after a reload
            await asyncio.wait_for(self._client.aclose(), TIMEOUT)


class _NotUnderstood(Exception):
    """A reply that is neither of a claim's two answers."""


def _bounded_parser() -> type[Any]:
    """redis-py's pure-Python RESP2 parser, refusing an array or bulk string announced longer
    than :data:`MAX_REPLY_ITEMS` before anything of it is read."""
    from redis._parsers import _AsyncRESP2Parser
    from redis.exceptions import InvalidResponse

    class BoundedParser(_AsyncRESP2Parser):
        async def _readline(self) -> bytes:
            line: bytes = await super()._readline()
            if line[:1] in (b"*", b"$") and line[1:] != b"-1":
                if not (line[1:].isdigit() and int(line[1:]) <= MAX_REPLY_ITEMS):
                    raise InvalidResponse("a reply longer than a claim's")
            return line

    return BoundedParser
