"""When and how long to wait before another upstream attempt (``retries:``), with tenacity.

Retried: an ``UpstreamError`` with ``retryable`` set (refused, reset or timed out before the
first byte) and an answer whose status is in ``RETRYABLE_STATUSES`` (429/502/503/504). Waits
are exponential with full jitter, or the upstream's ``Retry-After`` when it gives one. A
``Retry-After`` beyond ``retry_after_cap`` means "not soon": the proxy gives up at once and
relays that answer. Attempts stop at ``attempts``, before a wait would pass the request's
deadline (the smaller of ``retries.total`` and ``timeouts.total``), or when the circuit opens.
After the last attempt the last answer is relayed as it is, or the last error raised.

Only the pipeline calls this, and only for an attempt whose response the client has not seen
a byte of. The first attempt runs outside tenacity, so the success path costs nothing here;
a failed first attempt hands its outcome to :meth:`RetryPolicy.run`, whose tenacity loop
(``async for attempt in AsyncRetrying(...)``) takes it as attempt 1. The loop is built per
retry run, so each run's deadline is its own and nothing travels through tenacity's call
arguments. This module holds the project's only ``Retry-After`` parser.
"""


from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_random_exponential

from proxy.adapters.base import UpstreamResponse
from proxy.config import RetriesSection, TimeoutsSection
from proxy.errors import RETRYABLE_STATUSES, UpstreamError, UpstreamTimeout
from proxy.metrics import Metrics
from proxy.upstream.breaker import Breaker
from proxy.upstream.clock import SYSTEM, Clock

Attempt = Callable[[], Awaitable[UpstreamResponse]]


class RetryPolicy:
    """Built once per backend from ``retries:`` and ``timeouts:``; shared by all requests."""

    def __init__(
        self, retries: RetriesSection, timeouts: TimeoutsSection, breaker: Breaker,
        metrics: Metrics, clock: Clock = SYSTEM,
    ) -> None:
        self.clock = clock
        self.cap = retries.retry_after_cap
        self.attempts = retries.attempts
        self.budget = min(retries.total, timeouts.total)
        self.breaker = breaker
        self.metrics = metrics
        self._backoff = wait_random_exponential(
            multiplier=retries.backoff_initial, max=retries.backoff_max
        )

    async def run(
        self, first: UpstreamResponse | UpstreamError, again: Attempt, elapsed: float
    ) -> UpstreamResponse:
        """Retry after a failed first attempt (``first``, which took ``elapsed`` seconds).

        ``again`` makes one more attempt. Returns the answer to relay; raises the last error.
        """
        clock = self.clock
        deadline = clock.now() - elapsed + self.budget

        retrying = AsyncRetrying(
            sleep=clock.sleep,
            stop=stop_after_attempt(self.attempts) | _PastDeadline(clock, deadline),
            wait=self._wait,
            retry=self._should_retry,
            before_sleep=_discard,
            retry_error_callback=_last_outcome,
        )
        outcome: UpstreamResponse | UpstreamError | None = first
        last = None
        async for attempt in retrying:
            answer = None
            with attempt:
                if outcome is not None:
                    taken, outcome = outcome, None
                    if isinstance(taken, UpstreamError):
                        raise taken
                    answer = taken
                else:
                    answer = await self._again(again, deadline)
            if answer is not None:  # an error raised above is the attempt's outcome instead
                attempt.retry_state.set_result(answer)
                last = answer
        assert last is not None  # the loop ends on an answer; a last error is raised
        return last

    async def _again(self, again: Attempt, deadline: float) -> UpstreamResponse:
        self.metrics.count_retry()
        try:
            async with asyncio.timeout(deadline - self.clock.now()):
                return await again()
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"the upstream gave no usable answer within {self.budget:g} s, retries included"
            ) from exc

    def _should_retry(self, state: RetryCallState) -> bool:
        if self.breaker.is_open:
            return False
        outcome = state.outcome
        assert outcome is not None
        if outcome.failed:
            exc = outcome.exception()
            if not (isinstance(exc, UpstreamError) and exc.retryable):
                return False
            after = _error_retry_after(exc)
        else:
            response: UpstreamResponse = outcome.result()
            if response.status not in RETRYABLE_STATUSES:
                return False
            after = retry_after(response.headers)
        return after is None or after <= self.cap

    def _wait(self, state: RetryCallState) -> float:
        outcome = state.outcome
        assert outcome is not None
        if outcome.failed:
            exc = outcome.exception()
            after = _error_retry_after(exc) if isinstance(exc, UpstreamError) else None
        else:
            after = retry_after(outcome.result().headers)
        return after if after is not None else float(self._backoff(state))


def _error_retry_after(exc: UpstreamError) -> float | None:
    """The wait an upstream error asks for: its own, else its answer's ``Retry-After`` (then
    kept on the error, so that the client is told the same if retries end here)."""
    if exc.retry_after is None and exc.headers is not None:
        exc.retry_after = retry_after(exc.headers)
    return exc.retry_after


class _PastDeadline(stop_base):
    """Stop when the coming wait would end past this run's deadline (``clock`` time)."""

    def __init__(self, clock: Clock, deadline: float) -> None:
        self.clock = clock
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return self.clock.now() + state.upcoming_sleep >= self.deadline


async def _discard(state: RetryCallState) -> None:
    """Before a wait: free the answer that is being retried (its body is never relayed)."""
    outcome = state.outcome
    if outcome is not None and not outcome.failed:
        response: UpstreamResponse = outcome.result()
        await response.release()


def _last_outcome(state: RetryCallState) -> Any:
    """Out of attempts: end the loop on the last answer, or raise the last error."""
    assert state.outcome is not None
    return state.outcome.result()


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), if it has one."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)
