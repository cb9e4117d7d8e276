"""Relaying an upstream response to the client, chunk by chunk, as it arrives."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from proxy import sse
from proxy.adapters.base import Job, UpstreamResponse
from proxy.errors import ProxyError
from proxy.metrics import Metrics

log = logging.getLogger("model_proxy")


async def relay(
    request: web.Request, upstream: UpstreamResponse, job: Job, metrics: Metrics
) -> web.StreamResponse:
    """Send ``upstream`` to the client; always releases it, also when the client leaves.

    A failure after the first byte cannot change the status any more: for a stream it
    becomes a final SSE error event, then the stream ends.
    """
    try:
        if not upstream.stream:
            body = upstream.body if upstream.body is not None else await upstream.read()
            return web.Response(status=upstream.status, body=body, headers=upstream.headers)
        response = web.StreamResponse(status=upstream.status, headers=upstream.headers)
        await response.prepare(request)
        start = time.perf_counter()
        first = True
        try:
            async for chunk in upstream.chunks():
                if first:
                    metrics.ttft.labels(job.endpoint).observe(time.perf_counter() - start)
                    first = False
                await response.write(chunk)
        except ProxyError as exc:
            log.warning("stream %s ended early: %s", job.request_id, exc.message)
            metrics.upstream_errors.labels(exc.code or "upstream_error").inc()
            await response.write(sse.error_event(exc))
        await response.write_eof()
        return response
    finally:
        await upstream.release()
        _count_tokens(upstream, metrics)


def _count_tokens(upstream: UpstreamResponse, metrics: Metrics) -> None:
    usage = upstream.usage
    if usage.prompt_tokens:
        metrics.tokens.labels("in").inc(usage.prompt_tokens)
    if usage.completion_tokens:
        metrics.tokens.labels("out").inc(usage.completion_tokens)
