"""What the application holds: the current backend and the shared resources around it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import aiohttp

    from proxy.adapters.base import Adapter
    from proxy.auth.inbound import AuthState
    from proxy.config import BaseConfig
    from proxy.metrics import Metrics
    from proxy.server.drain import Drain
    from proxy.upstream.breaker import Breaker
    from proxy.upstream.pipeline import Pipeline
    from proxy.upstream.retry import RetryPolicy


@dataclass(slots=True)
class Backend:
    """One configuration and the adapter built from it; replaced whole on reload.

    A request keeps the backend it started on to the end, so after a reload the old one
    serves its in-flight requests (counted in ``active``) and is closed when that reaches 0.
    """

    config: BaseConfig
    adapter: Adapter
    #: Metric label for the model: a configured name, never a client's input.
    model_label: str
    breaker: Breaker
    retry: RetryPolicy
    #: Requests between ``Pipeline.enter`` and ``Pipeline.leave`` on this backend.
    active: int = 0


@dataclass(slots=True)
class Runtime:
    """Mutable state of one running proxy, hung on the application under ``RUNTIME``."""

    config: BaseConfig
    metrics: Metrics
    config_path: str | None = None
    backend: Backend | None = None
    pipeline: Pipeline | None = None
    drain: Drain | None = None
    auth: AuthState | None = None
    session: aiohttp.ClientSession | None = None
    shutting_down: bool = False
    started_at: float = field(default_factory=time.time)

    def current(self) -> Backend:
        backend = self.backend
        if backend is None:
            raise RuntimeError("the backend is not started")
        return backend


RUNTIME = web.AppKey("runtime", Runtime)
#: The request body once read (within the body limit), so auth and the handler share one read.
BODY = web.RequestKey("body", bytes)
