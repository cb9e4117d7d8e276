"""Logging set-up: one stderr handler, text or JSON lines, and a cheap access log."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.config import LoggingSection

log = logging.getLogger("model_proxy")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(settings: LoggingSection) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # aiohttp's own access logger is replaced by ours; its errors still reach the root logger.
    logging.getLogger("aiohttp.access").propagate = False


class AccessLines:
    """The access log: one short line per request, formatted cheaply, written in batches.

    Python's logging costs more per request than the rest of the proxy's own work, so access
    lines bypass it: the timestamp is formatted once per second and lines reach stderr at most
    ``FLUSH_SECONDS`` later (or every ``FLUSH_LINES`` lines); :meth:`flush` at shutdown. The
    format matches the other log lines (text or JSON).
    """

    FLUSH_LINES = 64
    FLUSH_SECONDS = 0.5

    def __init__(self, settings: LoggingSection, stream: TextIO | None = None) -> None:
        self.enabled = settings.access_log and logging.INFO >= logging.getLevelName(
            settings.level.upper()
        )
        self.json = settings.format == "json"
        self._stream = stream or sys.stderr
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def add(self, method: str, path: str, status: int, seconds: float) -> None:
        now = time.time()
        # whole milliseconds: the event loop's clock (uvloop) has no finer resolution
        message = f"{method} {path} {status} {round(seconds * 1000)}ms"
        if self.json:
            line = orjson.dumps({"ts": round(now, 3), "level": "info",
                                 "logger": "model_proxy.access", "msg": message}).decode()
        else:
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            line = (f"{self._stamp},{int((now - second) * 1000):03d} INFO "
                    f"model_proxy.access: {message}")
        lines = self._lines
        lines.append(line)
        if len(lines) >= self.FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            self._stream.write("\n".join(self._lines) + "\n")
            self._stream.flush()
            self._lines.clear()


class AccessLogger(AbstractAccessLogger):
    """aiohttp's per-connection hook; ``logger`` is the shared :class:`AccessLines`."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, seconds: float) -> None:
        lines: AccessLines = self.logger  # type: ignore[assignment]
        # raw_path: percent-escapes stay escaped (no newlines in the log); the query is left
        # out, as it may carry a credential.
        lines.add(request.method, request.raw_path.partition("?")[0][:200], response.status,
                  seconds)

    @property
    def enabled(self) -> bool:
        lines: AccessLines = self.logger  # type: ignore[assignment]
        return lines.enabled
