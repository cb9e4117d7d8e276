"""HTTP upstreams: ``HTTPUpstream``, the plumbing every adapter that speaks HTTP shares, and the
one place where a failure of the HTTP client becomes a project error.

Every send and every body read of every HTTP adapter goes through :meth:`HTTPUpstream.request`,
:meth:`~HTTPUpstream.read_all`, :meth:`~HTTPUpstream.read_some` or
:meth:`~HTTPUpstream.body_chunks`, and each of them hands the HTTP client's exceptions and
timeouts (the lean pool of :mod:`proxy.adapters.lean`, the default, or aiohttp's
``ClientSession`` under ``upstream_client: aiohttp``) to :func:`upstream_error`, the single map
(always chained: ``raise mapped from exc``). Before the upstream has started its answer a
failure is retryable; once it has, the upstream may have done the work, and a retry would do it
twice.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.adapters import lean
from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.config import BaseConfig, TimeoutsSection
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.headers import response_headers
from proxy.wire.models import parse
from proxy.wire.relayed import Relayed

log = logging.getLogger("model_proxy")
#: Failure messages logged once per this many seconds at most (they come per request).
NOTE_SECONDS = 10.0

#: Where a failure happened: sending and waiting for the status line; reading the start of the
#: answer before anything of it can have reached the client; reading the rest of it.
Stage = Literal["send", "start", "body"]


def upstream_error(exc: BaseException, stage: Stage, timeouts: TimeoutsSection) -> UpstreamError:
    """The project's error for an aiohttp exception or a timeout at ``stage``.

    Messages reach clients, so they never name the upstream's address; the adapter's log line
    does (:meth:`HTTPUpstream.error`).
    """
    if stage == "send":
        if isinstance(exc, aiohttp.ConnectionTimeoutError | lean.ConnectTimeout):
            return UpstreamTimeout(f"the upstream did not accept a connection within "
                                   f"{timeouts.connect:g} s", retryable=True)
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"the upstream did not answer within "
                                   f"{timeouts.first_byte:g} s", retryable=True)
        if isinstance(exc, aiohttp.ClientConnectorError | lean.ConnectError):
            return UpstreamError(f"the upstream is unreachable: {_reason(exc)}",
                                 retryable=True)
        return UpstreamError(f"the upstream failed before answering: {_reason(exc)}",
                             retryable=True)
    if stage == "start":
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"the upstream did not start its answer within "
                                   f"{timeouts.first_byte:g} s", retryable=True)
        return UpstreamError(f"the upstream failed before answering: {_reason(exc)}",
                             retryable=True)
    # the HTTP client's per-read (idle) timer
    if isinstance(exc, aiohttp.SocketTimeoutError | lean.IdleTimeout):
        return UpstreamTimeout(f"the upstream sent nothing for {timeouts.idle:g} s "
                               "mid-answer")
    if isinstance(exc, TimeoutError):  # an adapter's idle deadline, or the attempt's total
        return UpstreamTimeout(f"the upstream stopped answering in time (idle "
                               f"{timeouts.idle:g} s, total {timeouts.total:g} s)")
    return UpstreamError(f"the upstream broke off mid-answer: {_reason(exc)}")


#: Upstream statuses that are never relayed (see ``HTTPUpstream.refused``).
REFUSED_STATUSES = frozenset({101, 401, 403})

#: What the map takes: everything the HTTP clients raise for a failed exchange.
CLIENT_FAILURES = (TimeoutError, aiohttp.ClientError, lean.LeanError)
#: What a reused keep-alive connection the upstream has closed meanwhile raises on send.
STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class LeanAnswer:
    """A :class:`~proxy.adapters.lean.LeanResponse` as the few parts of aiohttp's
    ``ClientResponse`` that adapters use: ``status``, ``headers``, ``content``, ``release``,
    ``close``."""

    __slots__ = ("content", "headers", "status")
    #: No aiohttp connection (its per-read timer is aiohttp's; lean arms its own per wait).
    connection = None

    def __init__(self, response: lean.LeanResponse) -> None:
        self.content = response
        self.status = response.status
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in response.headers:
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
        self.headers = CIMultiDictProxy(headers)

    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type")
        return "application/octet-stream" if value is None else (
            value.partition(";")[0].strip().lower())

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        self.content.close()  # a whole body has already put its connection back

    def close(self) -> None:
        self.content.close()


#: An upstream's answer from either HTTP client.
Answer = aiohttp.ClientResponse | LeanAnswer


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
        self.timeouts = config.timeouts
        self.max_response_bytes = config.limits.max_response_bytes
        self.auth_headers = credential_headers(config)
        #: Credential values an upstream error body could quote back; redacted before relay.
        self.secrets = tuple(
            secret.get_secret_value().encode()
            for secret in (config.api_key, config.bearer_token) if secret is not None
        )
        self._fresh_session: aiohttp.ClientSession | None = None
        # Sent on every request; identity keeps bodies byte-for-byte relayable.
        self.fixed_headers = {**self.auth_headers, "Accept-Encoding": "identity"}
        t = config.timeouts
        # aiohttp's per-read timer bounds the wait for the status line (first_byte); once the
        # headers are in, ``request`` switches the same timer to the gap between reads (idle).
        # It is cheaper than wrapping each await in asyncio.timeout.
        self.client_timeout = aiohttp.ClientTimeout(
            total=t.total, sock_connect=t.connect, sock_read=t.first_byte
        )
        #: The lean client's keep-alive pool (``upstream_client: lean``); else the session.
        self.pool: lean.LeanPool | None = None
        if config.upstream_client == "lean":
            origin = URL(config.url)
            # the base URL's path prefixes every request path
            self.base_path = origin.raw_path.rstrip("/")
            assert origin.host is not None and origin.port is not None  # a checked URL
            self.pool = lean.LeanPool(
                origin.host, origin.port, connect_timeout=t.connect,
                tls=ssl.create_default_context() if origin.scheme == "https" else None,
            )
            self.lean_headers = tuple(self.fixed_headers.items())

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
        release_response(response)
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
        unless given; ``None`` leaves the body's pace to the caller). An upstream that refuses
        the node's credentials (401, 403) raises ``upstream_auth_failed``.
        """
        if self.pool is not None:
            return await self._lean_request(method, path, body, headers, read_timeout)
        all_headers = {**headers, **self.fixed_headers} if headers else self.fixed_headers
        signed = self.attempt_headers(body or b"")
        if signed:
            all_headers = {**all_headers, **signed}
        url = self.base_url + path
        try:
            try:
                response = await self.session.request(
                    method, url, data=body, headers=all_headers, timeout=self.client_timeout,
                    allow_redirects=False,
                )
            except STALE_CONNECTION as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # no connection at all: the upstream is down
                # A pooled keep-alive connection the upstream had already closed: once more on
                # a connection of its own, and not an upstream failure unless that fails too.
                response = await self._fresh().request(
                    method, url, data=body, headers=all_headers, timeout=self.client_timeout,
                    allow_redirects=False,
                )
        except CLIENT_FAILURES as exc:
            raise self.error(exc, "send") from exc
        if response.status in REFUSED_STATUSES:
            raise self.refused(response)
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = (
                self.timeouts.idle if read_timeout == "idle" else read_timeout
            )
        return response

    async def _lean_request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        read_timeout: float | Literal["idle"] | None,
    ) -> LeanAnswer:
        """:meth:`request` on the lean client (the pool retries a stale connection itself)."""
        assert self.pool is not None
        payload = body or b""
        sent: tuple[tuple[str, str], ...] | list[tuple[str, str]] = self.lean_headers
        if headers:
            fixed = self.fixed_headers
            sent = [item for item in headers.items() if item[0] not in fixed]
            sent.extend(self.lean_headers)
        signed = self.attempt_headers(payload)
        if signed:
            sent = [*sent, *signed.items()]
        t = self.timeouts
        try:
            raw = await self.pool.request(
                method, self.base_path + path, payload, sent, first_byte=t.first_byte,
                idle=t.idle if read_timeout == "idle" else read_timeout, total=t.total,
            )
        except CLIENT_FAILURES as exc:
            raise self.error(exc, "send") from exc
        response = LeanAnswer(raw)
        if response.status in REFUSED_STATUSES:
            raise self.refused(response)
        return response

    def _fresh(self) -> aiohttp.ClientSession:
        """A session that opens a new connection for every request (made on first use)."""
        if self._fresh_session is None:
            self._fresh_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False
            )
        return self._fresh_session

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self._fresh_session is not None:
            await self._fresh_session.close()
        await super().close()

    def redact(self, body: bytes) -> bytes:
        """``body`` with every configured credential value replaced."""
        for secret in self.secrets:
            if secret in body:
                body = body.replace(secret, b"[redacted]")
        return body

    def attempt_headers(self, body: bytes) -> Mapping[str, str] | None:
        """Headers made afresh for each request sent (e.g. a signature over ``body``)."""
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
            content = response.content
            parts = []
            size = 0
            while chunk := await content.readany():
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
            release_response(response)

    def _too_large(self, size: str) -> UpstreamError:
        message = (f"the upstream sent an answer of {size}; the limit is "
                   f"{self.max_response_bytes} bytes (limits.max_response_bytes)")
        self.note(logging.WARNING, message)
        return UpstreamError(message, code="upstream_response_too_large")

    async def read_some(self, response: Answer, stage: Stage) -> bytes:
        """The next bytes of the body as they arrive (``b""`` at its end)."""
        try:
            return await response.content.readany()
        except CLIENT_FAILURES as exc:
            raise self.error(exc, stage) from exc

    async def body_chunks(self, response: Answer) -> AsyncIterator[bytes]:
        """Yield the body as it arrives; a silence longer than ``timeouts.idle`` ends it."""
        content = response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except CLIENT_FAILURES as exc:
            raise self.error(exc, "body") from exc

    async def relayed_chunks(
        self, response: Answer, relayed: Relayed
    ) -> AsyncIterator[bytes]:
        """:meth:`body_chunks` of an OpenAI-compatible stream, renamed and its usage read."""
        content = response.content
        try:
            while chunk := await content.readany():
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
        headers = response_headers(response.headers)
        relayed = None
        if job is not None and job.model is not None and response.status < 300:
            relayed = Relayed(job.model, drop_usage=job.usage_asked,
                              max_event=self.max_response_bytes)
        if response.content_type == "text/event-stream":
            # The per-read timer still holds the first-byte deadline until the next read
            # re-arms it; re-arm it now so a stream that stalls right away ends after `idle`.
            protocol = response.connection.protocol if response.connection else None
            if protocol is not None and not response.content.at_eof():
                protocol.start_timeout()
            chunks = (self.body_chunks(response) if relayed is None
                      else self.relayed_chunks(response, relayed))
            out = UpstreamResponse(
                response.status, headers, chunks, stream=True,
                release=lambda: release_response(response),
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


def release_response(response: Answer) -> None:
    # A half-read body must close the connection so the upstream sees the client go away;
    # a fully read one goes back to the keep-alive pool.
    if response.content.at_eof():
        response.release()
    else:
        response.close()


def _safe_origin(url: str) -> str:
    """``scheme://host:port`` of a URL, without credentials or path, for messages."""
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}:{parsed.port}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        # the errno's own text: strerror may carry the address ("Connect call failed (...)")
        error = exc.os_error
        if isinstance(error, socket.gaierror) and error.strerror:
            return error.strerror  # e.g. "Name or service not known"
        return os.strerror(error.errno) if error.errno else type(error).__name__
    if isinstance(exc, lean.ConnectError):
        return exc.reason
    if isinstance(exc, lean.LeanError):
        return str(exc)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response body was incomplete"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return type(exc).__name__
