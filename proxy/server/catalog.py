"""The model catalog: ``GET /v1/models`` and ``/v1/models/{id}``, OpenAI's list shape enriched
as OpenRouter catalogs are.

Facts about each model come from its upstream where it can tell (``Adapter.facts``: Ollama's
``/api/show``, a vLLM server's or engine's ``max_model_len``) and from the YAML (``model:``),
which wins. Upstream facts are gathered by a background task (:func:`cataloguing`, at start,
after each reload, then every :data:`REFRESH_SECONDS`) and read from its cache: a catalog
request never waits on them. ``warm`` and ``can_accept`` are live: the upstream's readiness
(checked at most once a second), the circuit, a free concurrency slot or queue place.

A model is listed under its public name, its aliases beside it; the upstream's concrete id is
never shown once a public name is configured. Past its ``deprecation_date`` a model leaves the
list (``/v1/models/{id}`` still answers) and is served until it is removed from the YAML.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from proxy.config import BaseConfig
from proxy.errors import NotFound, ProxyError
from proxy.errors import reason as reason_of
from proxy.server.health import Readiness
from proxy.server.tasks import running
from proxy.upstream.breaker import State
from proxy.upstream.pipeline import Backend, Pipeline
from proxy.upstream.routing import Served

log = logging.getLogger("model_proxy")

#: Seconds between two background refreshes of the upstreams' facts.
REFRESH_SECONDS = 300.0
class Serving(Protocol):
    """What the catalog reads of the running proxy (``proxy.server.runtime.Runtime``)."""

    @property
    def served(self) -> Served: ...

    @property
    def started_at(self) -> float: ...

    @property
    def readiness(self) -> Readiness: ...

    @property
    def shutting_down(self) -> bool: ...

    @property
    def pipeline(self) -> Pipeline: ...


class Catalog:
    """The cached upstream facts of the served set, keyed by backend."""

    def __init__(self) -> None:
        #: id(backend) -> (backend, facts, the upstream's own model list)
        self.cache: dict[int, tuple[Backend, dict[str, Any], list[dict[str, Any]]]] = {}
        self.wake = asyncio.Event()

    def configure(self, config: BaseConfig) -> None:
        """A new served set: gather its facts now (the old ones stay until then)."""
        self.wake.set()

    def facts(self, backend: Backend) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        cached = self.cache.get(id(backend))
        if cached is None or cached[0] is not backend:
            return {}, []
        return cached[1], cached[2]

    async def refresh(self, runtime: Serving) -> None:
        """Ask every backend's upstream what it knows; a failure keeps what was known."""
        backends = runtime.served.backends
        results = await asyncio.gather(*(_gather(b) for b in backends))
        fresh = {}
        for backend, result in zip(backends, results, strict=True):
            if result is None:
                cached = self.cache.get(id(backend))
                result = (cached[1], cached[2]) if cached and cached[0] is backend else ({}, [])
            fresh[id(backend)] = (backend, *result)
        self.cache = fresh

    async def run(self, runtime: Serving) -> None:
        """Background task: refresh now, on :attr:`wake` (a reload), and periodically."""
        while True:
            for backend in runtime.served.backends:
                for adapter in backend.adapters():
                    try:
                        await adapter.until_started()
                    except ProxyError:
                        pass
            await self.refresh(runtime)
            try:
                async with asyncio.timeout(REFRESH_SECONDS):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()


async def _gather(backend: Backend) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    adapter = backend.adapter
    timeout = backend.config.timeouts.connect + 10
    try:
        async with asyncio.timeout(timeout):
            facts = await adapter.facts()
            listed = [] if backend.config.public_name else await adapter.models()
    except (ProxyError, TimeoutError) as exc:
        reason = exc.message if isinstance(exc, ProxyError) else "timed out"
        log.info("catalog: the upstream of %s could not say what it serves: %s",
                 backend.model_label, reason)
        return None
    except Exception as exc:  # an answer no adapter foresaw: what was known stays, and the
        # refresh task lives on to read the upstream again once it is fixed
        log.warning("catalog: the upstream of %s sent what the proxy could not read (%s)",
                    backend.model_label, reason_of(exc))
        return None
    return facts, [dict(m) for m in listed]


async def cataloguing(catalog: Catalog, runtime: Serving) -> AsyncIterator[None]:
    """The catalog's refresh task, running while the application does (``cleanup_ctx``)."""
    async with running(catalog.run(runtime), "catalog-refresh"):
        yield


async def listing(runtime: Serving, catalog: Catalog) -> list[dict[str, Any]]:
    """Every model the catalog lists now, in the YAML's order."""
    today = datetime.date.today()
    items: list[dict[str, Any]] = []
    for backend in runtime.served.backends:
        deprecated = backend.config.model.deprecation_date
        if deprecated is not None and deprecated <= today:
            continue
        items.extend(await _entries(runtime, catalog, backend))
    return items


async def one(runtime: Serving, catalog: Catalog, model_id: str) -> dict[str, Any]:
    """The catalog entry of ``model_id`` (a public name or alias, deprecated ones too)."""
    served = runtime.served
    backend = served.routes.get(model_id)
    if backend is None and served.only is not None and served.only.config.public_name is None:
        backend = served.only
    if backend is not None:
        for entry in await _entries(runtime, catalog, backend, shown_as=model_id):
            if entry["id"] == model_id:
                return entry
    raise NotFound(f"model {model_id[:200]!r} is not served here", param="model",
                   code="model_not_found")


async def _entries(
    runtime: Serving, catalog: Catalog, backend: Backend, shown_as: str | None = None
) -> list[dict[str, Any]]:
    config = backend.config
    facts, listed = catalog.facts(backend)
    warm, can_accept = await _live(runtime, backend)
    base = _enriched(runtime, config, facts, backend.adapter.sampling)
    base["metadata"] = {
        "backend_provider": config.backend_provider,
        "fxn_id": config.fxn_id,
        "model_type": facts.get("model_type", "embedding" if "embedding" in
                                config.model.supported_features else "chat"),
        "warm": warm,
        "can_accept": can_accept,
        "deprecation_date": _iso(config.model.deprecation_date),
    }
    public = config.public_name
    if public is not None:
        shown = shown_as if shown_as in config.model.aliases else public
        entry = {"id": shown, "object": "model", "created": int(runtime.started_at),
                 "owned_by": config.backend_provider, "name": shown, **base}
        if config.model.aliases:
            entry["aliases"] = [n for n in (public, *config.model.aliases) if n != shown]
        return [entry]
    # No public name: any name is passed on, so the upstream's own list is the catalog.
    items: list[dict[str, Any]] = listed if shown_as is None or any(
        m.get("id") == shown_as for m in listed) else [
        {"id": shown_as, "object": "model", "created": int(runtime.started_at),
         "owned_by": config.backend_provider}]
    return [{**m, "name": m.get("name", m.get("id")), **base,
             "metadata": {**_object(m.get("metadata")), **base["metadata"]}} for m in items]


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _enriched(runtime: Serving, config: BaseConfig, facts: dict[str, Any],
              sampling: tuple[str, ...]) -> dict[str, Any]:
    model = config.model
    features = list(model.supported_features) or facts.get("supported_features", [])
    out: dict[str, Any] = {
        "context_length": model.context_length or facts.get("context_length"),
        "max_output_length": model.max_output_length or facts.get("max_output_length"),
        "supported_sampling_parameters": list(sampling),
        "supported_features": features,
        "input_modalities": facts.get("input_modalities", ["text"]),
        "output_modalities": ["text"],
    }
    if model.pricing is not None:
        out["pricing"] = model.pricing.model_dump(exclude_none=True)
    return out


async def _live(runtime: Serving, backend: Backend) -> tuple[bool, bool]:
    """``warm``: the upstream is ready and its circuit closed; ``can_accept``: also a
    concurrency slot or a queue place is free and the proxy is not shutting down."""
    if runtime.shutting_down:
        return False, False
    warm = await runtime.readiness.backend_reason(backend) is None
    if backend.breaker.state is not State.CLOSED:
        warm = False
    limiter = runtime.pipeline.limiter
    room = limiter.active < limiter.max_active or limiter.waiting < limiter.max_waiting
    return warm, warm and room


def _iso(day: datetime.date | None) -> str | None:
    return day.isoformat() if day is not None else None
