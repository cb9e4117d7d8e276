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

import aiohttp

from proxy.adapters import load_adapter_class
from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.config import BaseConfig, CircuitSection
from proxy.errors import RETRYABLE_STATUSES, Unavailable, UpstreamError
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
    #: With several ``url``s, one per URL (the adapter above is the first one's); else empty,
    #: and attempts go to ``adapter`` with no choosing.
    upstreams: tuple[Upstream, ...] = ()
    #: The next upstream's turn, for ``routing: round_robin``.
    turn: int = 0

    def adapters(self) -> tuple[Adapter, ...]:
        """Every adapter this backend holds (to start and close them)."""
        return tuple(u.adapter for u in self.upstreams) or (self.adapter,)


@dataclass(slots=True, eq=False)
class Upstream:
    """One of a model's several upstreams: its adapter, its own breaker, its cool-down."""

    #: Metric label: the URL's position in the YAML's ``url`` list.
    label: str
    adapter: Adapter
    breaker: Breaker
    #: Attempts in flight on it now (streams until their end), for ``routing: least_busy``.
    active: int = 0
    #: A failed attempt keeps it out of turn until then (``time.monotonic``).
    cool_until: float = 0.0


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

    def build(self, config: BaseConfig, session: aiohttp.ClientSession) -> Backend:
        """The backend for one model's config: its adapter, or one adapter per ``url``.

        Raises ``ConfigError`` when the adapter class cannot be imported.
        """
        cls = load_adapter_class(config)
        urls = config.urls
        if len(urls) < 2:
            return self.backend(config, cls(config, session))
        upstreams = tuple(
            Upstream(str(i), cls(config.for_url(url), session), Breaker(config.circuit))
            for i, url in enumerate(urls)
        )
        # each upstream has its own breaker; the model's own never opens, so a request is
        # refused only when every upstream is out (``_spread``)
        breaker = Breaker(CircuitSection(failures=0))
        policy = RetryPolicy(config.retries, config.timeouts, breaker, self.metrics)
        return Backend(config, upstreams[0].adapter, model_label(config), breaker, policy,
                       upstreams=upstreams)

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
        if backend.upstreams:
            return await self._spread(backend, job, start)
        breaker = backend.breaker
        job.attempts += 1
        try:
            response = await backend.adapter.send(job)
            if not response.stream and response.body is None:
                await response.buffer()
        except UpstreamError as exc:
            job.upstream_seconds += time.perf_counter() - start
            metrics = self.metrics
            metrics.count_upstream_error(exc.code or "upstream_error")
            metrics.set_upstream_up(False)
            breaker.failure()
            raise
        elapsed = time.perf_counter() - start
        job.upstream_seconds += elapsed
        metrics = self.metrics
        if response.status in FAILED_STATUSES:
            breaker.failure()
            metrics.set_upstream_up(False)
        else:
            if breaker.failures or breaker.state is not State.CLOSED:
                breaker.success()
            metrics.set_upstream_up(True)
        metrics.observe_upstream(job.endpoint, elapsed)
        return response


    async def _spread(self, backend: Backend, job: Job, start: float) -> UpstreamResponse:
        """One attempt over a model's upstreams: the chosen one first, then on to the next
        while an attempt fails before the client has seen a byte (refused, timed out, 429 or
        a 5xx answer). The last one's outcome is the attempt's."""
        now = time.monotonic()
        order = _order(backend, now)
        last = len(order) - 1
        metrics = self.metrics
        model = backend.model_label
        cooldown = backend.config.circuit.cooldown
        for i, upstream in enumerate(order):
            breaker = upstream.breaker
            try:
                probe = breaker.admit()
            except Unavailable:
                if i == last:
                    raise
                continue
            upstream.active += 1
            held = False
            try:
                try:
                    response = await upstream.adapter.send(job)
                    if not response.stream and response.body is None:
                        await response.buffer()
                except UpstreamError as exc:
                    job.upstream_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    metrics.count_upstream_error(exc.code or "upstream_error")
                    metrics.count_attempt(model, upstream.label, "failed")
                    breaker.failure()
                    upstream.cool_until = time.monotonic() + cooldown
                    if i == last or not exc.retryable:
                        raise
                    continue
                elapsed = time.perf_counter() - start
                job.upstream_seconds += elapsed
                if response.status in FAILED_STATUSES:
                    breaker.failure()
                elif breaker.failures or breaker.state is not State.CLOSED:
                    breaker.success()
                if (response.status >= 500 or response.status in RETRYABLE_STATUSES) and (
                    i < last
                ):
                    metrics.count_attempt(model, upstream.label, "failed")
                    upstream.cool_until = time.monotonic() + cooldown
                    await response.release()
                    start = time.perf_counter()
                    continue
                metrics.count_attempt(model, upstream.label, "ok")
                metrics.observe_upstream(job.endpoint, elapsed)
                if response.stream:
                    _hold(response, upstream)
                    held = True
                return response
            finally:
                if not held:
                    upstream.active -= 1
                if probe:
                    breaker.abandon()
        raise AssertionError("unreachable: the last upstream returns or raises")  # pragma: no cover


def _order(backend: Backend, now: float) -> list[Upstream]:
    """The upstreams in the order to try: ready ones by ``routing``, cooling ones last."""
    upstreams = backend.upstreams
    if backend.config.routing == "least_busy":
        ranked = sorted(upstreams, key=lambda u: u.active)
    else:
        turn = backend.turn % len(upstreams)
        backend.turn = turn + 1
        ranked = [*upstreams[turn:], *upstreams[:turn]]
    ready = [u for u in ranked if u.cool_until <= now]
    if len(ready) == len(ranked):
        return ranked
    return ready + sorted((u for u in ranked if u.cool_until > now), key=lambda u: u.cool_until)


def _hold(response: UpstreamResponse, upstream: Upstream) -> None:
    """Count a stream against ``upstream`` until it is released."""
    inner = response.swap_release(None)

    async def release() -> None:
        upstream.active -= 1
        if inner is not None:
            result = inner()
            if result is not None:
                await result

    response.swap_release(release)


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
