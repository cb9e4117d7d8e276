"""A circuit breaker per upstream: stop sending work to an upstream that keeps failing.

Closed, it counts consecutive failed attempts; at ``circuit.failures`` it opens and every
request is answered 503 at once (``Retry-After`` = the rest of the cool-down). When the
cool-down is over it is half-open: exactly one request goes through as a probe while the
others still get 503; the probe's first attempt closes the circuit on success and re-opens it
on failure. A probe that ends without an outcome (the client left) frees the probe slot.
"""

from __future__ import annotations

from enum import IntEnum

from proxy.config import CircuitSection
from proxy.errors import Unavailable
from proxy.upstream.clock import SYSTEM, Clock


class State(IntEnum):
    """Values of the ``model_proxy_circuit_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    """One upstream's circuit; the pipeline calls ``admit`` per request and records attempts."""

    __slots__ = ("clock", "cooldown", "failures", "opened_until", "probing", "state",
                 "threshold")

    def __init__(self, settings: CircuitSection, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self.threshold = settings.failures
        self.cooldown = settings.cooldown
        self.state = State.CLOSED
        self.failures = 0
        self.opened_until = 0.0
        self.probing = False

    def admit(self) -> bool:
        """Let a request through or raise ``Unavailable``; ``True`` means it is the probe."""
        if self.state is State.CLOSED:
            return False
        now = self.clock.now()
        if self.state is State.OPEN and now >= self.opened_until:
            self.state = State.HALF_OPEN
        if self.state is State.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        raise Unavailable(
            f"the upstream failed {self.failures} times in a row; not sending it requests "
            "for a while",
            code="circuit_open", retry_after=max(self.opened_until - now, 1.0),
        )

    @property
    def is_open(self) -> bool:
        """Whether further attempts (retries) should stop now."""
        return self.state is State.OPEN

    def success(self) -> None:
        if self.failures or self.state is not State.CLOSED:
            self.failures = 0
            self.state = State.CLOSED
            self.probing = False

    def failure(self) -> None:
        if self.threshold == 0:
            return
        self.failures += 1
        if self.state is State.HALF_OPEN or self.failures >= self.threshold:
            self.state = State.OPEN
            self.opened_until = self.clock.now() + self.cooldown
            self.probing = False

    def abandon(self) -> None:
        """The probe ended without an outcome: let the next request probe instead."""
        if self.state is State.HALF_OPEN:
            self.probing = False

    def reason(self) -> str | None:
        """Why the circuit keeps requests out, for ``/readyz``; ``None`` when closed."""
        if self.state is State.CLOSED:
            return None
        if self.state is State.HALF_OPEN:
            return "upstream circuit half-open: probing whether the upstream has recovered"
        left = max(self.opened_until - self.clock.now(), 0.0)
        return (f"upstream circuit open after {self.failures} consecutive failures; "
                f"next probe in {left:.0f} s")
