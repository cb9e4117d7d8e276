"""Which backend serves a request: the table of public names and aliases of the served set.

A :class:`Served` is built whole from one configuration and swapped whole on reload
(``Runtime.configure``); a request looks its backend up once and keeps it to the end, so
in-flight requests finish on the set they started on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from proxy.errors import NotFound
from proxy.upstream.breaker import State
from proxy.upstream.pipeline import Backend

#: The ``model`` metric label of a request for a model no backend serves.
UNROUTED = "none"


class Served:
    """The backends of one configuration, by the names clients use.

    With one model (the single-model file) every request goes to it, and the backend's own
    name check answers a wrong ``model``; with ``models:``, each name and alias leads to its
    backend and any other name is a 404 listing the served ones.
    """

    __slots__ = ("backends", "names", "only", "routes")

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = tuple(backends)
        routes: dict[str, Backend] = {}
        for backend in self.backends:
            model = backend.config.model
            public = backend.config.public_name
            for name in model.names or ((public,) if public else ()):
                routes[name] = backend
        self.routes: Mapping[str, Backend] = routes
        #: The one backend of a single-model configuration, else ``None``.
        self.only = self.backends[0] if len(self.backends) == 1 else None
        #: Public names (no aliases), in the YAML's order, for messages.
        self.names = tuple(b.config.public_name or b.model_label for b in self.backends)

    def route(self, model: str) -> Backend:
        """The backend for a requested name; ``NotFound`` when none serves it."""
        backend = self.routes.get(model)
        if backend is not None:
            return backend
        served = ", ".join(repr(n) for n in self.names)
        raise NotFound(
            f"model {model[:200]!r} is not served here; this node serves {served}",
            param="model", code="model_not_found",
        )

    def circuit_state(self) -> State:
        """The worst circuit of all backends and their upstreams (for the gauge)."""
        worst = State.CLOSED
        for backend in self.backends:
            for breaker in (backend.breaker, *(u.breaker for u in backend.upstreams)):
                worst = max(worst, breaker.state)
        return worst
