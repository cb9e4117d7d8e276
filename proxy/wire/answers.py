"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` and a final ``[DONE]``."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import ProxyError

DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(exc: ProxyError) -> bytes:
    """The final event of a stream that failed after it started."""
    return event(exc.body())
