"""Opt-in memory tracing for soak runs: ``MODEL_PROXY_TRACEMALLOC=DIR``.

With the variable set, the serving process starts ``tracemalloc`` (``TRACE_FRAMES`` frames
per allocation) once it is serving, and on each SIGUSR1 writes a snapshot to
``DIR/snapshot-NNNN.tracemalloc`` (written under a temporary name, then renamed, so a reader
never sees half a file). ``bench.soak`` compares the snapshots. Unset, nothing happens.
Tracing slows the proxy several times over: never for production.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import tracemalloc
from pathlib import Path

log = logging.getLogger("model_proxy")

ENV = "MODEL_PROXY_TRACEMALLOC"
#: Frames kept per traced allocation: enough to tell the proxy's call sites apart.
TRACE_FRAMES = 12


def trace_memory(loop: asyncio.AbstractEventLoop) -> None:
    """Start tracing and dump a snapshot on SIGUSR1, when ``MODEL_PROXY_TRACEMALLOC`` is set."""
    where = os.environ.get(ENV)
    if not where:
        return
    folder = Path(where)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = itertools.count()

    def dump() -> None:
        path = folder / f"snapshot-{next(numbers):04d}.tracemalloc"
        partial = path.with_suffix(".partial")
        tracemalloc.take_snapshot().dump(str(partial))
        partial.rename(path)

    tracemalloc.start(TRACE_FRAMES)
    loop.add_signal_handler(signal.SIGUSR1, dump)
    log.warning("tracing memory allocations (%s): snapshots to %s on SIGUSR1", ENV, folder)
