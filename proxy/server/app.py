"""``create_app(config)``: the whole proxy as one ``web.Application``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.adapters import load_adapter_class
from proxy.auth.inbound import AuthState
from proxy.config import BaseConfig
from proxy.metrics import Metrics
from proxy.server import routes
from proxy.server.drain import Drain
from proxy.server.edge import UNCOUNTED, layered
from proxy.server.reload import RELOADER, Reloader, reloading
from proxy.server.runtime import RUNTIME, Runtime
from proxy.upstream.limiter import Limiter
from proxy.upstream.pipeline import Pipeline

log = logging.getLogger("model_proxy")

#: aiohttp's own cap; the configured limit (which can change on reload) is enforced per request.
CLIENT_MAX_SIZE = 1 << 30


def create_app(
    config: BaseConfig,
    *,
    registry: CollectorRegistry | None = None,
    config_path: str | None = None,
) -> web.Application:
    """Build the proxy for ``config``; adapters start and stop with the application.

    Raises ``ConfigError`` if the configured adapter cannot be imported.
    """
    adapter_class = load_adapter_class(config)
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    metrics = Metrics(registry)
    runtime = Runtime(config=config, metrics=metrics, config_path=config_path)
    limiter = Limiter(config.limits)
    pipeline = runtime.pipeline = Pipeline(metrics, limiter)
    drain = runtime.drain = Drain()
    app[RUNTIME] = runtime
    app[RELOADER] = Reloader(runtime)
    app[routes.READY_CACHE] = routes.ReadyCache()
    runtime.auth = AuthState()
    metrics.watch_gauges(
        in_flight=lambda: limiter.active,
        queued=lambda: limiter.waiting,
        circuit_state=lambda: runtime.backend.breaker.state if runtime.backend else 0,
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        runtime.session = session
        adapter = adapter_class(config, session)
        try:
            await adapter.start()
            runtime.backend = pipeline.backend(config, adapter)
            metrics.watch_stats(lambda: runtime.backend.adapter.stats() if runtime.backend else {})
            yield
        finally:
            runtime.shutting_down = True
            backend, runtime.backend = runtime.backend, None
            await (backend.adapter if backend else adapter).close()
            await session.close()

    async def drain_requests(app: web.Application) -> None:
        # Runs after the listening sockets are closed and before aiohttp waits for routes.
        runtime.shutting_down = True
        ended = await drain.shutdown(
            runtime.config.server.shutdown_grace, lambda: limiter.active + limiter.waiting > 0
        )
        if ended:
            log.warning("shutdown: ended %d unfinished streams with an error event", ended)

    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(reloading)
    app.on_shutdown.append(drain_requests)
    router = app.router
    for path, endpoint in routes.ENDPOINTS.items():
        router.add_post(path, layered(runtime, routes.inference, endpoint))
    router.add_get("/v1/models", layered(runtime, routes.models, "models"), allow_head=False)
    router.add_route("*", "/v1/{tail:.*}", layered(runtime, routes.passthrough, None))
    for path, handler in (("/healthz", routes.healthz), ("/readyz", routes.readyz),
                          ("/metrics", routes.metrics)):
        router.add_get(path, layered(runtime, handler, UNCOUNTED), allow_head=False)
    router.add_route("*", "/{tail:.*}", layered(runtime, routes.not_found, None))
    return app


__all__ = ["CLIENT_MAX_SIZE", "create_app"]
