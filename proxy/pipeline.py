"""The one layer between handlers and adapters: every upstream attempt goes through here.

``Pipeline.call`` turns a job into an upstream response that is safe to relay: a
non-streamed body is read in full here, so that anything that fails before the client has
seen a byte surfaces as an exception in this layer, where retries and limits live.
"""

from __future__ import annotations

import time

from proxy.adapters.base import Job, UpstreamResponse
from proxy.errors import UpstreamError
from proxy.metrics import Metrics
from proxy.state import Backend


class Pipeline:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def call(self, backend: Backend, job: Job) -> UpstreamResponse:
        start = time.perf_counter()
        try:
            response = await backend.adapter.send(job)
            if not response.stream:
                await response.buffer()
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(exc.code or "upstream_error").inc()
            raise
        self.metrics.upstream_latency.labels(job.endpoint).observe(time.perf_counter() - start)
        return response
