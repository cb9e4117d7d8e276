"""The one layer around every handler: count, guard, authenticate, render errors.

Everything cross-cutting happens here, once per request, in one aiohttp middleware (each
middleware costs a call chain per request, so the concerns share one): the metrics observe
every answer, oversized headers and missing credentials are refused before a handler reads
the body, and exceptions become HTTP answers — ``ProxyError`` as its OpenAI-shaped body,
aiohttp's own HTTP exceptions likewise, anything else as a bare 500 whose details go to the
log only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.auth import authenticate
from proxy.errors import NotFound, PayloadTooLarge, ProxyError
from proxy.inputs import check_headers
from proxy.state import RUNTIME

log = logging.getLogger("model_proxy")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The ``endpoint`` label by path; ``""`` marks paths that are not counted (probes, scrapes).
ENDPOINT_LABELS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/healthz": "",
    "/readyz": "",
    "/metrics": "",
}


def error_response(exc: ProxyError) -> web.Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.Response(
        status=exc.status,
        body=orjson.dumps(exc.body()),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    start = time.perf_counter()
    path = request.path
    endpoint = ENDPOINT_LABELS.get(path)
    if endpoint is None:
        endpoint = "passthrough" if path.startswith("/v1/") else "other"
    backend = runtime.backend
    status = 500
    try:
        try:
            config = backend.config if backend is not None else runtime.config
            check_headers(request, config.limits)
            if config.auth.enabled:
                await authenticate(request, config)
            response = await handler(request)
        except ProxyError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(_from_http(request, exc))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, path[:200])
            response = error_response(ProxyError("internal error; the proxy's log has the details"))
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away first
        raise
    finally:
        if endpoint:
            model = backend.model_label if backend is not None else "none"
            runtime.metrics.observe_request(endpoint, model, status, time.perf_counter() - start)


def _from_http(request: web.Request, exc: web.HTTPException) -> ProxyError:
    where = f"{request.method} {request.path[:200]}"
    if exc.status == 404:
        return NotFound(f"no such path: {where}", code="unknown_path")
    if exc.status == 405:
        return ProxyError(
            f"method not allowed: {where}",
            status=405,
            type="invalid_request_error",
            code="method_not_allowed",
        )
    if exc.status == 413:
        return PayloadTooLarge("request body is too large")
    return ProxyError(exc.reason, status=exc.status, type="invalid_request_error")
