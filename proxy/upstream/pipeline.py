"""The one layer between handlers and adapters: every upstream attempt goes through here.

A request passes ``enter`` (circuit breaker, then a concurrency slot or a place in the queue),
``call`` (attempts, with retries while the client has seen nothing), and ``leave`` (always,
in a ``finally``). ``call`` returns an upstream response that is safe to relay: a non-streamed
body is read in full inside the attempt, so anything that fails before the client has seen a
byte surfaces here, where it can still be retried. A stream's status and headers are known
when ``call`` returns; its body is relayed afterwards and never retried.
"""

from __future__ import annotations

import time

from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.config import BaseConfig
from proxy.errors import RETRYABLE_STATUSES, UpstreamError
from proxy.metrics import Metrics
from proxy.server.runtime import Backend
from proxy.upstream.breaker import Breaker, State
from proxy.upstream.limiter import Limiter
from proxy.upstream.retry import RetryPolicy

#: Answers that count against the circuit breaker (as do raised ``UpstreamError``s).
FAILED_STATUSES = frozenset({502, 503, 504})


class Pipeline:
    """Admission, attempts and retries for every upstream request of one application."""

    def __init__(self, metrics: Metrics, limiter: Limiter) -> None:
        self.metrics = metrics
        self.limiter = limiter

    def backend(self, config: BaseConfig, adapter: Adapter) -> Backend:
        """A backend for a started ``adapter``, with its own breaker and retry policy."""
        breaker = Breaker(config.circuit)
        policy = RetryPolicy(config.retries, config.timeouts, breaker, self.metrics)
        return Backend(config, adapter, model_label(config), breaker, policy)

    def admit(self, backend: Backend) -> bool | None:
        """Admit a request at once if a slot is free: whether it is the breaker's probe.

        ``None`` means no slot is free: await :meth:`enter` instead. Raises ``Unavailable``
        while the circuit is open. Pair every admission with :meth:`leave`.
        """
        limiter = self.limiter
        if limiter.active >= limiter.max_active or limiter.waiting:
            return None
        probe = backend.breaker.admit()
        limiter.active += 1
        backend.active += 1
        return probe

    async def enter(self, backend: Backend) -> bool:
        """Admit a request, waiting for a slot if need be; raise ``Unavailable`` /
        ``Overloaded``. Pair with ``leave``. Returns whether it is the breaker's probe."""
        probe = backend.breaker.admit()
        try:
            await self.limiter.acquire()
        except BaseException:
            if probe:
                backend.breaker.abandon()
            raise
        backend.active += 1
        return probe

    def leave(self, backend: Backend, probe: bool) -> None:
        self.limiter.release()
        backend.active -= 1
        if probe:
            backend.breaker.abandon()

    async def call(self, backend: Backend, job: Job) -> UpstreamResponse:
        """The upstream's answer to ``job`` after any retries; raises the last error."""
        start = time.perf_counter()
        try:
            response = await self._attempt(backend, job, start)
        except UpstreamError as exc:
            if not exc.retryable:
                raise
            first: UpstreamResponse | UpstreamError = exc
        else:
            if response.status not in RETRYABLE_STATUSES:
                return response
            first = response

        async def again() -> UpstreamResponse:
            return await self._attempt(backend, job, time.perf_counter())

        return await backend.retry.run(first, again, time.perf_counter() - start)

    async def _attempt(self, backend: Backend, job: Job, start: float) -> UpstreamResponse:
        breaker = backend.breaker
        try:
            response = await backend.adapter.send(job)
            if not response.stream and response.body is None:
                await response.buffer()
        except UpstreamError as exc:
            self.metrics.count_upstream_error(exc.code or "upstream_error")
            breaker.failure()
            raise
        if response.status in FAILED_STATUSES:
            breaker.failure()
        elif breaker.failures or breaker.state is not State.CLOSED:
            breaker.success()
        self.metrics.observe_upstream(job.endpoint, time.perf_counter() - start)
        return response


def model_label(config: BaseConfig) -> str:
    """The ``model`` metric label: a configured name, never a client's input."""
    return config.public_name or config.upstream_name or "any"
