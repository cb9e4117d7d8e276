"""What one running proxy holds: the current backend and the long-lived parts around it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from proxy.auth.inbound import AuthState
    from proxy.config import BaseConfig
    from proxy.metrics import Metrics
    from proxy.server.drain import Drain
    from proxy.server.health import Readiness
    from proxy.upstream.pipeline import Backend, Pipeline


@dataclass(slots=True, eq=False)
class Runtime:
    """The proxy's state, built whole by ``create_app`` and hung on the app under ``RUNTIME``.

    ``backend`` is replaced whole on reload (:meth:`configure` is the one reload hook of the
    long-lived parts); everything else lives as long as the application.
    """

    config: BaseConfig
    metrics: Metrics
    pipeline: Pipeline
    drain: Drain
    auth: AuthState
    readiness: Readiness
    session: aiohttp.ClientSession
    backend: Backend
    config_path: str | None = None
    shutting_down: bool = False
    #: Handed from a forwarded request's handler to the edge as it returns: the seconds that
    #: request spent waiting on the upstream (``-1``: none), so that the rest of its time is
    #: the proxy's own (``model_proxy_overhead_seconds``). Set and read with no ``await``
    #: between them, so no other request can come in between.
    upstream_seconds: float = -1.0
    started_at: float = field(default_factory=time.time)

    def current(self) -> Backend:
        return self.backend

    def configure(self, config: BaseConfig, backend: Backend) -> None:
        """Swap in ``config`` and the backend built from it; every long-lived part follows."""
        self.config = config
        self.backend = backend
        self.pipeline.configure(config)
        self.auth.configure(config)
        self.readiness.configure(config)


RUNTIME = web.AppKey("runtime", Runtime)
#: The request body once read (within the body limit), so auth and the handler share one read.
BODY = web.RequestKey("body", bytes)
