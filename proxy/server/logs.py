"""Logging set-up: one stderr handler, text or JSON lines, and a cheap access log.

``logging.format`` is ``text``, ``json`` or ``auto`` (the default: text when stderr is a
terminal, JSON lines otherwise — a container's log collector gets JSON, a person at a terminal
reads text). Every line written while a request is handled carries its id
(``proxy.server.requestid``): ``request_id`` in JSON, `` request_id=...`` at the end in text.

The access line of a request, in JSON, holds what is known about it by then (see
:meth:`AccessLines.add`); it never holds a header, a credential, or the prompt or answer text
unless ``logging.include_bodies`` is on.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.config import LoggingSection
from proxy.errors import reason
from proxy.server.requestid import CURRENT
from proxy.server.runtime import EXCHANGE
from proxy.upstream.exchange import Exchange

log = logging.getLogger("model_proxy")

#: Most bytes of a request body put in its access line when bodies are logged.
BODY_LOG_BYTES = 64 * 1024


def _json_line(entry: dict[str, Any]) -> bytes:
    """``entry`` as one JSON line; a string orjson refuses (a lone surrogate, from a path's
    undecodable bytes) is written with that character as its escape."""
    try:
        return orjson.dumps(entry)
    except orjson.JSONEncodeError:
        return orjson.dumps({
            key: value.encode("utf-8", "backslashreplace").decode()
            if isinstance(value, str) else value
            for key, value in entry.items()
        })


def _millis(seconds: float) -> float:
    """``seconds`` cut to whole milliseconds: written as ``1764590000.123``. Five times
    cheaper than ``round(seconds, 3)``, which goes through a decimal string."""
    return int(seconds * 1000) / 1000


def uses_json(settings: LoggingSection, stream: TextIO | None = None) -> bool:
    """Whether lines are JSON: ``json``, or ``auto`` on a stream that is not a terminal."""
    if settings.format != "auto":
        return settings.format == "json"
    stream = stream or sys.stderr
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return True


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled (``""`` outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = CURRENT.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", "")
        return f"{line} request_id={request_id}" if request_id else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _millis(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(settings: LoggingSection) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if uses_json(settings) else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # aiohttp's own access logger is replaced by ours; its errors still reach the root logger.
    logging.getLogger("aiohttp.access").propagate = False
    server = logging.getLogger("aiohttp.server")
    server.filters[:] = [f for f in server.filters if not isinstance(f, OneLineRateLimited)]
    server.addFilter(OneLineRateLimited())


class OneLineRateLimited(logging.Filter):
    """aiohttp's reports of requests it could not parse, as one line each and at most
    ``BURST`` per ``PERIOD`` seconds: any client can send malformed requests, and a traceback
    for each would let it flood the log. What was held back is counted in the next line."""

    BURST = 10
    PERIOD = 10.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._window = -float("inf")
        self._count = 0
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        if now - self._window >= self.PERIOD:
            self._window, self._count = now, 0
        self._count += 1
        if self._count > self.BURST:
            self._held += 1
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            detail = getattr(exc, "message", None) or str(exc)
            first = str(detail).strip().splitlines()[0] if str(detail).strip() else ""
            text = f"{record.getMessage()}: {reason(exc)}: {first[:200]!r}"
        else:
            text = record.getMessage()[:300]
        if self._held:
            text += f" ({self._held} similar lines held back)"
            self._held = 0
        record.msg, record.args = text, ()
        record.exc_info = record.exc_text = None
        record.stack_info = None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class AccessLines:
    """The access log: one line per request, formatted cheaply, written in batches.

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
        self._stream = stream or sys.stderr
        self.json = uses_json(settings, self._stream)
        self.bodies = settings.include_bodies
        self._lines: list[bytes] = []
        #: Where the lines go as bytes, when the stream has a binary layer (stderr has).
        self._binary: BinaryIO | None = getattr(self._stream, "buffer", None)
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def add(self, method: str, path: str, status: int, seconds: float, request_id: str) -> None:
        """One request's line, in text or (when no job is known) JSON."""
        now = time.time()
        if self.json:
            self._append(_json_line({
                "ts": int(now * 1000) / 1000, "level": "info", "logger": "model_proxy.access",
                "request_id": request_id, "method": method, "path": path, "status": status,
                # whole milliseconds: the event loop's clock (uvloop) has no finer resolution
                "duration_ms": round(seconds * 1000),
            }))
            return
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._append(
            f"{self._stamp},{int((now - second) * 1000):03d} INFO model_proxy.access: "
            f"{method} {path} {status} {round(seconds * 1000)}ms request_id={request_id}"
            .encode("utf-8", "backslashreplace"))

    def add_job(self, method: str, path: str, status: int, seconds: float, request_id: str,
                exchange: Exchange) -> None:
        """A forwarded request's JSON line: besides :meth:`add`'s fields its ``model`` (as
        the client named it), ``upstream`` (the backend provider) and ``upstream_model``,
        ``attempts``, ``ttfb_ms`` (a stream's, from its body read to its first chunk written;
        other answers are written whole, so their duration), ``upstream_ms`` and
        ``tokens_in``/``tokens_out`` (as the upstream reported them; ``null`` when it did
        not); with ``include_bodies``, ``request_body`` and ``response_body`` (each at most
        64 KiB, as text). Durations in whole milliseconds."""
        job = exchange.job
        assert job is not None  # set before the exchange is kept for the log
        usage = exchange.usage
        model = job.model
        duration = round(seconds * 1000)
        entry: dict[str, Any] = {
            "ts": int(time.time() * 1000) / 1000, "level": "info",
            "logger": "model_proxy.access", "request_id": request_id, "method": method,
            "path": path, "status": status, "duration_ms": duration,
            "model": model[:200] if model else model, "upstream": exchange.provider,
            "upstream_model": job.upstream_model, "attempts": exchange.attempts,
            "ttfb_ms": round(exchange.ttfb * 1000) if exchange.ttfb >= 0 else duration,
            "upstream_ms": round(exchange.upstream_seconds * 1000),
            "tokens_in": usage.prompt_tokens if usage else None,
            "tokens_out": usage.completion_tokens if usage else None,
        }
        if self.bodies:
            answer = exchange.answer or b""
            entry["request_body"] = job.body[:BODY_LOG_BYTES].decode(errors="replace")
            entry["response_body"] = bytes(answer).decode(errors="replace")
        self._append(_json_line(entry))

    def _append(self, line: bytes) -> None:
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
            data = b"\n".join(self._lines) + b"\n"
            self._lines.clear()
            self._stream.flush()  # what other loggers wrote comes first
            if self._binary is not None:
                self._binary.write(data)
                self._binary.flush()
            else:
                self._stream.write(data.decode())
                self._stream.flush()


class AccessLogger(AbstractAccessLogger):
    """aiohttp's per-connection hook; ``logger`` is the shared :class:`AccessLines`."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, seconds: float) -> None:
        lines: AccessLines = self.logger  # type: ignore[assignment]
        # raw_path: percent-escapes stay escaped (no newlines in the log); the query is left
        # out, as it may carry a credential.
        path = request.raw_path.partition("?")[0][:200]
        # aiohttp logs in the request's own task, so the edge's context variable is still set
        # there ("": a request aiohttp refused before any handler ran)
        request_id = CURRENT.get() or "-"
        exchange = EXCHANGE.get()
        if exchange is not None:
            EXCHANGE.set(None)  # taken: a later request in this task sets its own
            if exchange.request_id != request_id or not lines.json:
                exchange = None
        if exchange is None:
            lines.add(request.method, path, response.status, seconds, request_id)
        else:
            lines.add_job(request.method, path, response.status, seconds, request_id, exchange)

    @property
    def enabled(self) -> bool:
        lines: AccessLines = self.logger  # type: ignore[assignment]
        return lines.enabled
