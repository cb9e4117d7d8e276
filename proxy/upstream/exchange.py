"""What one request learns on its way through the proxy, in one object.

The edge makes an :class:`Exchange` for every request and hands it to the handler; a handler
that forwards puts the job in it, the pipeline adds what its attempts cost, the relay what the
answer carried. As the handler returns, the edge reads it for the request's metrics and the
access line. Nothing per-request is written on shared objects (the application's
``Runtime``, a backend, an adapter), so no two requests can see each other's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.adapters.base import Job, Usage


class Exchange:
    """One request's own state (all times from ``time.perf_counter``).

    - ``request_id``: the request's id, as logged and sent upstream.
    - ``model_label``: the ``model`` metric label of the backend the request went to (``""``:
      the edge uses the current backend's; a configured name, never a client's input).
    - ``job``: what was sent upstream, once a route made it.
    - ``upstream_seconds``: time spent waiting on the upstream (attempts, then the relay's
      reads); ``-1`` while nothing was forwarded.
    - ``attempts``: upstream attempts made; ``provider``: the backend provider it went to.
    - ``handed_on``: when the job was handed on, its body read; ``ttfb``: seconds from then to
      a stream's first chunk written (``-1``: not a stream).
    - ``usage``: the tokens the answer reported; ``answer``: its first bytes, kept only when
      the operator logs bodies (``logging.include_bodies``).
    """

    __slots__ = ("answer", "attempts", "handed_on", "job", "model_label", "provider",
                 "request_id", "ttfb", "upstream_seconds", "usage")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.model_label = ""
        self.job: Job | None = None
        self.upstream_seconds = -1.0
        self.attempts = 0
        self.provider = ""
        self.handed_on = 0.0
        self.ttfb = -1.0
        self.usage: Usage | None = None
        self.answer: bytearray | None = None
