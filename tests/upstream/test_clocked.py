"""The breaker, the limiter's queue and the retry policy on a clock the test moves: the exact
sequence of what they decide, with no sleeping and no wall-clock bound."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from proxy.adapters.base import UpstreamResponse
from proxy.config import CircuitSection, LimitsSection, RetriesSection, TimeoutsSection
from proxy.errors import Overloaded, Unavailable, UpstreamError
from proxy.metrics import Metrics
from proxy.upstream.breaker import Breaker, State
from proxy.upstream.limiter import Limiter
from proxy.upstream.retry import RetryPolicy
from tests.fakes.clock import FakeClock


async def settle() -> None:
    """Let every task that can run, run (the loop's turns, not time)."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_breaker_opens_cools_down_probes_and_closes() -> None:
    clock = FakeClock()
    breaker = Breaker(CircuitSection(failures=2, cooldown=10), clock)
    assert breaker.admit() is False
    breaker.failure()
    assert breaker.state is State.CLOSED
    breaker.failure()
    assert breaker.state is State.OPEN
    with pytest.raises(Unavailable) as caught:
        breaker.admit()
    assert caught.value.retry_after == 10
    clock.advance(9.5)
    with pytest.raises(Unavailable) as caught:
        breaker.admit()
    assert caught.value.retry_after == 1.0  # never less than a second
    assert breaker.reason() == ("upstream circuit open after 2 consecutive failures; "
                                "next probe in 0 s")
    clock.advance(0.5)
    assert breaker.admit() is True  # the probe
    with pytest.raises(Unavailable):
        breaker.admit()  # beside the probe
    breaker.failure()  # the probe failed: open again, for a whole cool-down
    assert breaker.state is State.OPEN
    clock.advance(9.9)
    with pytest.raises(Unavailable):
        breaker.admit()
    clock.advance(0.1)
    assert breaker.admit() is True
    breaker.success()
    assert breaker.state is State.CLOSED and breaker.admit() is False


def test_an_abandoned_probe_lets_the_next_request_probe() -> None:
    clock = FakeClock()
    breaker = Breaker(CircuitSection(failures=1, cooldown=5), clock)
    breaker.failure()
    clock.advance(5)
    assert breaker.admit() is True
    breaker.abandon()
    assert breaker.admit() is True


async def test_the_queue_times_out_on_the_clock() -> None:
    clock = FakeClock()
    limiter = Limiter(LimitsSection(max_concurrency=1, max_queue=1, queue_timeout=3), clock)
    await limiter.acquire()
    waiting = asyncio.ensure_future(limiter.acquire())
    await settle()
    assert limiter.waiting == 1 and clock.sleeping == 1
    with pytest.raises(Overloaded, match="limit of 1 concurrent requests and 1 waiting"):
        await limiter.acquire()  # the queue is full: refused at once
    clock.advance(2.9)
    await settle()
    assert not waiting.done()
    clock.advance(0.1)
    with pytest.raises(Overloaded, match="waited 3 s"):
        await waiting
    assert (limiter.active, limiter.waiting, clock.sleeping) == (1, 0, 0)


async def test_a_released_slot_goes_to_the_oldest_waiter_before_its_time_is_up() -> None:
    clock = FakeClock()
    limiter = Limiter(LimitsSection(max_concurrency=1, max_queue=2, queue_timeout=3), clock)
    await limiter.acquire()
    first = asyncio.ensure_future(limiter.acquire())
    second = asyncio.ensure_future(limiter.acquire())
    await settle()
    limiter.release()
    await first
    assert not second.done() and limiter.active == 1
    clock.advance(3)
    with pytest.raises(Overloaded):
        await second
    limiter.release()
    assert limiter.active == 0


def answer(status: int, retry_after: str | None = None) -> UpstreamResponse:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return UpstreamResponse(status, headers, stream=False, body=b"{}")


async def test_retries_wait_what_the_upstream_asks_within_the_budget() -> None:
    clock = FakeClock(auto=True)
    metrics = Metrics(CollectorRegistry())
    policy = RetryPolicy(
        RetriesSection(attempts=10, total=5, backoff_initial=0.1, backoff_max=0.2),
        TimeoutsSection(), Breaker(CircuitSection(failures=0), clock), metrics, clock)
    answers = iter([answer(503, "2"), answer(503, "2"), answer(200)])

    async def again() -> UpstreamResponse:
        return next(answers)

    # first at 0 s, then 2 s and 4 s; the next wait would end past the 5 s budget
    last = await policy.run(answer(503, "2"), again, 0.0)
    assert clock.slept == [2.0, 2.0]
    assert last.status == 503
    clock2 = FakeClock(auto=True)
    policy2 = RetryPolicy(RetriesSection(attempts=3, backoff_initial=0.1, backoff_max=0.2),
                          TimeoutsSection(), Breaker(CircuitSection(failures=0), clock2),
                          metrics, clock2)
    errors = iter([UpstreamError("refused", retryable=True)])

    async def fails_then_answers() -> UpstreamResponse:
        error = next(errors, None)
        if error is not None:
            raise error
        return answer(200)

    done = await policy2.run(UpstreamError("refused", retryable=True), fails_then_answers, 0.0)
    assert done.status == 200
    assert len(clock2.slept) == 2 and all(0 <= s <= 0.2 for s in clock2.slept)
