"""The one layer between routes and adapters: every upstream attempt goes through here.

A request is admitted (``async with pipeline.admitted(backend)``: circuit breaker, then a
concurrency slot or a place in the queue, released on the way out), then ``call`` makes the
attempts, with retries while the client has seen nothing. ``call`` returns an upstream response
that is safe to relay: a non-streamed body is read in full inside the attempt, so anything that
fails before the client has seen a byte surfaces here, where it can still be retried. A
stream's status and headers are known when ``call`` returns; its body is relayed afterwards and
never retried.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.config import BaseConfig
from proxy.errors import RETRYABLE_STATUSES, UpstreamError
from proxy.metrics import Metrics
from proxy.upstream.breaker import Breaker, State
from proxy.upstream.limiter import Limiter
from proxy.upstream.retry import RetryPolicy

#: Answers that count against the circuit breaker (as do raised ``UpstreamError``s).
FAILED_STATUSES = frozenset({502, 503, 504})


@dataclass(slots=True, eq=False)
class Backend:
    """One configuration and the adapter built from it; replaced whole on reload.

    A request keeps the backend it started on to the end, so after a reload the old one
    serves its in-flight requests (counted in ``active``) and is closed when that reaches 0.
    """

    config: BaseConfig
    adapter: Adapter
    #: Metric label for the model: a configured name, never a client's input.
    model_label: str
    breaker: Breaker
    retry: RetryPolicy
    #: Requests admitted on this backend and not yet left.
    active: int = 0


class Pipeline:
    """Admission, attempts and retries for every upstream request of one application."""

    def __init__(self, metrics: Metrics, limiter: Limiter) -> None:
        self.metrics = metrics
        self.limiter = limiter

    def configure(self, config: BaseConfig) -> None:
        self.limiter.configure(config.limits)

    def backend(self, config: BaseConfig, adapter: Adapter) -> Backend:
        """A backend for ``adapter``, with its own breaker and retry policy."""
        breaker = Breaker(config.circuit)
        policy = RetryPolicy(config.retries, config.timeouts, breaker, self.metrics)
        return Backend(config, adapter, model_label(config), breaker, policy)

    def admitted(self, backend: Backend) -> Admission:
        """``async with`` it around a request's upstream work: raises ``Unavailable`` while
        the circuit is open and ``Overloaded`` when the queue is full."""
        return Admission(self.limiter, backend)

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
            job.upstream_seconds += time.perf_counter() - start
            self.metrics.count_upstream_error(exc.code or "upstream_error")
            breaker.failure()
            raise
        elapsed = time.perf_counter() - start
        job.upstream_seconds += elapsed
        if response.status in FAILED_STATUSES:
            breaker.failure()
        elif breaker.failures or breaker.state is not State.CLOSED:
            breaker.success()
        self.metrics.observe_upstream(job.endpoint, elapsed)
        return response


class Admission:
    """A request's place at one backend: a concurrency slot, and the breaker's probe if it is
    the one let through a half-open circuit. Entered once; left always.

    Entering and leaving without a wait (a free slot, the usual case) happen synchronously:
    ``__aenter__`` and ``__aexit__`` then hand back an already finished awaitable instead of
    a coroutine, which costs a request less than a coroutine round trip.
    """

    __slots__ = ("backend", "limiter", "probe")

    def __init__(self, limiter: Limiter, backend: Backend) -> None:
        self.limiter = limiter
        self.backend = backend
        self.probe = False

    def __aenter__(self) -> Awaitable[None]:
        limiter, backend = self.limiter, self.backend
        self.probe = backend.breaker.admit()
        if limiter.active < limiter.max_active and not limiter.waiting:
            limiter.active += 1  # a free slot and nobody queued
            backend.active += 1
            return DONE
        return self._queue()

    async def _queue(self) -> None:
        try:
            await self.limiter.acquire()
        except BaseException:
            if self.probe:
                self.backend.breaker.abandon()
            raise
        self.backend.active += 1

    def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]:
        self.limiter.release()
        backend = self.backend
        backend.active -= 1
        if self.probe:
            backend.breaker.abandon()
        return DONE


class _Done:
    """An awaitable that is finished already: awaiting it returns ``None`` at once."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())  # type: ignore[return-value]


DONE = _Done()


def model_label(config: BaseConfig) -> str:
    """The ``model`` metric label: a configured name, never a client's input."""
    return config.public_name or config.upstream_name or "any"
