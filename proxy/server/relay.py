"""Relaying an upstream response to the client, chunk by chunk, as it arrives."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from proxy.adapters.base import Job, UpstreamResponse
from proxy.errors import ProxyError
from proxy.metrics import Metrics, observe_into
from proxy.server.drain import SHUTTING_DOWN, Drain
from proxy.wire import answers

log = logging.getLogger("model_proxy")


async def relay(
    request: web.Request, upstream: UpstreamResponse, job: Job, metrics: Metrics, drain: Drain
) -> web.StreamResponse:
    """Send ``upstream`` to the client; always releases it, also when the client leaves.

    A failure after the first byte cannot change the status any more: for a stream it
    becomes a final SSE error event, then the stream ends. A stream still running when the
    shutdown grace is over (``drain``) ends the same way.
    """
    try:
        if not upstream.stream:
            body = upstream.body if upstream.body is not None else await upstream.read()
            return web.Response(status=upstream.status, body=body, headers=upstream.headers)
        response = web.StreamResponse(status=upstream.status, headers=upstream.headers)
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
        try:
            async for chunk in upstream.chunks():
                now = clock()
                waited += now - resumed
                if first:
                    metrics.observe_ttft(endpoint, now - start)
                    first = False
                else:
                    observe_into(gaps, bounds, now - previous)
                previous = now
                await response.write(chunk)
                resumed = clock()
        except ProxyError as exc:
            log.warning("stream %s ended early: %s", job.request_id or "-", exc.message)
            metrics.count_upstream_error(exc.code or "upstream_error")
            await response.write(answers.error_event(exc))
        except asyncio.CancelledError:
            if not drain.ending:
                raise  # the client went away
            task.uncancel()
            await response.write(answers.error_event(SHUTTING_DOWN))
        finally:
            drain.streams.discard(task)
            job.upstream_seconds += waited
        await response.write_eof()
        return response
    finally:
        await upstream.release()
        usage = upstream.reported_usage()
        if usage is not None:
            metrics.count_usage(usage.prompt_tokens, usage.completion_tokens, usage.extra)
