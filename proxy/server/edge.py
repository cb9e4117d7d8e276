"""The layer around every handler: count, guard, authenticate, render errors; and the readers
of a request's headers and body.

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
from functools import partial

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy.config import RequestLimits
from proxy.errors import BadRequest, NotFound, PayloadTooLarge, ProxyError
from proxy.headers import SERVER
from proxy.server.requestid import CURRENT, HEADER
from proxy.server.runtime import BODY, Runtime
from proxy.upstream.exchange import Exchange

log = logging.getLogger("model_proxy")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A handler as routes write it: the request, the application's runtime, the request's own
#: exchange (``proxy.upstream.exchange``).
RuntimeHandler = Callable[[web.Request, Runtime, Exchange], Awaitable[web.StreamResponse]]

_HEADER_OVERHEAD = 4  # ": " and CRLF per line, as on the wire

#: ``endpoint`` label for paths that are not counted (probes, scrapes).
UNCOUNTED = ""


def error_response(exc: ProxyError, request_id: str) -> web.Response:
    """``exc`` as its OpenAI-shaped body, with ``request_id`` beside ``error`` (a top-level
    field OpenAI's clients ignore; they read the id from the ``X-Request-ID`` header)."""
    headers: dict[str, str] = {HEADER: request_id}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    body = exc.body()
    body["request_id"] = request_id
    return web.Response(
        status=exc.status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


def layered(runtime: Runtime, handler: RuntimeHandler, endpoint: str | None) -> Handler:
    """``handler`` with the edge layer around it; ``endpoint`` is its metrics label
    (``None``: ``passthrough`` under ``/v1/``, else ``other``)."""
    metrics = runtime.metrics
    ids = runtime.ids

    async def handle(request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        request_id = ids.of(request.headers.get(HEADER))
        # no reset: the next request handled in this task sets its own first
        CURRENT.set(request_id)
        exchange = Exchange(request_id)
        label = endpoint
        if label is None:
            label = "passthrough" if request.path.startswith("/v1/") else "other"
        backend = runtime.backend
        status = 500
        try:
            try:
                checking = guard(request, runtime)
                if checking is not None:
                    await checking
                response = await handler(request, runtime, exchange)
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception as exc:
                response = failed(request, exc, request_id)
            status = response.status
            if not response.prepared:  # a stream has sent its own as it started
                headers = response.headers
                headers[HEADER] = request_id
                headers["Server"] = SERVER
            return response
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            status = 499
            if not client_gone(request):
                raise  # cancelled for another reason (the shutdown's last step)
            if isinstance(exc, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            return client_left()
        finally:
            if label:
                metrics.observe_request(label, exchange.model_label or backend.model_label,
                                        status, time.perf_counter() - start,
                                        exchange.upstream_seconds)

    return handle


def guard(request: web.Request, runtime: Runtime) -> Awaitable[None] | None:
    """Refuse a request before its handler runs: a path another server could read otherwise,
    oversized headers, missing or wrong credentials. Returns the signature check to await
    when the credentials are signatures over the body."""
    raw = request.raw_path
    # Near-free for ordinary paths: only a path that could hide a dot segment or an encoded
    # separator is looked at closely.
    if "%" in raw or "/." in raw or "//" in raw or "\\" in raw:
        check_path(request)
    limits = runtime.limits
    check_headers(request, limits)
    auth = runtime.auth
    if auth.enabled and request.path not in runtime.public_paths:
        if auth.needs_body:
            return auth.verify(request.headers, partial(
                read_body, request, limits.max_body_bytes, limits.body_timeout))
        auth.check_keys(request.headers)
    return None


def failed(request: web.Request, exc: Exception, request_id: str) -> web.Response:
    """The answer for what a handler raised: a ``ProxyError`` as its OpenAI-shaped body,
    aiohttp's HTTP errors likewise (its redirects are raised on), anything else as a bare
    500 whose details go to the log only."""
    if isinstance(exc, ProxyError):
        response = error_response(exc, request_id)
        if exc.status == 408:
            response.force_close()  # what is left of the body is not waited for
        return response
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return error_response(_from_http(request, exc), request_id)
    log.error("unhandled error on %s %s", request.method, request.path[:200], exc_info=exc)
    return error_response(ProxyError("internal error; the proxy's log has the details"),
                          request_id)


def client_gone(request: web.BaseRequest) -> bool:
    """Whether the client's connection is closed or closing."""
    transport = request.transport
    return transport is None or transport.is_closing()


def client_left() -> web.Response:
    """What a handler whose client has gone returns: aiohttp's attempt to send it fails
    quietly on the closed connection, and the access log still gets its one line, with 499
    (nginx's "client closed request"), instead of a traceback and a 500."""
    return web.Response(status=499)


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


_ENCODED_SEPARATORS = ("%2e", "%2f", "%5c")


def check_path(request: web.BaseRequest) -> None:
    """Refuse a path that another server could read differently from the router (400).

    Routing matches the path as sent; an upstream (or the HTTP client on the way there) may
    resolve ``.``/``..`` segments, decode ``%2e``/``%2f`` or fold ``//`` and ``\\``, and so
    reach a path the proxy never routed: an inference endpoint without its guards, or one
    outside ``/v1/``. No client has a reason to send such a path, so it is refused, not
    normalised.
    """
    raw = request.raw_path
    if not raw.startswith("/"):  # absolute-form target: look at the URL's path
        raw = request.rel_url.raw_path
    path = raw.partition("?")[0]
    lowered = path.lower()
    bad = "\\" in path or any(code in lowered for code in _ENCODED_SEPARATORS)
    if not bad:
        segments = path.split("/")[1:]
        # ";" starts path parameters, which some servers drop before resolving ("..;/").
        bad = any(s.partition(";")[0] in (".", "..") for s in segments) or "" in segments[:-1]
    if bad:
        raise BadRequest(
            "the request path must not contain '.' or '..' segments, empty segments, "
            "backslashes or percent-encoded '.', '/' or '\\'",
            code="invalid_path",
        )


def check_headers(request: web.BaseRequest, limits: RequestLimits) -> None:
    """Refuse requests whose headers together exceed ``limits.max_header_bytes`` (431)."""
    raw = request.raw_headers
    size = _HEADER_OVERHEAD * len(raw)
    for name, value in raw:
        size += len(name) + len(value)
    if size > limits.max_header_bytes:
        raise PayloadTooLarge(
            f"request headers of {size} bytes exceed the limit of {limits.max_header_bytes}",
            status=431,
            code="headers_too_large",
        )




async def read_body(
    request: web.Request, limit: int, within: float | None = None
) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``, and
    with 408 (the connection then closed) when it has not all arrived ``within`` seconds.

    Read from the network once per request: aiohttp keeps a body it has read, and a chunked
    body read here is kept under ``BODY`` for the next caller (auth reads before handlers).
    """
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit}")
        # The usual case, kept cheap: a plain body that has all arrived with its headers.
        if request.content.is_eof() and "Content-Encoding" not in request.headers:
            return await request.read()
    if within is None:
        return await _read(request, length, limit)
    try:
        async with asyncio.timeout(within):
            return await _read(request, length, limit)
    except TimeoutError:
        raise ProxyError(
            f"the request body did not arrive within {within:g} s",
            status=408, type="invalid_request_error", code="body_timeout",
        ) from None


async def _read(request: web.Request, length: int | None, limit: int) -> bytes:
    try:
        # A compressed body is counted as it is decompressed: its length says nothing.
        if length is not None and "Content-Encoding" not in request.headers:
            return await request.read()
        body = request.get(BODY)
        if body is None:
            chunks = bytearray()
            async for chunk in request.content.iter_any():
                chunks += chunk
                if len(chunks) > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            body = request[BODY] = bytes(chunks)
        return body
    except RequestPayloadError as exc:
        raise BadRequest(
            "the request body could not be read: bad chunked framing or content encoding",
            code="bad_body",
        ) from exc
