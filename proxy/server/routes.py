"""HTTP handlers: parse, resolve, call, render. Everything else is a layer around them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.adapters.base import Endpoint, Job
from proxy.config import BaseConfig
from proxy.errors import BadRequest, NotFound, ProxyError
from proxy.metrics import CONTENT_TYPE
from proxy.server.edge import method_not_allowed
from proxy.server.relay import relay
from proxy.server.runtime import RUNTIME, Backend, Runtime
from proxy.wire.checks import check_payload, parse_object, read_body

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
#: The field each endpoint cannot do without.
REQUIRED: dict[str, str] = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
READY_CACHE_SECONDS = 1.0
#: Paths with routes; another method on one of them is a 405, not a 404.
KNOWN_PATHS = frozenset({*ENDPOINTS, "/v1/models", "/healthz", "/readyz", "/metrics"})


async def inference(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    backend = runtime.current()
    config = backend.config
    endpoint = ENDPOINTS[request.path]
    body = await read_body(request, config.limits.max_body_bytes)
    payload = parse_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required and must be a non-empty string", param="model")
    required = REQUIRED[endpoint]
    if required not in payload:
        raise BadRequest(f"{required} is required", param=required)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    check_payload(endpoint, payload, body, config.limits)
    upstream_model = resolve_model(config, model)
    if upstream_model != model:
        payload["model"] = upstream_model
        body = orjson.dumps(payload)
    job = Job(
        endpoint,
        "POST",
        request.path,
        "",
        body,
        payload,
        model,
        upstream_model,
        stream,
        request.headers,
        request_id(request),
    )
    return await _forward(request, runtime, backend, job)


async def passthrough(request: web.Request, runtime: Runtime) -> web.StreamResponse:
    backend = runtime.current()
    if request.path in ENDPOINTS or request.path == "/v1/models":
        raise method_not_allowed(request)
    if not backend.adapter.passthrough:
        raise NotFound(f"no such path: {request.path[:200]}", code="unknown_path")
    body = await read_body(request, backend.config.limits.max_body_bytes)
    job = Job(
        "passthrough",
        request.method,
        request.path,
        request.query_string,
        body,
        None,
        None,
        None,
        False,
        request.headers,
        request_id(request),
    )
    return await _forward(request, runtime, backend, job)


async def _forward(
    request: web.Request, runtime: Runtime, backend: Backend, job: Job
) -> web.StreamResponse:
    pipeline = runtime.pipeline
    assert pipeline is not None and runtime.drain is not None
    probe = pipeline.admit(backend)
    if probe is None:
        probe = await pipeline.enter(backend)
    try:
        upstream = await pipeline.call(backend, job)
        return await relay(request, upstream, job, runtime.metrics, runtime.drain)
    finally:
        pipeline.leave(backend, probe)


async def models(request: web.Request, runtime: Runtime) -> web.Response:
    backend = runtime.current()
    config = backend.config
    ready = await readiness(request.app) is None
    metadata = {
        "backend_provider": config.backend_provider,
        "warm": ready,
        "can_accept": ready and not runtime.shutting_down,
        "fxn_id": config.fxn_id,
    }
    if config.public_name is not None:
        entry: dict[str, Any] = {
            "id": config.public_name,
            "object": "model",
            "created": int(runtime.started_at),
            "owned_by": config.backend_provider,
        }
        if config.model.aliases:
            entry["aliases"] = list(config.model.aliases)
        items = [entry]
    else:
        try:
            items = [dict(m) for m in await backend.adapter.models()]
        except ProxyError:
            items = []
    for item in items:
        if config.model.context_length is not None:
            item["context_length"] = config.model.context_length
        if config.model.supported_features:
            item["supported_features"] = list(config.model.supported_features)
        item["metadata"] = {**item.get("metadata", {}), **metadata}
    return web.Response(
        body=orjson.dumps({"object": "list", "data": items}), content_type="application/json"
    )


async def healthz(request: web.Request, runtime: Runtime) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request, runtime: Runtime) -> web.Response:
    reason = await readiness(request.app)
    if reason is None:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "unavailable", "reason": reason}, status=503)


async def metrics(request: web.Request, runtime: Runtime) -> web.Response:
    if not runtime.current().config.metrics.enabled:
        raise NotFound("metrics are disabled", code="unknown_path")
    return web.Response(
        body=runtime.metrics.render(),
        headers={"Content-Type": CONTENT_TYPE},
    )


async def readiness(app: web.Application) -> str | None:
    """``None`` when the proxy can serve, else why not; upstream probes are cached briefly."""
    runtime = app[RUNTIME]
    if runtime.shutting_down:
        return "shutting down"
    backend = runtime.backend
    if backend is None:
        return "starting"
    circuit = backend.breaker.reason()
    if circuit is not None:
        return circuit
    cached = app[READY_CACHE]
    now = time.monotonic()
    if cached.backend is backend and now - cached.at < READY_CACHE_SECONDS:
        return cached.reason
    reason = None
    try:
        async with asyncio.timeout(backend.config.timeouts.connect + 5):
            await backend.adapter.check_ready()
    except ProxyError as exc:
        reason = exc.message
    except TimeoutError:
        reason = "upstream readiness check timed out"
    cached.backend, cached.at, cached.reason = backend, now, reason
    runtime.metrics.upstream_up.set(reason is None)
    return reason


class ReadyCache:
    __slots__ = ("at", "backend", "reason")

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.at = 0.0
        self.reason: str | None = None


READY_CACHE = web.AppKey("ready_cache", ReadyCache)


async def not_found(request: web.Request, runtime: Runtime) -> web.Response:
    """Every path no route serves; a known path with another method is a 405."""
    if request.path in KNOWN_PATHS:
        raise method_not_allowed(request)
    raise NotFound(f"no such path: {request.method} {request.path[:200]}", code="unknown_path")


def resolve_model(config: BaseConfig, requested: str) -> str:
    """The upstream name for a requested public name; 404 for a name this node does not serve."""
    public = config.public_name
    if public is not None and requested != public and requested not in config.model.aliases:
        raise NotFound(
            f"model {requested[:200]!r} is not served here; this node serves {public!r}",
            param="model",
            code="model_not_found",
        )
    return config.upstream_name or requested


def request_id(request: web.Request) -> str:
    """The client's ``X-Request-Id`` when it is fit for a log line, else ``""``."""
    given = request.headers.get("X-Request-Id")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return ""
