"""``create_app(config)``: the whole proxy as one ``web.Application``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.adapters.base import Adapter
from proxy.auth.inbound import AuthState
from proxy.config import BaseConfig
from proxy.metrics import Metrics, NodeMetrics
from proxy.server import routes
from proxy.server.catalog import Catalog, cataloguing
from proxy.server.drain import Drain
from proxy.server.edge import UNCOUNTED, layered
from proxy.server.health import Readiness, probing
from proxy.server.reload import RELOADER, Reloader, reloading
from proxy.server.runtime import RUNTIME, Runtime
from proxy.server.scrape import SCRAPER, Scraper, watch
from proxy.server.tasks import running
from proxy.upstream.clock import SYSTEM, Clock
from proxy.upstream.limiter import Limiter
from proxy.upstream.pipeline import Pipeline
from proxy.upstream.routing import Served

if TYPE_CHECKING:
    from proxy.server.node import Node  # numpy and eth-abi: imported in node mode only

log = logging.getLogger("model_proxy")

#: aiohttp's own cap; the configured limit (which can change on reload) is enforced per request.
CLIENT_MAX_SIZE = 1 << 30


def create_app(
    config: BaseConfig,
    *,
    registry: CollectorRegistry | None = None,
    config_path: str | None = None,
    clock: Clock = SYSTEM,
) -> web.Application:
    """Build the proxy for ``config``; the adapter starts and stops with the application.

    Call it with an event loop running (the upstream connection pool belongs to it). Raises
    ``ConfigError`` if the configured adapter cannot be imported. ``clock`` times the
    breakers, the limiter's queue, retries, cool-downs, the reading of the upstreams' load and
    the watching of the config and secret files (tests pass one they move).
    """
    metrics = Metrics(registry)
    limiter = Limiter(config.limits, clock)
    pipeline = Pipeline(metrics, limiter, clock)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    try:
        runtime, node = _build_runtime(config, metrics, pipeline, session, config_path)
    except BaseException:
        # A config that fails here (an adapter that cannot be imported, ...) must not leave
        # an unclosed session behind; unused, it closes without a turn of the loop.
        session.detach()
        raise
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[RUNTIME] = runtime
    app[RELOADER] = reloader = Reloader(runtime, clock=clock)
    app[SCRAPER] = scraper = Scraper(lambda: runtime.served, session, clock)
    reloader.swapped.append(scraper.wake)  # the scraper follows the served set
    _watch_gauges(runtime, limiter)
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(_probing)
    app.cleanup_ctx.append(_scraping)
    app.cleanup_ctx.append(reloading)
    app.cleanup_ctx.append(lambda app: cataloguing(runtime.catalog, runtime))
    app.on_shutdown.append(_drain_requests)
    _add_routes(app, runtime)
    if node is not None:
        from proxy.server import node as node_mode

        runtime.public_paths = runtime.public_paths | node_mode.NODE_PATHS
        node_mode.install(app, node, lambda handler, label: layered(runtime, handler, label))
    app.router.add_route("*", "/{tail:.*}", layered(runtime, routes.not_found, None))
    return app


def _build_runtime(
    config: BaseConfig,
    metrics: Metrics,
    pipeline: Pipeline,
    session: aiohttp.ClientSession,
    config_path: str | None,
) -> tuple[Runtime, Node | None]:
    """The runtime for ``config``, and node mode's parts when it has a ``node:`` section."""
    node = None
    if config.node is not None:
        from proxy.server import node as node_mode  # numpy and eth-abi: node mode only

        node = node_mode.build(config, NodeMetrics(metrics.registry))
    runtime = Runtime(
        config=config,
        metrics=metrics,
        pipeline=pipeline,
        drain=Drain(),
        auth=AuthState(
            config,
            refused=metrics.count_auth_failure,
            allowed=node.registry.inference if node is not None else None,
        ),
        readiness=Readiness(config, metrics),
        catalog=Catalog(),
        session=session,
        served=Served([pipeline.build(entry, session) for entry in config.entries]),
        config_path=config_path,
    )
    return runtime, node


def _watch_gauges(runtime: Runtime, limiter: Limiter) -> None:
    """The gauges read at scrape time from the live objects (the request path pays nothing)."""
    metrics = runtime.metrics
    watch(metrics, lambda: runtime.served)
    metrics.watch_gauges(
        in_flight=lambda: limiter.active,
        queued=lambda: limiter.waiting,
        circuit_state=lambda: runtime.served.circuit_state(),
    )
    metrics.watch_stats(lambda: runtime.backend.adapter.stats(),
                        lambda: runtime.backend.adapter.metric_families())


def _add_routes(app: web.Application, runtime: Runtime) -> None:
    """The proxy's own routes, each with the edge layer around it."""
    router = app.router
    for path, endpoint in routes.ENDPOINTS.items():
        router.add_post(path, layered(runtime, routes.inference, endpoint))
    router.add_get("/v1/models", layered(runtime, routes.models, "models"), allow_head=False)
    router.add_get("/v1/models/{id:.+}", layered(runtime, routes.model, "models"),
                   allow_head=False)
    router.add_route("*", "/v1/{tail:.*}", layered(runtime, routes.passthrough, None))
    # probes answer HEAD as GET, without the body: load balancers and uptime checks send it
    for path, handler in (("/healthz", routes.healthz), ("/readyz", routes.readyz)):
        router.add_get(path, layered(runtime, handler, UNCOUNTED))
    router.add_get("/metrics", layered(runtime, routes.metrics, UNCOUNTED), allow_head=False)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The adapter and the upstream connection pool, from start-up to the last request."""
    runtime = app[RUNTIME]
    try:
        for adapter in _adapters(runtime):
            await adapter.start()
        yield
    finally:
        runtime.shutting_down = True
        for adapter in _adapters(runtime):  # the set serving now; the reloader closes retirees
            await adapter.close()
        await runtime.session.close()
        await runtime.auth.close()


def _adapters(runtime: Runtime) -> list[Adapter]:
    return [adapter for backend in runtime.served.backends for adapter in backend.adapters()]


async def _probing(app: web.Application) -> AsyncIterator[None]:
    """The background readiness probe (``model_proxy_upstream_up``), while the app runs."""
    runtime = app[RUNTIME]
    async with running(probing(runtime.readiness, lambda: runtime.served), "readiness-probe"):
        yield


async def _scraping(app: web.Application) -> AsyncIterator[None]:
    """The background reader of each URL's load and models (``proxy.server.scrape``)."""
    async with running(app[SCRAPER].run(), "upstream-scrape"):
        yield


async def _drain_requests(app: web.Application) -> None:
    # Runs after the listening sockets are closed and before aiohttp waits for handlers.
    runtime = app[RUNTIME]
    runtime.shutting_down = True
    limiter = runtime.pipeline.limiter
    ended = await runtime.drain.shutdown(
        runtime.config.server.shutdown_grace, lambda: limiter.active + limiter.waiting > 0
    )
    if ended:
        log.warning("shutdown: ended %d unfinished streams with an error event", ended)


__all__ = ["CLIENT_MAX_SIZE", "create_app"]
