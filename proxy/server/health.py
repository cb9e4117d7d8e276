"""Readiness: whether the proxy can serve now (``/readyz``), and the one-off probe of
``model-proxy check --probe``."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import aiohttp

from proxy.adapters import load_adapter_class
from proxy.config import BaseConfig
from proxy.errors import ProxyError

if TYPE_CHECKING:
    from proxy.server.runtime import Runtime
    from proxy.upstream.pipeline import Backend

#: How long an upstream readiness answer is reused, so probes cannot hammer the upstream.
READY_CACHE_SECONDS = 1.0


class Readiness:
    """``/readyz``'s answer: shutting down, the circuit, then the upstream's own check, whose
    result is cached for :data:`READY_CACHE_SECONDS` per backend."""

    __slots__ = ("at", "backend", "cached", "grace")

    def __init__(self, config: BaseConfig) -> None:
        self.backend: Backend | None = None
        self.at = 0.0
        self.cached: str | None = None
        self.grace = 5.0
        self.configure(config)

    def configure(self, config: BaseConfig) -> None:
        # the upstream check may take a connect timeout and a little more, never forever
        self.grace = config.timeouts.connect + 5

    async def reason(self, runtime: Runtime) -> str | None:
        """``None`` when the proxy can serve, else why not."""
        if runtime.shutting_down:
            return "shutting down"
        backend = runtime.backend
        circuit = backend.breaker.reason()
        if circuit is not None:
            return circuit
        now = time.monotonic()
        if self.backend is backend and now - self.at < READY_CACHE_SECONDS:
            return self.cached
        reason = None
        try:
            async with asyncio.timeout(self.grace):
                await backend.adapter.check_ready()
        except ProxyError as exc:
            reason = exc.message
        except TimeoutError:
            reason = "upstream readiness check timed out"
        self.backend, self.at, self.cached = backend, now, reason
        runtime.metrics.set_upstream_up(reason is None)
        return reason


async def probe(config: BaseConfig) -> str | None:
    """``None`` when the upstream of ``config`` is ready, else the reason it is not."""
    adapter_class = load_adapter_class(config)
    async with aiohttp.ClientSession() as session:
        adapter = adapter_class(config, session)
        try:
            await adapter.start()
            await adapter.until_started()  # an in-process engine: the probe is loading it
            async with asyncio.timeout(config.timeouts.connect + 5):
                await adapter.check_ready()
        except ProxyError as exc:
            return exc.message
        except TimeoutError:
            return "the readiness check timed out"
        finally:
            await adapter.close()
    return None
