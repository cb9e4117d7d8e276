"""Request ids: the client's ``X-Request-ID`` when it is fit for a log line, else one made here.

The edge gives every request an id before anything else runs and sets it as the current
request's (:data:`CURRENT`, a context variable, so every log line written while the request
is handled carries it: ``proxy.server.logs``). The id is answered in ``X-Request-ID`` on every
response, sent upstream, written in the access line and put in error bodies.

Made ids are a random per-process prefix and a counter: unique across replicas and restarts
in practice, and far cheaper than random bytes per request.
"""

from __future__ import annotations

import itertools
import os
from contextvars import ContextVar

from multidict import istr

#: As an ``istr``, header lookups and stores skip case folding.
HEADER = istr("X-Request-ID")
#: Longest client id that is kept; a longer one is replaced.
MAX_LENGTH = 128

#: The id of the request being handled in this context (``""`` outside requests).
CURRENT: ContextVar[str] = ContextVar("request_id", default="")


def fit(value: str) -> bool:
    """Whether a client's id may be used as it is: 1 to 128 visible ASCII characters."""
    # isprintable admits spaces and non-ASCII letters; isascii is O(1) on a str
    return (
        0 < len(value) <= MAX_LENGTH
        and value.isascii()
        and value.isprintable()
        and " " not in value
    )


class RequestIds:
    """Makes ids: ``<12 random hex digits>-<counter>``."""

    __slots__ = ("_counter", "prefix")

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex() + "-"
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self.prefix}{next(self._counter)}"

    def of(self, given: str | None) -> str:
        """``given`` when it is fit, else a new id."""
        if given is not None and fit(given):
            return given
        return f"{self.prefix}{next(self._counter)}"
