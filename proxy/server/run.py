"""Running the proxy as a process: bind, serve, and shut down gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from aiohttp import web

from proxy import __version__
from proxy.auth.inbound import check_exposure
from proxy.config import BaseConfig
from proxy.server.app import create_app
from proxy.server.connections import ConnectionCap, connection_bound, raise_open_file_limit
from proxy.server.debug import trace_memory
from proxy.server.drain import FINAL_WRITE_SECONDS
from proxy.server.logs import AccessLines, AccessLogger
from proxy.server.reload import RELOADER
from proxy.server.runtime import RUNTIME

log = logging.getLogger("model_proxy")
#: The cyclic collector's generation thresholds while serving. The default first threshold
#: (700 net allocations) runs a young collection every few requests; each request allocates
#: hundreds of short-lived objects, nearly all freed by reference counting anyway. Measured
#: with bench.overhead; memory stays flat (tests/test_soak.py).
GC_THRESHOLDS = (20000, 20, 20)
#: aiohttp's parser accepts header lines up to this many times limits.max_header_bytes.
PARSER_HEADROOM = 4
#: Seconds aiohttp keeps reading (and discarding) a request body the proxy did not read, so
#: that the client sees the answer before the connection closes.
LINGER_SECONDS = 1.0


def run(config: BaseConfig, *, config_path: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain for ``server.shutdown_grace`` seconds.

    SIGHUP reloads the configuration file (``proxy.server.reload``).
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(config, config_path=config_path))
    else:
        uvloop.run(serve(config, config_path=config_path))


def parser_limit(config: BaseConfig) -> int:
    return max(PARSER_HEADROOM * config.limits.max_header_bytes, 64 * 1024)


def _runner(app: web.Application, config: BaseConfig, access_lines: AccessLines) -> web.AppRunner:
    """aiohttp's runner for ``app``, with the proxy's server settings."""
    return web.AppRunner(
        app,
        handler_cancellation=True,
        # The grace itself is spent in the app's on_shutdown drain (proxy.server.drain), which
        # then ends the remaining streams; this is only the time left for those final writes.
        shutdown_timeout=FINAL_WRITE_SECONDS,
        access_log_class=AccessLogger,
        access_log=access_lines,  # our batched writer stands in for a logging.Logger
        # The parser's own per-line limits sit well above limits.max_header_bytes, so that an
        # oversized header reaches the proxy's check and gets its JSON 431; only abuse far
        # beyond the limit meets the parser's plain-text 400.
        max_field_size=parser_limit(config),
        max_line_size=parser_limit(config),
        # One timer bounds the wait for each request head: idle keep-alive, and slow headers.
        keepalive_timeout=config.server.keepalive_timeout,
        lingering_time=LINGER_SECONDS,
    )


async def serve(config: BaseConfig, *, config_path: str | None = None) -> None:
    warning = check_exposure(config)
    if warning:
        log.warning(warning)
    open_files = raise_open_file_limit()
    app = create_app(config, config_path=config_path)
    runtime = app[RUNTIME]
    access_lines = AccessLines(config.logging)
    runtime.access_jobs = access_lines.enabled and access_lines.json
    runner = _runner(app, config, access_lines)
    await runner.setup()
    assert runner.server is not None
    bound = connection_bound(open_files, config.limits.max_concurrency)
    if config.server.max_connections > bound:
        log.warning("server.max_connections %d is more than the open-file limit (%d) allows; "
                    "capping client connections at %d", config.server.max_connections,
                    open_files, bound)
    ConnectionCap(runner.server, lambda: min(runtime.config.server.max_connections, bound))
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
        await site.start()
        # Everything built so far (config, adapters, imported modules) lives as long as the
        # process: keep it out of the cyclic collector, so collections stay cheap per request.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        log.info(
            "model-backend-proxy %s serving %s on http://%s:%d",
            __version__, config.backend_provider, config.server.host, config.server.port,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, app[RELOADER].trigger)
        trace_memory(loop)  # opt-in (MODEL_PROXY_TRACEMALLOC), for soak runs
        await stop.wait()
        access_lines.flush()  # the lines so far come before the shutdown's own
        log.info("shutting down: draining in-flight requests for up to %gs",
                 runtime.config.server.shutdown_grace)
        runtime.shutting_down = True
    finally:
        await runner.cleanup()
        access_lines.flush()
    log.info("stopped")
