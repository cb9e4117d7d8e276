"""The project's few error types, and how each one reads on the wire.

Every error a client can see is a :class:`ProxyError`: an HTTP status plus the fields of an
OpenAI error body ``{"error": {"message", "type", "param", "code"}}``. The edge layer renders
them (``proxy.server.edge``); after a stream has started, ``proxy.wire.answers`` renders the
same body as a final ``data:`` event. Specialise only where a caller branches::

    ProxyError                 any status; the base the edge layer renders
    ├── BadRequest        400  the request itself is wrong (JSON, fields, unsupported params)
    ├── Unauthorized      401  missing or bad inbound credentials / signature
    ├── NotFound          404  unknown model or path
    ├── PayloadTooLarge   413  body or header over a configured limit
    ├── Overloaded        429  the proxy's own queue is full (``retry_after``; never retried)
    ├── Unavailable       503  the upstream's circuit is open, or the proxy is shutting down
    └── UpstreamError     502  the upstream failed: refused, reset, bad answer, error status
        └── UpstreamTimeout 504  connect / first byte / idle / total timeout

    ConfigError                not HTTP: a bad model_backend.yaml, one line per problem

``UpstreamError`` is the only family the retry layer looks at: it retries when ``retryable`` is
true (set for connection failures and timeouts before the first byte); it also retries an
upstream answer whose status is in :data:`RETRYABLE_STATUSES`. Raise with ``from exc`` so the
cause stays in the chain for logs, never in the message: messages are shown to clients and
must hold no secrets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

#: Upstream statuses worth another attempt: the upstream is busy or briefly gone.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


class ProxyError(Exception):
    """An error with an HTTP status and an OpenAI-shaped body."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "authentication_error"
    code = "unauthorized"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class Unavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "unavailable"


class UpstreamError(ProxyError):
    """The upstream did not give a usable answer."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    def __init__(
        self, message: str, *, retryable: bool = False,
        headers: Mapping[str, str] | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.retryable = retryable
        #: The upstream's answer headers, when it answered: the retry layer reads its
        #: ``Retry-After`` from them (``proxy.upstream.retry``, the one parser).
        self.headers = headers


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_WORDS = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def reason(exc: BaseException) -> str:
    """What went wrong, in words, for a line an operator reads: the system's own text for an
    OS error (``No such file or directory``, ``Connection refused``, a name that does not
    resolve), else the exception's kind spelt as words. Never the exception's own text, which
    may quote a URL or a value holding a secret."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    # aiohttp's connection errors are OSErrors carrying their cause's errno and text
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno < 0:
        return f"the host name does not resolve ({exc.strerror})"  # getaddrinfo's EAI_*
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's "Connect call failed (...)" says less
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return _WORDS.sub(" ", type(exc).__name__).lower()
