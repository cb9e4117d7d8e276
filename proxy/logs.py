"""Logging set-up: one stderr handler, text or JSON lines, and a cheap access log."""

from __future__ import annotations

import logging
import sys

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.config import LoggingSection

log = logging.getLogger("model_proxy")
access = logging.getLogger("model_proxy.access")


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
    access.disabled = not settings.access_log


class AccessLogger(AbstractAccessLogger):
    """One short line per request; formatting is skipped entirely when the line is off."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, seconds: float) -> None:
        if access.isEnabledFor(logging.INFO):
            access.info(
                "%s %s %d %.1fms",
                request.method,
                request.path[:200],
                response.status,
                seconds * 1000,
            )

    @property
    def enabled(self) -> bool:
        return not access.disabled and access.isEnabledFor(logging.INFO)
