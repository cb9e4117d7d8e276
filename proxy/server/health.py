"""Readiness: whether the proxy can serve now (``/readyz``), and the one-off probe of
``model-proxy check --probe``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from proxy.adapters import load_adapter_class
from proxy.config import BaseConfig
from proxy.errors import ProxyError
from proxy.upstream.breaker import State

if TYPE_CHECKING:
    from proxy.metrics import Metrics
    from proxy.upstream.pipeline import Backend
    from proxy.upstream.routing import Served

log = logging.getLogger("model_proxy")
#: How long an upstream readiness answer is reused, so probes cannot hammer the upstream.
READY_CACHE_SECONDS = 1.0
#: How often the proxy checks its upstream on its own (``model_proxy_upstream_up`` stays
#: current with no traffic and no one polling ``/readyz``).
PROBE_SECONDS = 10.0


class Readiness:
    """``/readyz``'s answer: shutting down, the circuit, then the upstream's own check, whose
    result is cached for :data:`READY_CACHE_SECONDS` per backend."""

    __slots__ = ("cache", "grace", "metrics", "probe_every", "stopping")

    def __init__(self, config: BaseConfig, metrics: Metrics) -> None:
        self.metrics = metrics
        #: Set when the proxy shuts down: from then on it is not ready.
        self.stopping = False
        #: id(backend) -> (backend, when, reason): the last answer of each backend's check
        self.cache: dict[int, tuple[Backend, float, str | None]] = {}
        self.grace = 5.0
        self.probe_every = PROBE_SECONDS
        self.configure(config)

    def configure(self, config: BaseConfig) -> None:
        # the upstream check may take a connect timeout and a little more, never forever
        self.grace = config.timeouts.connect + 5
        self.cache = {}

    async def reason(self, served: Served) -> str | None:
        """``None`` when the proxy can serve every model, else why not."""
        if self.stopping:
            return "shutting down"
        if served.only is not None:
            return await self.backend_reason(served.only)
        reasons = await asyncio.gather(*(self.backend_reason(b) for b in served.backends))
        problems = [f"model {name}: {reason}" for name, reason in zip(served.names, reasons,
                                                                       strict=True) if reason]
        return "; ".join(problems) or None

    async def backend_reason(self, backend: Backend) -> str | None:
        """``None`` when ``backend`` can serve, else why not (checked at most once a second)."""
        circuit = backend.breaker.reason()
        if circuit is not None:
            return circuit
        if backend.upstreams and all(u.breaker.state is State.OPEN for u in backend.upstreams):
            return backend.upstreams[0].breaker.reason()
        now = time.monotonic()
        cached = self.cache.get(id(backend))
        if cached is not None and cached[0] is backend and now - cached[1] < READY_CACHE_SECONDS:
            return cached[2]
        reason = None
        # several upstreams: ready while one of them is (the first reason is kept otherwise)
        for adapter in backend.adapters():
            try:
                async with asyncio.timeout(self.grace):
                    await adapter.check_ready()
            except ProxyError as exc:
                reason = reason or exc.message
                continue
            except TimeoutError:
                reason = reason or "upstream readiness check timed out"
                continue
            reason = None
            break
        self.cache[id(backend)] = (backend, now, reason)
        self.metrics.set_upstream_up(reason is None)
        return reason


async def probing(readiness: Readiness, served: Callable[[], Served]) -> None:
    """Check the upstreams (``served()``: the set in force) every ``readiness.probe_every``
    seconds (the first time after one interval: traffic tells sooner), for as long as it runs
    (the app's lifecycle starts and cancels it)."""
    while True:
        await asyncio.sleep(readiness.probe_every)
        if readiness.stopping:
            return
        try:
            await readiness.reason(served())
        except Exception:  # a bug must not end the probing for good
            log.exception("the readiness probe failed")


async def probe(config: BaseConfig) -> str | None:
    """``None`` when every upstream of ``config`` is ready, else the first reason one is not."""
    for entry in config.entries:
        for one in [entry.for_url(url) for url in entry.urls] if len(entry.urls) > 1 else [entry]:
            problem = await _probe_one(one)
            if problem is not None:
                name = f"model {entry.public_name}: " if entry is not config else ""
                return name + problem
    return None


async def _probe_one(config: BaseConfig) -> str | None:
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
