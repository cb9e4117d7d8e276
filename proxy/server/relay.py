"""Relaying an upstream response to the client, chunk by chunk, as it arrives."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import CIMultiDict

from proxy.adapters.base import UpstreamResponse
from proxy.errors import ProxyError
from proxy.headers import SERVER
from proxy.metrics import Metrics, observe_into
from proxy.server.drain import SHUTTING_DOWN, Drain
from proxy.server.requestid import HEADER
from proxy.upstream.exchange import Exchange
from proxy.wire import answers

log = logging.getLogger("model_proxy")
#: Most bytes of an answer kept for the access line when ``logging.include_bodies`` is on.
ANSWER_LOG_BYTES = 64 * 1024


async def relay(
    request: web.Request, upstream: UpstreamResponse, exchange: Exchange, metrics: Metrics,
    drain: Drain,
) -> web.StreamResponse:
    """Send ``upstream`` to the client; always releases it, also when the client leaves.

    A failure after the first byte cannot change the status any more: for a stream it
    becomes a final SSE error event, then the stream ends. A stream still running when the
    shutdown grace is over (``drain``) ends the same way.
    """
    job = exchange.job
    assert job is not None
    try:
        answer = exchange.answer
        if not upstream.stream:
            body = upstream.body if upstream.body is not None else await upstream.read()
            whole = web.Response(status=upstream.status, body=body, headers=upstream.headers)
            if answer is not None:
                answer += body[:ANSWER_LOG_BYTES]
            return whole
        return await _stream(request, upstream, exchange, metrics, drain)
    finally:
        await upstream.release()
        usage = exchange.usage = upstream.reported_usage()
        if usage is not None:
            metrics.count_usage(usage.prompt_tokens, usage.completion_tokens, usage.extra,
                                usage.invalid)
        elif upstream.usage_missing():
            metrics.count_usage_missing(job.endpoint)


async def _stream(
    request: web.Request, upstream: UpstreamResponse, exchange: Exchange, metrics: Metrics,
    drain: Drain,
) -> web.StreamResponse:
    """Relay a stream chunk by chunk, timing its first chunk and the gaps between chunks."""
    job = exchange.job
    assert job is not None
    answer = exchange.answer
    headers = upstream.headers
    if isinstance(headers, CIMultiDict):  # a relayed answer's own copy: add to it
        headers[HEADER] = job.request_id
        headers["Server"] = SERVER
        response = web.StreamResponse(status=upstream.status, headers=headers)
    else:
        response = web.StreamResponse(status=upstream.status, headers=headers)
        response.headers[HEADER] = job.request_id
        response.headers["Server"] = SERVER
    await response.prepare(request)
    endpoint = job.endpoint
    clock = time.perf_counter
    start = previous = resumed = clock()
    waited = 0.0  # on the upstream, between our writes
    gaps, bounds = metrics.chunk_gaps(endpoint)
    first = True
    task = asyncio.current_task()
    assert task is not None
    drain.streams.add(task)
    chunks = upstream.chunks() if answer is None else _kept(upstream.chunks(), answer)
    try:
        async for chunk in chunks:
            now = clock()
            waited += now - resumed
            if first:
                metrics.observe_ttft(endpoint, now - start)
                exchange.ttfb = now - exchange.handed_on
                first = False
            else:
                observe_into(gaps, bounds, now - previous)
            previous = now
            await response.write(chunk)
            resumed = clock()
    except ProxyError as exc:
        log.warning("stream ended early: %s", exc.message)
        metrics.count_upstream_error(exc.code or "upstream_error")
        await response.write(answers.error_event(exc, job.request_id))
    except asyncio.CancelledError:
        if not drain.ending:
            raise  # the client went away
        task.uncancel()
        await response.write(answers.error_event(SHUTTING_DOWN, job.request_id))
    finally:
        drain.streams.discard(task)
        exchange.upstream_seconds += waited
    await response.write_eof()
    return response


async def _kept(chunks: AsyncIterator[bytes], answer: bytearray) -> AsyncIterator[bytes]:
    """``chunks``, their first bytes kept in ``answer`` (``logging.include_bodies``)."""
    async for chunk in chunks:
        if len(answer) < ANSWER_LOG_BYTES:
            answer += chunk[:ANSWER_LOG_BYTES - len(answer)]
        yield chunk
