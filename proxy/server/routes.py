"""HTTP handlers: parse, resolve, call, render. Everything else is a layer around them."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from proxy.adapters.base import Endpoint, Job
from proxy.errors import NotFound
from proxy.headers import request_headers
from proxy.metrics import CONTENT_TYPE
from proxy.server import catalog
from proxy.server.edge import method_not_allowed, read_body
from proxy.server.relay import relay, relay_stream
from proxy.server.runtime import EXCHANGE, Runtime
from proxy.upstream import determinism
from proxy.upstream.exchange import Exchange
from proxy.upstream.pipeline import Backend
from proxy.upstream.routing import UNROUTED
from proxy.wire.checks import check_request, parse_object
from proxy.wire.relayed import ask_usage

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
#: Answers that carry the SHA-256 of their text when determinism is enforced.
STAMPED = frozenset({"chat", "completions"})
#: Paths with routes; another method on one of them is a 405, not a 404.
KNOWN_PATHS = frozenset({*ENDPOINTS, "/v1/models", "/healthz", "/readyz", "/metrics"})


async def inference(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.StreamResponse:
    served = runtime.served
    limits = runtime.limits
    endpoint = ENDPOINTS[request.path]
    body = await read_body(request, limits.max_body_bytes, limits.body_timeout)
    payload = parse_object(body)
    model, stream = check_request(endpoint, payload, body, limits)
    backend = served.only or routed(runtime, exchange, model)
    upstream_model = resolve_model(backend, model)
    renamed = upstream_model != model
    forced = backend.enforce and endpoint != "embeddings"
    if forced:
        determinism.force(payload, backend.config.determinism, backend.adapter.top_k_off)
    if renamed or forced:
        payload["model"] = upstream_model
    # a pass-through upstream's tokens are read from its usage event, asked for if need be
    asks = stream and backend.adapter.asks_usage and endpoint != "embeddings"
    asked = asks and ask_usage(payload)
    if renamed or forced or asked:
        # copied out of orjson's 4 KiB write buffer, which its result keeps: the body is held
        # for the whole exchange (a resend needs it), so 500 streams would hold 2 MB of slack
        body = bytes(memoryview(orjson.dumps(payload)))
    request_id = exchange.request_id
    headers = request_headers(request.headers)
    headers["x-request-id"] = request_id
    # The body was read as JSON whatever the client called it (curl's -d says form-encoded);
    # an upstream that goes by the header (FastAPI: vLLM's server) must be told so.
    headers["content-type"] = "application/json"
    # the session header reaches the router only, never the upstream (unless allow-listed)
    session_header = backend.session_header
    session = request.headers.get(session_header) if session_header is not None else None
    job = Job(endpoint=endpoint, method="POST", path=request.path, body=body, payload=payload,
              model=model, upstream_model=upstream_model, stream=stream, headers=headers,
              request_id=request_id, usage_asked=asked, session=session)
    return await forward(request, runtime, backend, job, exchange)


async def passthrough(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.StreamResponse:
    backend = runtime.backend
    if request.path in ENDPOINTS or (
        request.path == "/v1/models" or request.path.startswith("/v1/models/")
    ):
        raise method_not_allowed(request)
    # with several models there is no one upstream an unknown path could belong to
    allowed = backend.config.passthrough
    if not (backend.adapter.passthrough and allowed.enabled) or runtime.served.only is None or (
        allowed.prefixes and not request.path.startswith(allowed.prefixes)
    ):
        raise NotFound(f"no such path: {request.path[:200]}", code="unknown_path")
    limits = runtime.limits
    body = await read_body(request, limits.max_body_bytes, limits.body_timeout)
    request_id = exchange.request_id
    headers = request_headers(request.headers)
    headers["x-request-id"] = request_id
    # As sent (still percent-encoded), so the upstream splits path and query as the client did.
    url = request.rel_url
    job = Job(endpoint="passthrough", method=request.method, path=url.raw_path,
              query=url.raw_query_string, body=body, headers=headers, request_id=request_id)
    return await forward(request, runtime, backend, job, exchange)


async def forward(
    request: web.Request, runtime: Runtime, backend: Backend, job: Job, exchange: Exchange
) -> web.StreamResponse:
    """Admit ``job``, send it (with retries), relay the answer."""
    exchange.job = job
    exchange.model_label = backend.model_label
    exchange.upstream_seconds = 0.0
    if runtime.access_jobs:  # JSON access lines tell of the job
        EXCHANGE.set(exchange)
        exchange.handed_on = time.perf_counter()
        exchange.provider = backend.provider
        if backend.include_bodies:
            exchange.answer = bytearray()
    pipeline = runtime.pipeline
    async with pipeline.admitted(backend):
        upstream = await pipeline.call(backend, job, exchange)
        if backend.enforce and job.endpoint in STAMPED:
            determinism.stamp(upstream)
        if upstream.stream:
            return await relay_stream(request, upstream, exchange, runtime.metrics,
                                      runtime.drain)
        return await relay(request, upstream, exchange, runtime.metrics)


def routed(runtime: Runtime, exchange: Exchange, model: str) -> Backend:
    """The backend serving ``model`` in a set of several; 404 (labelled as unrouted) else."""
    try:
        return runtime.served.route(model)
    except NotFound:
        exchange.model_label = UNROUTED
        raise


async def models(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.Response:
    items = await catalog.listing(runtime, runtime.catalog)
    return _json({"object": "list", "data": items})


async def model(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.Response:
    entry = await catalog.one(runtime, runtime.catalog, request.match_info["id"])
    return _json(entry)


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


async def healthz(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.Response:
    reason = await runtime.readiness.reason(runtime.served)
    if reason is None:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "unavailable", "reason": reason}, status=503)


async def metrics(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.Response:
    if not runtime.config.metrics.enabled:
        raise NotFound("metrics are disabled", code="unknown_path")
    return web.Response(body=runtime.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def not_found(
    request: web.Request, runtime: Runtime, exchange: Exchange
) -> web.Response:
    """Every path no route serves; a known path with another method is a 405."""
    if request.path in KNOWN_PATHS:
        raise method_not_allowed(request)
    raise NotFound(f"no such path: {request.method} {request.path[:200]}", code="unknown_path")


def resolve_model(backend: Backend, requested: str) -> str:
    """The upstream name for a requested public name; 404 for a name this node does not serve."""
    public = backend.public_name
    if public is not None and requested != public and (
            requested not in backend.config.model.aliases):  # read only for another name
        raise NotFound(
            f"model {requested[:200]!r} is not served here; this node serves {public!r}",
            param="model",
            code="model_not_found",
        )
    return backend.upstream_name or requested
