"""HTTP upstreams: ``HTTPUpstream``, the plumbing every adapter that speaks HTTP shares, and the
one place where a failure of the HTTP client becomes a project error.

Every send and every body read of every HTTP adapter goes through :meth:`HTTPUpstream.request`,
:meth:`~HTTPUpstream.read_all`, :meth:`~HTTPUpstream.read_some` or
:meth:`~HTTPUpstream.body_chunks`, and each of them hands the client's exceptions and timeouts
(the keep-alive pool of :mod:`proxy.adapters.lean`) to :func:`upstream_error`, the single map
(always chained: ``raise mapped from exc``). Before the upstream has started its answer a
failure is retryable; once it has, the upstream may have done the work, and a retry would do it
twice.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import aiohttp
from yarl import URL

from proxy.adapters import lean
from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.adapters.lean import Answer
from proxy.config import BaseConfig, TimeoutsSection
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.headers import relayed_headers
from proxy.wire.models import parse
from proxy.wire.relayed import Relayed

log = logging.getLogger("model_proxy")
#: Failure messages logged once per this many seconds at most (they come per request).
NOTE_SECONDS = 10.0

#: Where a failure happened: sending and waiting for the status line; reading the start of the
#: answer before anything of it can have reached the client; reading the rest of it.
Stage = Literal["send", "start", "body"]


def upstream_error(exc: BaseException, stage: Stage, timeouts: TimeoutsSection) -> UpstreamError:
    """The project's error for a failure of the HTTP client (or a timeout) at ``stage``.

    Messages reach clients, so they never name the upstream's address; the adapter's log line
    does (:meth:`HTTPUpstream.error`).
    """
    if stage == "send":
        if isinstance(exc, lean.ConnectTimeout):
            return UpstreamTimeout(f"the upstream did not accept a connection within "
                                   f"{timeouts.connect:g} s", retryable=True)
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"the upstream did not answer within "
                                   f"{timeouts.first_byte:g} s", retryable=True)
        if isinstance(exc, lean.ConnectError):
            return UpstreamError(f"the upstream is unreachable: {exc.reason}", retryable=True)
        return UpstreamError(f"the upstream failed before answering: {_reason(exc)}",
                             retryable=True)
    if stage == "start":
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"the upstream did not start its answer within "
                                   f"{timeouts.first_byte:g} s", retryable=True)
        return UpstreamError(f"the upstream failed before answering: {_reason(exc)}",
                             retryable=True)
    if isinstance(exc, lean.IdleTimeout):
        return UpstreamTimeout(f"the upstream sent nothing for {timeouts.idle:g} s "
                               "mid-answer")
    if isinstance(exc, TimeoutError):  # an adapter's idle deadline, or the attempt's total
        return UpstreamTimeout(f"the upstream stopped answering in time (idle "
                               f"{timeouts.idle:g} s, total {timeouts.total:g} s)")
    return UpstreamError(f"the upstream broke off mid-answer: {_reason(exc)}")


#: Upstream statuses that are never relayed (see ``HTTPUpstream.refused``).
REFUSED_STATUSES = frozenset({101, 401, 403})

#: What the map takes: everything the HTTP client raises for a failed exchange.
CLIENT_FAILURES = (TimeoutError, lean.LeanError)


class HTTPUpstream(Adapter):
    """Shared plumbing for adapters that speak HTTP to ``config.url``."""

    def __init__(self, config: BaseConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        # several URLs are split by the pipeline, one adapter each (BaseConfig.for_url)
        assert isinstance(config.url, str)
        self.base_url = config.url
        #: The upstream's address, for the log only: messages that clients see never carry it.
        self.where = _safe_origin(config.url)
        self._noted: dict[str, float] = {}
        self.timeouts = t = config.timeouts
        # read on every send: plain copies, as a pydantic model's attribute reads cost more
        self._first_byte, self._idle, self._total = t.first_byte, t.idle, t.total
        self.max_response_bytes = config.limits.max_response_bytes
        self.auth_headers = credential_headers(config)
        #: Credential values an upstream error body could quote back; redacted before relay.
        self.secrets = tuple(
            secret.get_secret_value().encode()
            for secret in (config.api_key, config.bearer_token) if secret is not None
        )
        # Sent on every request; identity keeps bodies byte-for-byte relayable.
        self.fixed_headers = {**self.auth_headers, "Accept-Encoding": "identity"}
        #: The same, encoded once: the head of every request ends with them.
        self.fixed_block = b"".join(
            b"%s: %s\r\n" % (name.encode(), value.encode())
            for name, value in self.fixed_headers.items()
        )
        self.fixed_names = frozenset(name.lower() for name in self.fixed_headers)
        #: Whether this adapter makes per-send headers (:meth:`attempt_headers` overridden).
        self.signs = type(self).attempt_headers is not HTTPUpstream.attempt_headers
        origin = URL(config.url)
        # the base URL's path prefixes every request path
        self.base_path = origin.raw_path.rstrip("/")
        assert origin.host is not None and origin.port is not None  # a checked URL
        self.pool = lean.LeanPool(
            origin.host, origin.port, connect_timeout=config.timeouts.connect,
            tls=ssl.create_default_context() if origin.scheme == "https" else None,
        )

    def error(self, exc: BaseException, stage: Stage) -> UpstreamError:
        mapped = upstream_error(exc, stage, self.timeouts)
        self.note(logging.WARNING, mapped.message)
        return mapped

    def note(self, level: int, message: str) -> None:
        """Log ``message`` with the upstream's address (which clients never see), at most once
        per :data:`NOTE_SECONDS` for the same message, as failures come per request."""
        now = time.monotonic()
        noted = self._noted
        if now - noted.get(message, -NOTE_SECONDS) < NOTE_SECONDS:
            return
        if len(noted) >= 64:
            noted.clear()
        noted[message] = now
        log.log(level, "%s (upstream %s; the same is not logged again for %gs)",
                message, self.where, NOTE_SECONDS)

    def refused(self, response: Answer) -> UpstreamError:
        """The error for an answer the proxy never relays: a protocol upgrade (101), or a
        refusal of this node's credentials (401, 403)."""
        if response.status != 101:
            return self.auth_failed(response)
        response.close()
        message = ("the upstream answered 101 Switching Protocols; the proxy relays no "
                   "protocol upgrades")
        self.note(logging.WARNING, message)
        return UpstreamError(message, code="upstream_upgrade")

    def auth_failed(self, response: Answer) -> UpstreamError:
        """The error for an upstream that refused this node's credentials (401, 403): a 502,
        as the client cannot fix it, logged loudly for the operator."""
        response.release()
        self.note(logging.ERROR, f"the upstream refused this node's credentials with "
                                 f"{response.status}: check the configured api_key, "
                                 "bearer_token or signing key")
        return UpstreamError("the upstream rejected this node's credentials",
                             code="upstream_auth_failed")

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | Literal["idle"] | None = "idle",
    ) -> Answer:
        """Send one request and wait for the status line, within the first-byte timeout.

        Afterwards each read of the body may wait ``read_timeout`` seconds (``timeouts.idle``
        unless given; ``None`` leaves the body's pace to the caller), and the whole exchange
        ``timeouts.total``. A reused connection the upstream had closed is noticed and the
        request sent again on a new one, with its per-send headers made afresh
        (:meth:`attempt_headers`: a signature is never sent twice). An upstream that refuses
        the node's credentials (401, 403) raises ``upstream_auth_failed``.
        """
        payload = body or b""
        sent: list[tuple[str, str]] = []
        if headers:
            fixed = self.fixed_names
            # the usual job's headers name none of the credential headers: checked in C
            if fixed.isdisjoint(map(str.lower, headers)):
                sent = list(headers.items())
            else:
                sent = [item for item in headers.items() if item[0].lower() not in fixed]
        signs = self.signs
        idle = self._idle if read_timeout == "idle" else read_timeout
        target = self.base_path + path
        try:
            for fresh in (False, True):
                try:
                    response = await self.pool.request(
                        method, target, payload,
                        self._with_signature(sent, payload) if signs else sent,
                        fixed=self.fixed_block, first_byte=self._first_byte, idle=idle,
                        total=self._total, fresh=fresh,
                    )
                    break
                except lean.StaleConnection:
                    if fresh:
                        raise
        except ValueError as exc:  # a header value HTTP cannot carry
            raise UpstreamError(f"the request cannot be sent: {exc}") from exc
        except CLIENT_FAILURES as exc:
            raise self.error(exc, "send") from exc
        if response.status in REFUSED_STATUSES:
            raise self.refused(response)
        return response

    def _with_signature(
        self, headers: list[tuple[str, str]], body: bytes
    ) -> list[tuple[str, str]]:
        signed = self.attempt_headers(body)
        return [*headers, *signed.items()] if signed else headers

    async def close(self) -> None:
        await self.pool.close()
        await super().close()

    def redact(self, body: bytes) -> bytes:
        """``body`` with every configured credential value replaced."""
        for secret in self.secrets:
            if secret in body:
                body = body.replace(secret, b"[redacted]")
        return body

    def attempt_headers(self, body: bytes) -> Mapping[str, str] | None:
        """Headers made afresh for each request sent (e.g. a signature over ``body``); called
        only where an adapter overrides it."""
        return None

    async def read_all(self, response: Answer, stage: Stage = "body") -> bytes:
        """The whole body; the connection is released (or closed, if unread) either way.

        A body over ``limits.max_response_bytes`` is not read further: the connection is
        dropped and the attempt ends with a 502 ``upstream_response_too_large``.
        """
        limit = self.max_response_bytes
        try:
            length = response.content_length
            if length is not None and length > limit:
                raise self._too_large(f"{length} bytes")
            parts = []
            size = 0
            while chunk := await response.readany():
                size += len(chunk)
                if size > limit:
                    raise self._too_large(f"more than {limit} bytes")
                parts.append(chunk)
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            if response.status >= 300 and self.secrets:
                body = self.redact(body)  # an error page may quote what it was sent
            return body
        except CLIENT_FAILURES as exc:
            raise self.error(exc, stage) from exc
        finally:
            response.release()

    def _too_large(self, size: str) -> UpstreamError:
        message = (f"the upstream sent an answer of {size}; the limit is "
                   f"{self.max_response_bytes} bytes (limits.max_response_bytes)")
        self.note(logging.WARNING, message)
        return UpstreamError(message, code="upstream_response_too_large")

    async def read_some(self, response: Answer, stage: Stage) -> bytes:
        """The next bytes of the body as they arrive (``b""`` at its end)."""
        try:
            return await response.readany()
        except CLIENT_FAILURES as exc:
            raise self.error(exc, stage) from exc

    async def body_chunks(self, response: Answer) -> AsyncIterator[bytes]:
        """Yield the body as it arrives; a silence longer than ``timeouts.idle`` ends it."""
        try:
            while chunk := await response.readany():
                yield chunk
        except CLIENT_FAILURES as exc:
            raise self.error(exc, "body") from exc

    async def relayed_chunks(
        self, response: Answer, relayed: Relayed
    ) -> AsyncIterator[bytes]:
        """:meth:`body_chunks` of an OpenAI-compatible stream, renamed and its usage read."""
        try:
            while chunk := await response.readany():
                chunk = relayed.chunk(chunk)
                if chunk:
                    yield chunk
        except CLIENT_FAILURES as exc:
            raise self.error(exc, "body") from exc
        tail = relayed.end()
        if tail:
            yield tail
        relayed.complete = True

    async def relay(
        self, response: Answer, job: Job | None = None
    ) -> UpstreamResponse:
        """The answer to relay: a stream as it arrives, anything else read whole (one read).

        With ``job`` (an OpenAI-compatible inference request), a successful answer names the
        model the client asked for and its usage is read (``proxy.wire.relayed``).
        """
        headers = relayed_headers(response.headers)
        relayed = None
        if job is not None and job.model is not None and response.status < 300:
            relayed = Relayed(job.model, drop_usage=job.usage_asked,
                              max_event=self.max_response_bytes)
        if response.content_type == "text/event-stream":
            chunks = (self.body_chunks(response) if relayed is None
                      else self.relayed_chunks(response, relayed))
            out = UpstreamResponse(
                response.status, headers, chunks, stream=True,
                release=response.release,
            )
        else:
            body = await self.read_all(response)
            if response.status >= 300 and self.secrets:
                for name, value in list(headers.items()):
                    if any(secret.decode() in value for secret in self.secrets):
                        headers[name] = "[redacted]"
            if relayed is not None:
                body = relayed.body(body)
            out = UpstreamResponse(response.status, headers, stream=False, body=body)
        out.counted = relayed
        return out

    async def get_json(self, path: str) -> Any:
        response = await self.request("GET", path)
        body = await self.read_all(response)
        if response.status >= 400:
            raise UpstreamError(f"the upstream answered {path} with {response.status}")
        try:
            return await parse(body)  # off the event loop when large
        except ValueError as exc:
            raise UpstreamError(f"the upstream sent a bad answer to {path}") from exc


def credential_headers(config: BaseConfig) -> dict[str, str]:
    """The upstream credentials from the config, as headers."""
    headers = {}
    if config.api_key is not None:
        name = config.api_key_header_name
        key = config.api_key.get_secret_value()
        headers[name] = f"Bearer {key}" if name.lower() == "authorization" else key
    if config.bearer_token is not None and (config.api_key is None or config.bearer_with_api_key):
        headers["Authorization"] = f"Bearer {config.bearer_token.get_secret_value()}"
    return headers


def _safe_origin(url: str) -> str:
    """``scheme://host:port`` of a URL, without credentials or path, for messages."""
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, lean.LeanError):
        return str(exc)
    return "the connection failed"
