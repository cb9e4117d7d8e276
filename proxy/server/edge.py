"""The layer around every handler: count, guard, authenticate, render errors.

Everything cross-cutting happens here, once per request: the metrics observe every answer,
oversized headers and missing credentials are refused before a handler reads the body, and
exceptions become HTTP answers — ``ProxyError`` as its OpenAI-shaped body, aiohttp's own HTTP
exceptions likewise, anything else as a bare 500 whose details go to the log only.

The layer wraps each route's handler when the routes are added (:func:`layered`) rather than
being an aiohttp middleware: aiohttp runs every middleware inside a per-request context
manager, which costs more than the rest of this layer. A catch-all route sends unknown paths
and methods through the same layer, so they get OpenAI-shaped 404 and 405 answers too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.auth.inbound import authenticate
from proxy.errors import NotFound, PayloadTooLarge, ProxyError
from proxy.server.runtime import Runtime
from proxy.wire.checks import check_headers

log = logging.getLogger("model_proxy")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RuntimeHandler = Callable[[web.Request, Runtime], Awaitable[web.StreamResponse]]

#: ``endpoint`` label for paths that are not counted (probes, scrapes).
UNCOUNTED = ""


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


def layered(runtime: Runtime, handler: RuntimeHandler, endpoint: str | None) -> Handler:
    """``handler`` with the edge layer around it; ``endpoint`` is its metrics label
    (``None``: ``passthrough`` under ``/v1/``, else ``other``)."""
    metrics = runtime.metrics

    async def handle(request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        label = endpoint
        if label is None:
            label = "passthrough" if request.path.startswith("/v1/") else "other"
        backend = runtime.backend
        status = 500
        try:
            try:
                config = backend.config if backend is not None else runtime.config
                check_headers(request, config.limits)
                if config.auth.enabled:
                    pending = authenticate(request, config, runtime)
                    if pending is not None:
                        await pending
                response = await handler(request, runtime)
            except ProxyError as exc:
                response = error_response(exc)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = error_response(_from_http(request, exc))
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.path[:200])
                response = error_response(
                    ProxyError("internal error; the proxy's log has the details")
                )
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away first
            raise
        finally:
            if label:
                model = backend.model_label if backend is not None else "none"
                metrics.observe_request(label, model, status, time.perf_counter() - start)

    return handle


def _from_http(request: web.Request, exc: web.HTTPException) -> ProxyError:
    where = f"{request.method} {request.path[:200]}"
    if exc.status == 404:
        return NotFound(f"no such path: {where}", code="unknown_path")
    if exc.status == 405:
        return method_not_allowed(request)
    if exc.status == 413:
        return PayloadTooLarge("request body is too large")
    return ProxyError(exc.reason, status=exc.status, type="invalid_request_error")


def method_not_allowed(request: web.Request) -> ProxyError:
    return ProxyError(
        f"method not allowed: {request.method} {request.path[:200]}",
        status=405,
        type="invalid_request_error",
        code="method_not_allowed",
    )
