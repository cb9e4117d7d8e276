"""Opt-in memory diagnostics for soak runs (``bench.soak``); never for production.

``MODEL_PROXY_TRACEMALLOC=DIR``: the serving process starts ``tracemalloc``
(``TRACE_FRAMES`` frames per allocation) once it is serving, and on each SIGUSR1 writes a
snapshot to ``DIR/snapshot-NNNN.tracemalloc`` (under a temporary name, then renamed, so a
reader never sees half a file). Tracing slows the proxy several times over.

``MODEL_PROXY_MALLOC_TRIM=1``: on each SIGUSR2 the process writes Python's own allocator
statistics to stderr (``sys._debugmallocstats``: arenas, blocks in use and free; none while
tracing, which replaces that allocator), then asks the C allocator to hand its free memory
back to the system (glibc's ``malloc_trim(0)``), so that resident memory the allocators
merely keep can be told from memory in use.

With neither set, nothing happens.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import tracemalloc
from pathlib import Path

log = logging.getLogger("model_proxy")

ENV = "MODEL_PROXY_TRACEMALLOC"
TRIM_ENV = "MODEL_PROXY_MALLOC_TRIM"
#: Frames kept per traced allocation: enough to tell the proxy's call sites apart.
TRACE_FRAMES = 12


def trace_memory(loop: asyncio.AbstractEventLoop) -> None:
    """Install the diagnostics the environment asks for (see the module's docstring)."""
    where = os.environ.get(ENV)
    if where:
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
    if os.environ.get(TRIM_ENV) == "1":
        import ctypes  # here: imported by every process, used by few
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"))

        def trim() -> None:
            sys._debugmallocstats()
            libc.malloc_trim(0)

        loop.add_signal_handler(signal.SIGUSR2, trim)
        log.warning("malloc_trim(0) on SIGUSR2 (%s)", TRIM_ENV)
