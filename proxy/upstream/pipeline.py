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

from collections.abc import Awaitable, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from proxy.adapters import load_adapter_class
from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.config import BaseConfig, CircuitSection
from proxy.errors import RETRYABLE_STATUSES, Unavailable, UpstreamError
from proxy.metrics import Metrics
from proxy.upstream import balance
from proxy.upstream.breaker import Breaker, State
from proxy.upstream.clock import SYSTEM, Clock
from proxy.upstream.exchange import Exchange
from proxy.upstream.limiter import Limiter
from proxy.upstream.retry import RetryPolicy
from proxy.upstream.signals import Signals


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one attempt's outcome means: the one table every attempt is judged by."""

    #: It counts against the upstream's circuit breaker (and cools a URL of a list down).
    failed: bool
    #: The next URL of a list may be tried (nothing of the answer has reached the client).
    fail_over: bool
    #: What the ``model_proxy_upstream_up`` gauge says after it.
    up: bool


#: An answer to relay.
ANSWERED = Verdict(failed=False, fail_over=False, up=True)
#: 429 and 5xx but the three below: the upstream is up but cannot serve this now.
BUSY = Verdict(failed=False, fail_over=True, up=True)
#: 502/503/504, or an error before any answer that a retry may fix.
DOWN = Verdict(failed=True, fail_over=True, up=False)
#: An error that another attempt would repeat (the answer broke off, too large).
BROKEN = Verdict(failed=True, fail_over=False, up=False)

#: Answers that count against the circuit breaker (as do raised ``UpstreamError``s).
FAILED_STATUSES = frozenset({502, 503, 504})


def judge(status: int) -> Verdict:
    """The verdict on an answer with ``status``."""
    if status in FAILED_STATUSES:
        return DOWN
    if status >= 500 or status in RETRYABLE_STATUSES:
        return BUSY
    return ANSWERED


def judge_error(exc: UpstreamError) -> Verdict:
    return DOWN if exc.retryable else BROKEN


@dataclass(slots=True, eq=False)
class Upstream:
    """One URL of a model: its adapter, its breaker, its cool-down."""

    #: Metric label: the URL's position in the YAML's ``url`` list.
    label: str
    adapter: Adapter
    breaker: Breaker
    #: Attempts in flight on it now (streams until their end), for ``routing: least_busy``.
    active: int = 0
    #: A failed attempt keeps it out of turn until then (``Clock.now``).
    cool_until: float = 0.0
    #: Its base URL, and that URL's rendezvous seed (``routing: prefix`` and ``session``).
    url: str = ""
    seed: int = 0
    #: What it last said of itself (``proxy.server.scrape`` reads it in the background).
    signals: Signals = field(default_factory=Signals)


@dataclass(slots=True, eq=False)
class Backend:
    """One configuration and the adapters built from it; replaced whole on reload.

    A request keeps the backend it started on to the end, so after a reload the old one
    serves its in-flight requests (counted in ``active``) and is closed when that reaches 0.
    ``upstreams`` has one entry per URL (one URL: one entry, whose breaker is the backend's,
    admitted at the door); ``adapter`` is the first one's.
    """

    config: BaseConfig
    adapter: Adapter
    #: Metric label for the model: a configured name, never a client's input.
    model_label: str
    breaker: Breaker
    retry: RetryPolicy
    upstreams: tuple[Upstream, ...]
    #: Requests admitted on this backend and not yet left.
    active: int = 0
    #: The next upstream's turn, for ``routing: round_robin``.
    turn: int = 0
    #: Models (LoRA adapters) that only some upstreams list, and those upstreams; kept by
    #: ``proxy.server.scrape`` from each upstream's ``Signals.models``.
    partial: dict[str, tuple[Upstream, ...]] = field(default_factory=dict)
    #: Whether attempts are spread over several URLs (each with its own breaker).
    spread: bool = field(init=False)
    # What every request reads of ``config``, copied out once: a pydantic model's attribute
    # reads cost about ten times a slot's (its ``__getattr__`` hook), and a request made two
    # dozen of them.
    #: ``config.public_name`` and ``config.upstream_name``.
    public_name: str | None = field(init=False)
    upstream_name: str | None = field(init=False)
    #: ``config.determinism.enforce``.
    enforce: bool = field(init=False)
    #: ``config.backend_provider``; ``config.logging.include_bodies``.
    provider: str = field(init=False)
    include_bodies: bool = field(init=False)
    #: The header that names a session, where ``routing: session`` spreads over several URLs.
    session_header: str | None = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.spread = len(self.upstreams) > 1
        self.public_name = config.public_name
        self.upstream_name = config.upstream_name
        self.enforce = config.determinism.enforce
        self.provider = config.backend_provider
        self.include_bodies = config.logging.include_bodies
        self.session_header = (config.balance.session_header
                               if config.routing == "session" and self.spread else None)


    def adapters(self) -> tuple[Adapter, ...]:
        """Every adapter this backend holds (to start and close them)."""
        return tuple(u.adapter for u in self.upstreams)


class Pipeline:
    """Admission, attempts and retries for every upstream request of one application."""

    def __init__(self, metrics: Metrics, limiter: Limiter, clock: Clock = SYSTEM) -> None:
        self.metrics = metrics
        self.limiter = limiter
        self.clock = clock

    def configure(self, config: BaseConfig) -> None:
        self.limiter.configure(config.limits)

    def backend(self, config: BaseConfig, adapter: Adapter) -> Backend:
        """A backend for one ``adapter``, with its own breaker and retry policy."""
        breaker = Breaker(config.circuit, self.clock)
        policy = RetryPolicy(config.retries, config.timeouts, breaker, self.metrics, self.clock)
        return Backend(config, adapter, model_label(config), breaker, policy,
                       (Upstream("0", adapter, breaker),))

    def build(self, config: BaseConfig, session: aiohttp.ClientSession) -> Backend:
        """The backend for one model's config: its adapter, or one adapter per ``url``.

        Raises ``ConfigError`` when the adapter class cannot be imported.
        """
        cls = load_adapter_class(config)
        urls = config.urls
        if len(urls) < 2:
            return self.backend(config, cls(config, session))
        upstreams = tuple(
            Upstream(str(i), cls(config.for_url(url), session),
                     Breaker(config.circuit, self.clock), url=url, seed=balance.url_seed(url))
            for i, url in enumerate(urls)
        )
        # each upstream has its own breaker; the model's own never opens, so a request is
        # refused only when every upstream is out (see ``_attempt``)
        breaker = Breaker(CircuitSection(failures=0), self.clock)
        policy = RetryPolicy(config.retries, config.timeouts, breaker, self.metrics, self.clock)
        return Backend(config, upstreams[0].adapter, model_label(config), breaker, policy,
                       upstreams)

    def admitted(self, backend: Backend) -> Admission:
        """``async with`` it around a request's upstream work: raises ``Unavailable`` while
        the circuit is open and ``Overloaded`` when the queue is full."""
        return Admission(self.limiter, backend)

    async def call(self, backend: Backend, job: Job, exchange: Exchange) -> UpstreamResponse:
        """The upstream's answer to ``job`` after any retries; raises the last error."""
        now = self.clock.now
        start = now()
        try:
            response = await self._attempt(backend, job, exchange)
        except UpstreamError as exc:
            if not exc.retryable:
                raise
            first: UpstreamResponse | UpstreamError = exc
        else:
            if response.status not in RETRYABLE_STATUSES:
                return response
            first = response

        async def again() -> UpstreamResponse:
            return await self._attempt(backend, job, exchange)

        return await backend.retry.run(first, again, now() - start)

    async def _attempt(self, backend: Backend, job: Job, exchange: Exchange) -> UpstreamResponse:
        """One attempt: the first URL in turn, then on to the next while an attempt fails
        before the client has seen a byte (:class:`Verdict`). The last one's outcome is the
        attempt's. One URL is a list of one."""
        spread = backend.spread
        now = self.clock.now
        order = _order(backend, now(), job) if spread else backend.upstreams
        last = len(order) - 1
        metrics = self.metrics
        for i, upstream in enumerate(order):
            probe = False
            if spread:  # one URL's breaker was admitted at the door (``Admission``)
                try:
                    probe = upstream.breaker.admit()
                except Unavailable:
                    if i == last:
                        raise
                    continue
                upstream.active += 1
            held = False
            start = now()
            exchange.attempts += 1
            try:
                try:
                    response = await upstream.adapter.send(job)
                    if not response.stream and response.body is None:
                        await response.buffer()
                except UpstreamError as exc:
                    exchange.upstream_seconds += now() - start
                    metrics.count_upstream_error(exc.code or "upstream_error")
                    self._record(backend, upstream, judge_error(exc))
                    if i == last or not exc.retryable:
                        metrics.up = False
                        raise
                    continue
                elapsed = now() - start
                exchange.upstream_seconds += elapsed
                verdict = judge(response.status)
                breaker = upstream.breaker
                # an answer from a healthy lone URL changes nothing: not even a call
                if (verdict is not ANSWERED or spread or breaker.failures
                        or breaker.state is not State.CLOSED):
                    self._record(backend, upstream, verdict)
                metrics.observe_upstream(job.endpoint, elapsed)
                if verdict.fail_over and i < last:
                    await response.release()
                    continue
                metrics.up = verdict.up
                if spread and response.stream:
                    _hold(response, upstream)
                    held = True
                return response
            finally:
                if spread and not held:
                    upstream.active -= 1
                if probe:
                    upstream.breaker.abandon()
        raise AssertionError("unreachable: the last upstream returns or raises")  # pragma: no cover

    def _record(self, backend: Backend, upstream: Upstream, verdict: Verdict) -> None:
        """What a verdict does to the upstream's breaker, cool-down and metrics."""
        breaker = upstream.breaker
        if verdict.failed:
            breaker.failure()
        elif breaker.failures or breaker.state is not State.CLOSED:
            breaker.success()
        if backend.spread:
            bad = verdict.failed or verdict.fail_over
            if bad:
                upstream.cool_until = self.clock.now() + backend.config.circuit.cooldown
            self.metrics.count_attempt(backend.model_label, upstream.label,
                                       "failed" if bad else "ok")


def _order(backend: Backend, now: float, job: Job) -> list[Upstream]:
    """The upstreams in the order to try: ready ones by ``routing``, cooling ones last; only
    those that list the model, when only some do (``Backend.partial``)."""
    upstreams = backend.upstreams
    if backend.partial and job.upstream_model in backend.partial:
        upstreams = backend.partial[job.upstream_model]
    routing = backend.config.routing
    if routing == "least_busy":
        ranked = sorted(upstreams, key=lambda u: u.active)
    elif routing == "round_robin":
        turn = backend.turn % len(upstreams)
        backend.turn = turn + 1
        ranked = [*upstreams[turn:], *upstreams[:turn]]
    else:
        options = backend.config.balance
        ready = [u for u in upstreams if u.cool_until <= now]
        key = balance.key(job, options, routing == "session")
        ranked = balance.rank(ready, key, options) if ready else []
        if len(ranked) == len(upstreams):
            return ranked
        return ranked + sorted((u for u in upstreams if u.cool_until > now),
                               key=lambda u: u.cool_until)
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
        if limiter.active < limiter.max_active and not limiter.waiters:
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
