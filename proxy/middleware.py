"""Layers around every handler: metrics outermost, then error rendering.

The error layer is the one place where exceptions become HTTP answers: ``ProxyError`` as its
OpenAI-shaped body, aiohttp's own HTTP exceptions likewise, anything else as a bare 500 whose
details go to the log only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from proxy.errors import NotFound, PayloadTooLarge, ProxyError
from proxy.state import ENDPOINT, MODEL, RUNTIME

log = logging.getLogger("model_proxy")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: ``request[ENDPOINT]`` value for paths that are not counted (probes, scrapes).
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


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[RUNTIME].metrics
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away first
        raise
    finally:
        endpoint = request.get(ENDPOINT, "other")
        if endpoint != UNCOUNTED:
            metrics.observe_request(
                endpoint, request.get(MODEL, "none"), status, time.perf_counter() - start
            )


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProxyError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http(request, exc))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path[:200])
        return error_response(ProxyError("internal error; the proxy's log has the details"))


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
