"""Running the proxy as a process: bind, serve, and shut down gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from proxy import __version__
from proxy.app import create_app
from proxy.config import BaseConfig
from proxy.logs import AccessLogger
from proxy.state import RUNTIME

log = logging.getLogger("model_proxy")


def run(config: BaseConfig, *, config_path: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain for ``server.shutdown_grace`` seconds."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(config, config_path=config_path))
    else:
        uvloop.run(serve(config, config_path=config_path))


async def serve(config: BaseConfig, *, config_path: str | None = None) -> None:
    app = create_app(config, config_path=config_path)
    runtime = app[RUNTIME]
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=config.server.shutdown_grace,
        access_log_class=AccessLogger,
        max_field_size=config.limits.max_header_bytes,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
        await site.start()
        log.info(
            "model-backend-proxy %s serving %s on http://%s:%d",
            __version__,
            config.backend_provider,
            config.server.host,
            config.server.port,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info(
            "shutting down: draining in-flight requests for up to %gs", config.server.shutdown_grace
        )
        runtime.shutting_down = True
    finally:
        await runner.cleanup()
    log.info("stopped")
