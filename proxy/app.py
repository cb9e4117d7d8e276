"""``create_app(config)``: the whole proxy as one ``web.Application``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import handlers
from proxy.adapters import load_adapter_class
from proxy.config import BaseConfig
from proxy.metrics import Metrics
from proxy.middleware import observe, render_errors
from proxy.pipeline import Pipeline
from proxy.state import RUNTIME, Backend, Runtime

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
    app = web.Application(middlewares=[observe, render_errors], client_max_size=CLIENT_MAX_SIZE)
    metrics = Metrics(registry)
    runtime = Runtime(config=config, metrics=metrics, config_path=config_path)
    runtime.pipeline = Pipeline(metrics)
    app[RUNTIME] = runtime
    app[handlers.READY_CACHE] = handlers.ReadyCache()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        runtime.session = session
        adapter = adapter_class(config, session)
        try:
            await adapter.start()
            runtime.backend = Backend(config, adapter, model_label(config))
            metrics.watch_stats(lambda: runtime.backend.adapter.stats() if runtime.backend else {})
            yield
        finally:
            runtime.shutting_down = True
            backend, runtime.backend = runtime.backend, None
            await (backend.adapter if backend else adapter).close()
            await session.close()

    app.cleanup_ctx.append(lifecycle)
    router = app.router
    for path in handlers.ENDPOINTS:
        router.add_post(path, handlers.inference)
    router.add_get("/v1/models", handlers.models)
    router.add_route("*", "/v1/{tail:.*}", handlers.passthrough)
    router.add_get("/healthz", handlers.healthz)
    router.add_get("/readyz", handlers.readyz)
    router.add_get("/metrics", handlers.metrics)
    return app


def model_label(config: BaseConfig) -> str:
    return config.public_name or config.upstream_name or "any"
