"""The replay cache shared by every replica: used nonces kept in Redis.

Each replica's memory cache (``proxy.auth.nonces``) only knows the jobs that replica saw, so a
signed job replayed to another replica behind the same Service would pass. With
``auth.fxn_signatures.nonce_store: redis://...`` a nonce is claimed in Redis instead, with one
atomic ``SET key 1 NX EXAT <timestamp + window>``: the first claim anywhere wins, and the key
expires when the timestamp check alone refuses the message.

The store fails closed: when Redis cannot answer (down, too slow, out of memory), signed
requests are refused with 503 ``nonce_store_unavailable`` rather than let through unchecked.
Run Redis with ``maxmemory-policy noeviction``: an evicted nonce could be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from proxy.errors import Unavailable

log = logging.getLogger("model_proxy")

#: Seconds one Redis command (and a connect) may take before the request is refused.
TIMEOUT = 1.0
KEY_PREFIX = "model-proxy:nonce:"

UNAVAILABLE_MESSAGE = (
    "the shared nonce store cannot be reached, so signed requests cannot be checked for "
    "replays; they are refused until it is back"
)


class RedisNonces:
    """Claims ``(address, nonce)`` pairs in one Redis shared by every replica.

    ``claim`` returns ``True`` for the first claim of a pair within its window and ``False``
    for any later one (a replay), or raises ``Unavailable`` (503, ``nonce_store_unavailable``)
    when Redis does not answer. The URL (which may hold a password) is never logged.
    """

    __slots__ = ("_client", "_errors", "down")

    def __init__(self, url: str, *, timeout: float = TIMEOUT) -> None:
        # redis-py is an optional dependency (the "redis" extra), imported only when used
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # one quick retry covers a pooled connection that a restarted Redis dropped
            retry=Retry(NoBackoff(), 1),
        )
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self.down = False

    async def claim(self, address: str, nonce: str, timestamp: int, window: float) -> bool:
        key = f"{KEY_PREFIX}{address}:{nonce}"
        # window 0 (no timestamp check): a nonce is never forgotten
        expires = None if math.isinf(window) else timestamp + math.ceil(window) + 1
        try:
            fresh = await self._client.set(key, b"1", nx=True, exat=expires)
        except self._errors as exc:
            if not self.down:
                self.down = True
                log.error("the shared nonce store is unavailable (%s); refusing signed "
                          "requests until it answers", type(exc).__name__)
            raise Unavailable(UNAVAILABLE_MESSAGE, code="nonce_store_unavailable") from exc
        if self.down:
            self.down = False
            log.warning("the shared nonce store answers again")
        return bool(fresh)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort, at shutdown or after a reload
            await asyncio.wait_for(self._client.aclose(), TIMEOUT)
