"""What one running proxy holds: the served backends and the long-lived parts around them."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.config.sections import RequestLimits
from proxy.server.requestid import RequestIds
from proxy.upstream.exchange import Exchange

if TYPE_CHECKING:
    from proxy.auth.inbound import AuthState
    from proxy.config import BaseConfig
    from proxy.metrics import Metrics
    from proxy.server.catalog import Catalog
    from proxy.server.drain import Drain
    from proxy.server.health import Readiness
    from proxy.upstream.pipeline import Backend, Pipeline
    from proxy.upstream.routing import Served


#: Liveness, readiness and metrics: reachable without credentials.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


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
    catalog: Catalog
    session: aiohttp.ClientSession
    #: The served set, routed by model name; replaced whole on reload.
    served: Served
    #: The first backend of ``served`` (the only one of a single-model config).
    backend: Backend = field(init=False)
    #: ``config``'s limits, as each request reads them.
    limits: RequestLimits = field(init=False)
    config_path: str | None = None
    #: Paths that need no inbound credentials: liveness, readiness and metrics, for
    #: orchestrators and Prometheus; in node mode the node's own (``proxy.server.node``).
    public_paths: frozenset[str] = PROBE_PATHS
    #: Whether the access log wants each forwarded request's job (JSON lines; set by ``serve``).
    access_jobs: bool = False
    started_at: float = field(default_factory=time.time)
    ids: RequestIds = field(default_factory=RequestIds)

    def __post_init__(self) -> None:
        self.backend = self.served.backends[0]
        self.limits = RequestLimits.of(self.config.limits, self.config.server)

    @property
    def shutting_down(self) -> bool:
        """Set once the proxy stops taking new work (``/readyz`` says so from then on)."""
        return self.readiness.stopping

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self.readiness.stopping = value

    def current(self) -> Backend:
        return self.backend

    def configure(self, config: BaseConfig, served: Served) -> None:
        """Swap in ``config`` and the backends built from it; every long-lived part follows."""
        self.config = config
        self.limits = RequestLimits.of(config.limits, config.server)
        self.served = served
        self.backend = served.backends[0]
        self.pipeline.configure(config)
        self.auth.configure(config)
        self.readiness.configure(config)
        self.catalog.configure(config)


RUNTIME = web.AppKey("runtime", Runtime)
#: The request body once read (within the body limit), so auth and the handler share one read.
BODY = web.RequestKey("body", bytes)
#: A forwarded request's exchange, for its JSON access line (``proxy.server.logs``, which
#: takes it back): a context variable, as aiohttp writes the line in the request's own task,
#: and cheaper than the request's own mapping.
EXCHANGE: ContextVar[Exchange | None] = ContextVar("model_proxy_exchange", default=None)
