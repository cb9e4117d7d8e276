"""What the application holds: the current backend and the shared resources around it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import aiohttp

    from proxy.adapters.base import Adapter
    from proxy.config import BaseConfig
    from proxy.metrics import Metrics
    from proxy.pipeline import Pipeline


@dataclass(slots=True)
class Backend:
    """One configuration and the adapter built from it; replaced whole on reload."""

    config: BaseConfig
    adapter: Adapter
    #: Metric label for the model: a configured name, never a client's input.
    model_label: str


@dataclass(slots=True)
class Runtime:
    """Mutable state of one running proxy, hung on the application under ``RUNTIME``."""

    config: BaseConfig
    metrics: Metrics
    config_path: str | None = None
    backend: Backend | None = None
    pipeline: Pipeline | None = None
    session: aiohttp.ClientSession | None = None
    shutting_down: bool = False
    started_at: float = field(default_factory=time.time)

    def current(self) -> Backend:
        backend = self.backend
        if backend is None:
            raise RuntimeError("the backend is not started")
        return backend


RUNTIME = web.AppKey("runtime", Runtime)
#: Per-request labels for metrics, set by handlers: the endpoint and the configured model name.
ENDPOINT = web.RequestKey("endpoint", str)
MODEL = web.RequestKey("model", str)
