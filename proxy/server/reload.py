"""Hot reload: SIGHUP, or a changed file when ``watch: true``, swaps in a new configuration.

The files watched are the config file and every ``*_file`` secret it was read with
(``BaseConfig.secret_files``), each through its symlinks: a Kubernetes Secret mount, whose
``..data`` link is swapped by a rename to a new directory, is seen as the change it is.

The watcher looks every ``WATCH_INTERVAL`` (0.75 s). A file that was replaced (its resolved
path or its inode changed: a Secret mount's swap, a new file renamed over the old one) is
complete the moment it appears, and is applied at that look. A file rewritten in place may be
caught half-written, so it is looked at again ``SETTLE`` (0.25 s) later and applied if it has
not changed since; if it has, it is looked at again after another ``SETTLE``. So a rotated API
key, upstream credential or signing key applies within one watch interval of 1 s at most
(0.75 s until the look that sees it, plus 0.25 s for a file rewritten in place), and a file
written to while it was read is not applied (it is read again once it stays unchanged). A
secret file that has become unreadable or empty is refused as any broken edit is, and the old
value keeps serving. Every wait is on the clock the Reloader is given.

A reload reads and validates the file (``load_config``), builds and starts a new adapter, and
hands both to ``Runtime.configure``, the one reload hook of every long-lived part: new
requests use the new backend, requests in flight finish on the old one, which is closed once
its last request has left. If anything fails, nothing changes: the old configuration keeps
serving and one log line says why. Both outcomes are counted in
``model_proxy_config_reloads{result="ok"|"error"}``.

A reload runs the checks ``serve`` runs at start-up (``proxy.server.preflight``): a config
that ``serve`` would refuse (no inbound auth on a non-loopback address) is refused. Writing
the new file beside the old one and renaming it over it is the atomic way to change a watched
file, and the one to use: an editor that pauses longer than ``SETTLE`` mid-write could
otherwise leave a partial file in place that long, and a file deleted and then written anew
has a new inode, so it is taken as replaced and may be read before it is whole (it is read
again once it is, as a file rewritten in place).

Some settings cannot change in a running process (the bound address, the header size limit,
logging); a change to them is reported and the running value kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from proxy.adapters.base import Adapter
from proxy.config import BaseConfig, load_config
from proxy.errors import ConfigError, ProxyError, reason
from proxy.server.preflight import check_servable
from proxy.server.runtime import Runtime
from proxy.server.tasks import running
from proxy.upstream.clock import SYSTEM, Clock
from proxy.upstream.pipeline import Backend
from proxy.upstream.routing import Served

log = logging.getLogger("model_proxy")

#: How often the watched files are looked at, in seconds.
WATCH_INTERVAL = 0.75
#: Seconds a file rewritten in place must stay unchanged before it is read: the second look.
SETTLE = 0.25
#: A file's resolved path, modification and change times (ns), size and inode: what tells
#: that it changed (the change time, so that a file made unreadable is looked at again).
FileStamp = tuple[str, int, int, int, int]
#: The stamps of the watched files, in order; ``None`` for one that cannot be looked at.
Stamp = tuple[FileStamp | None, ...]
#: How often retired backends are looked at to see whether their last request has left.
RETIRE_INTERVAL = 0.5


class Reloader:
    """Reloads the application's configuration; one per application under ``RELOADER``."""

    def __init__(self, runtime: Runtime, *, clock: Clock = SYSTEM) -> None:
        self.runtime = runtime
        self.watch_interval = WATCH_INTERVAL
        #: Seconds a file rewritten in place must stay unchanged before it is read.
        self.settle = SETTLE
        #: Times the looks and every wait of the background task (tests pass one they move).
        self.clock = clock
        #: Looks the background task has taken; ``looked`` is set after each (tests wait on it).
        self.looks = 0
        self.looked = asyncio.Event()
        #: The watched files' stamp when an in-place change was seen, and when that was.
        self._changed: tuple[Stamp | None, float] | None = None
        #: Backends replaced by a reload that still have requests in flight.
        self.retired: list[Backend] = []
        self._lock = asyncio.Lock()
        #: Wakes the background task: for a requested reload, or to watch a new retiree.
        self._wake = asyncio.Event()
        self._requested = False
        self._stamp: Stamp | None = self._file_stamp(runtime.config)
        #: Called after each swap: parts that follow the served set (the scraper).
        self.swapped: list[Callable[[], None]] = []

    def trigger(self) -> None:
        """Ask the background task for a reload (safe to call from a signal handler)."""
        self._requested = True
        self._wake.set()

    async def reload(self) -> bool:
        """Re-read the config file and swap it in; ``False`` (old config kept) on any problem."""
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> bool:
        runtime = self.runtime
        metrics = runtime.metrics
        path = runtime.config_path
        if runtime.shutting_down:
            return False
        if path is None:
            log.warning("config reload ignored: the configuration was not read from a file")
            metrics.count_reload("error")
            return False
        running_config = runtime.config
        self._stamp = self._file_stamp(running_config)
        adapters: list[Adapter] = []
        try:
            # Off the event loop: a large or hostile file must not stall requests meanwhile.
            config = self._keep_fixed(await asyncio.to_thread(load_config, path))
            if self._file_stamp(running_config) != self._stamp:  # written to while it was read
                log.warning("config reload skipped: %s or a secret file changed while it was "
                            "read; it is read again once it stays unchanged", path)
                self._stamp = None  # so that a watcher reads it again once it has settled
                self._changed = (self._file_stamp(running_config), self.clock.now())
                return False
            # the files this config was read with, as read: the ones a watcher looks at next
            stamp = self._file_stamp(config)
            # exactly what serve checks at start-up, on the address it is bound to
            exposure = check_servable(config, path)
            if exposure:
                log.warning(exposure)
            backends = await self._start_backends(config, adapters)
        except (ConfigError, ProxyError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [exc.message]
            log.error("config reload rejected, still serving the previous config: %s",
                      " | ".join(problems))
            metrics.count_reload("error")
            for adapter in adapters:
                await _close_quietly(adapter)
            return False
        except Exception as exc:  # whatever it is, the reload task and the old config live on
            log.error("config reload rejected, still serving the previous config: %s: %s",
                      reason(exc), str(exc).splitlines()[0][:200] if str(exc) else "")
            metrics.count_reload("error")
            for adapter in adapters:
                await _close_quietly(adapter)
            return False
        old = runtime.served.backends
        runtime.configure(config, Served(backends))
        for follow in self.swapped:
            follow()
        self._stamp = stamp
        self.retired.extend(old)
        self._wake.set()
        metrics.count_reload("ok")
        log.info("config reloaded from %s (%s)", path, config.backend_provider)
        await self._close_idle()
        return True

    async def _start_backends(self, config: BaseConfig, adapters: list[Adapter]) -> list[Backend]:
        """Build and start ``config``'s backends, each adapter taking over what its predecessor
        keeps (pooled connections, readings); every adapter started is added to ``adapters``,
        so that a failure part-way can close them."""
        runtime = self.runtime
        backends = [runtime.pipeline.build(entry, runtime.session) for entry in config.entries]
        previous = {b.config.public_name: b for b in runtime.served.backends}
        for backend in backends:
            before = previous.get(backend.config.public_name)
            if before is None and len(backends) == 1 == len(previous):
                before = runtime.backend  # one model renamed: still the same upstream
            for i, adapter in enumerate(backend.adapters()):
                if before is not None and i < len(before.adapters()):
                    adapter.take_over(before.adapters()[i])
                adapters.append(adapter)
                await adapter.start()
        for adapter in adapters:
            await adapter.until_started()
        return backends

    def _keep_fixed(self, config: BaseConfig) -> BaseConfig:
        """Keep the settings a running process cannot change, saying which ones were asked."""
        running = self.runtime.config
        fixed = {
            "server.host": (running.server.host, config.server.host),
            "server.port": (running.server.port, config.server.port),
            "server.keepalive_timeout": (running.server.keepalive_timeout,
                                         config.server.keepalive_timeout),
            "limits.max_header_bytes": (running.limits.max_header_bytes,
                                        config.limits.max_header_bytes),
            "logging": (running.logging, config.logging),
            "node": (running.node, config.node),  # its routes and registry task are built once
        }
        changed = [key for key, (old, new) in fixed.items() if old != new]
        if not changed:
            return config
        log.warning("config reload: %s cannot change while running; keeping the running "
                    "value (restart to apply)", ", ".join(changed))
        server = config.server.model_copy(
            update={"host": running.server.host, "port": running.server.port,
                    "keepalive_timeout": running.server.keepalive_timeout}
        )
        limits = config.limits.model_copy(
            update={"max_header_bytes": running.limits.max_header_bytes}
        )
        return config.model_copy(
            update={"server": server, "limits": limits, "logging": running.logging,
                    "node": running.node}
        )

    async def run(self) -> None:
        """Background task: reload on ``trigger`` or a changed watched file; close retirees."""
        while True:
            watching = self.runtime.config.watch
            wait = self._next_look() if watching else None
            if self.retired:
                wait = min(wait if wait is not None else RETIRE_INTERVAL, RETIRE_INTERVAL)
            woken = await self._wait(wait)
            self._wake.clear()
            if self._requested:
                self._requested = False
                await self.reload()
            elif watching and not woken:  # woken early: only to take a new wait
                await self.poll()
                self.looks += 1
                self.looked.set()
                self.looked.clear()
            await self._close_idle()

    def _next_look(self) -> float:
        """Seconds until the next look: ``settle`` after an in-place change, else the interval."""
        if self._changed is None:
            return self.watch_interval
        return max(0.0, self._changed[1] + self.settle - self.clock.now())

    async def _wait(self, seconds: float | None) -> bool:
        """Until ``seconds`` of the clock have passed (``None``: for ever) or ``_wake`` is set;
        whether it was woken."""
        if seconds is None or self._wake.is_set():
            await self._wake.wait()
            return True
        sleep = asyncio.ensure_future(self.clock.sleep(seconds))
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleep, wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (sleep, wake):
                waiting.cancel()
            await asyncio.gather(sleep, wake, return_exceptions=True)
        return sleep.cancelled()

    async def poll(self) -> bool:
        """One look at the watched files; whether it reloaded them.

        A file replaced since the running config was read (its resolved path or inode changed:
        a rename over it, a Secret mount's ``..data`` swap) was whole when it appeared, and is
        read at once. A file rewritten in place may be caught half-written: it is read once a
        look ``settle`` seconds of ``clock`` later finds it unchanged (size, times, inode)."""
        stamp, now = self._file_stamp(self.runtime.config), self.clock.now()
        if stamp == self._stamp:
            self._changed = None
            return False
        if self._changed is not None and self._changed[0] == stamp:
            if now - self._changed[1] < self.settle:
                return False  # looked at again before it could settle
        elif not _replaced(self._stamp, stamp):
            self._changed = (stamp, now)  # changed in place since the last look: let it settle
            return False
        self._changed = None
        return await self.reload()

    async def _close_idle(self) -> None:
        for backend in [b for b in self.retired if b.active == 0]:
            self.retired.remove(backend)
            for adapter in backend.adapters():
                await _close_quietly(adapter)

    async def close(self) -> None:
        """Close every retired adapter (at shutdown, after the last request)."""
        retired, self.retired = self.retired, []
        for backend in retired:
            for adapter in backend.adapters():
                await _close_quietly(adapter)

    def _file_stamp(self, config: BaseConfig) -> Stamp | None:
        """The stamp of the config file and of the secret files ``config`` was read with."""
        path = self.runtime.config_path
        if path is None:
            return None
        return tuple(_stamp(name) for name in (path, *config.secret_files))


def _stamp(path: str) -> FileStamp | None:
    try:
        # through symlinks: a Secret mount's files are links into a directory swapped whole
        resolved = os.path.realpath(path)
        st = os.stat(resolved)
    except OSError:
        return None
    # the inode too: a file renamed over the old one may keep its size and time
    return resolved, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


def _replaced(before: Stamp | None, now: Stamp | None) -> bool:
    """Whether every watched file that changed between the two stamps was replaced whole
    (a new resolved path or inode): nothing changed in place that could be half-written."""
    if before is None or now is None or len(before) != len(now):
        return False
    changed = [(old, new) for old, new in zip(before, now, strict=True) if old != new]
    return bool(changed) and all(
        old is not None and new is not None and (old[0] != new[0] or old[4] != new[4])
        for old, new in changed
    )


async def _close_quietly(adapter: Adapter) -> None:
    try:
        await adapter.close()
    except Exception:
        log.exception("closing the previous %s adapter failed", adapter.name or "upstream")


RELOADER = web.AppKey("reloader", Reloader)


async def reloading(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` entry: the reload task runs while the application does."""
    reloader = app[RELOADER]
    try:
        async with running(reloader.run(), "config-reload"):
            yield
    finally:
        await reloader.close()


__all__ = ["RELOADER", "Reloader", "reloading"]
