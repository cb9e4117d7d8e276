"""Relaying an upstream response to the client, chunk by chunk, as it arrives."""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import CIMultiDict

from proxy.adapters.base import UpstreamResponse
from proxy.errors import ProxyError
from proxy.headers import SERVER
from proxy.metrics import Metrics
from proxy.server.drain import SHUTTING_DOWN, Drain
from proxy.server.requestid import HEADER
from proxy.upstream.exchange import Exchange
from proxy.wire import answers

log = logging.getLogger("model_proxy")
#: Most bytes of an answer kept for the access line when ``logging.include_bodies`` is on.
ANSWER_LOG_BYTES = 64 * 1024


async def relay(
    request: web.Request, upstream: UpstreamResponse, exchange: Exchange, metrics: Metrics,
) -> web.StreamResponse:
    """Send the whole answer ``upstream`` (read already, see ``proxy.upstream.pipeline``);
    always releases it. A stream goes to :func:`relay_stream` instead."""
    try:
        body = upstream.body if upstream.body is not None else await upstream.read()
        whole = web.Response(status=upstream.status, body=body, headers=upstream.headers)
        answer = exchange.answer
        if answer is not None:
            answer += body[:ANSWER_LOG_BYTES]
        return whole
    finally:
        await upstream.release()
        _account(upstream, exchange, metrics)


def _account(upstream: UpstreamResponse, exchange: Exchange, metrics: Metrics) -> None:
    """Count what the answer reported having cost (or that it did not say)."""
    usage = exchange.usage = upstream.reported_usage()
    if usage is not None:
        metrics.count_usage(usage.prompt_tokens, usage.completion_tokens, usage.extra,
                            usage.invalid)
    elif upstream.usage_missing():
        assert exchange.job is not None
        metrics.count_usage_missing(exchange.job.endpoint)


def _started(upstream: UpstreamResponse, request_id: str) -> web.StreamResponse:
    """The response that relays the stream ``upstream``, its own headers set."""
    headers = upstream.headers
    if isinstance(headers, CIMultiDict):  # a relayed answer's own copy: add to it
        headers[HEADER] = request_id
        headers["Server"] = SERVER
        return web.StreamResponse(status=upstream.status, headers=headers)
    response = web.StreamResponse(status=upstream.status, headers=headers)
    response.headers[HEADER] = request_id
    response.headers["Server"] = SERVER
    return response


async def relay_stream(
    request: web.Request, upstream: UpstreamResponse, exchange: Exchange, metrics: Metrics,
    drain: Drain,
) -> web.StreamResponse:
    """Relay the stream ``upstream`` chunk by chunk, timing its first chunk and the gaps
    between chunks; always releases it, also when the client leaves.

    A failure after the first byte cannot change the status any more: it becomes a final SSE
    error event, then the stream ends. A stream still running when the shutdown grace is over
    (``drain``) ends the same way.
    """
    job = exchange.job
    assert job is not None
    task = asyncio.current_task()
    assert task is not None
    try:
        response = _started(upstream, job.request_id)
        await response.prepare(request)
        endpoint = job.endpoint
        clock = time.perf_counter
        start = previous = resumed = clock()
        waited = 0.0  # on the upstream, between our writes
        gaps, bounds = metrics.chunk_gaps(endpoint)
        first = True
        drain.streams.add(task)
        chunks = upstream.chunks()
        if exchange.answer is not None:
            chunks = _kept(chunks, exchange.answer)
        try:
            async for chunk in chunks:
                now = clock()
                waited += now - resumed
                if first:
                    metrics.observe_ttft(endpoint, now - start)
                    exchange.ttfb = now - exchange.handed_on
                    first = False
                else:  # what FastHistogram.observe does, written out: once per chunk
                    gap = now - previous
                    gaps[bisect_left(bounds, gap)] += 1
                    gaps[-1] += gap
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
    finally:
        await upstream.release()
        _account(upstream, exchange, metrics)


async def _kept(chunks: AsyncIterator[bytes], answer: bytearray) -> AsyncIterator[bytes]:
    """``chunks``, their first bytes kept in ``answer`` (``logging.include_bodies``)."""
    async for chunk in chunks:
        if len(answer) < ANSWER_LOG_BYTES:
            answer += chunk[:ANSWER_LOG_BYTES - len(answer)]
        yield chunk
