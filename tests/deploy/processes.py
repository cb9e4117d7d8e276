"""Programs the deployment tests start (Prometheus, nginx, the proxy), stopped afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path


@asynccontextmanager
async def running(log: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``args`` running, its output in ``log``; stopped afterwards if still running (SIGTERM,
    then SIGKILL if it has not ended within 10 s)."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(*args, stdout=out, stderr=out)
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
