"""OpenAI-compatible upstreams (``custom``, a vLLM server): bytes in, bytes out.

The body travels as received (the resolver has already rewritten ``model``); the answer is
relayed chunk by chunk without parsing. Only the status line and headers are looked at.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import aiohttp
from yarl import URL

from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.config import BaseConfig
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.headers import request_headers, response_headers


class HTTPUpstream(Adapter):
    """Shared plumbing for adapters that speak HTTP to ``config.url``."""

    def __init__(self, config: BaseConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        assert config.url is not None
        self.base_url = config.url
        self.where = _safe_origin(config.url)
        self.auth_headers = credential_headers(config)
        # Sent on every request; identity keeps bodies byte-for-byte relayable.
        self.fixed_headers = {**self.auth_headers, "Accept-Encoding": "identity"}
        t = config.timeouts
        # aiohttp's per-read timer bounds the wait for the status line (first_byte); once the
        # headers are in, ``request`` switches the same timer to the gap between reads (idle).
        # It is cheaper than wrapping each await in asyncio.timeout.
        self.client_timeout = aiohttp.ClientTimeout(
            total=t.total, sock_connect=t.connect, sock_read=t.first_byte
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | Literal["idle"] | None = "idle",
    ) -> aiohttp.ClientResponse:
        """Send one request and wait for the status line, within the first-byte timeout.

        Afterwards each read of the body may wait ``read_timeout`` seconds (``timeouts.idle``
        unless given; ``None`` leaves the body's pace to the caller).
        """
        all_headers = {**headers, **self.fixed_headers} if headers else self.fixed_headers
        signed = self.attempt_headers(body or b"")
        if signed:
            all_headers = {**all_headers, **signed}
        try:
            response = await self.session.request(
                method,
                self.base_url + path,
                data=body,
                headers=all_headers,
                timeout=self.client_timeout,
                allow_redirects=False,
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamTimeout(
                f"upstream at {self.where} did not accept a connection within "
                f"{self.config.timeouts.connect:g} s",
                retryable=True,
            ) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"upstream at {self.where} did not answer within "
                f"{self.config.timeouts.first_byte:g} s",
                retryable=True,
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                f"upstream at {self.where} is unreachable: {_reason(exc)}", retryable=True
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"upstream at {self.where} failed before answering: {_reason(exc)}", retryable=True
            ) from exc
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = (
                self.config.timeouts.idle if read_timeout == "idle" else read_timeout
            )
        return response

    def attempt_headers(self, body: bytes) -> Mapping[str, str] | None:
        """Headers made afresh for each request sent (e.g. a signature over ``body``)."""
        return None

    async def body_chunks(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """Yield the body as it arrives; a silence longer than ``timeouts.idle`` ends it."""
        content = response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self.broke_off(exc) from exc

    def broke_off(self, exc: BaseException) -> UpstreamError:
        """The error for a body that stopped part-way (not retryable: work may be done)."""
        if isinstance(exc, aiohttp.SocketTimeoutError):  # the per-read (idle) timer
            idle = self.config.timeouts.idle
            return UpstreamTimeout(f"upstream at {self.where} sent nothing for {idle:g} s "
                                   "mid-answer")
        if isinstance(exc, TimeoutError):  # aiohttp's total deadline for the attempt
            total = self.config.timeouts.total
            return UpstreamTimeout(f"upstream at {self.where} did not finish within {total:g} s")
        return UpstreamError(f"upstream at {self.where} broke off mid-answer: {_reason(exc)}")

    async def relay(self, response: aiohttp.ClientResponse) -> UpstreamResponse:
        """The answer to relay: a stream as it arrives, anything else read whole (one read)."""
        headers = response_headers(response.headers)
        if response.content_type == "text/event-stream":
            # The per-read timer still holds the first-byte deadline until the next read
            # re-arms it; re-arm it now so a stream that stalls right away ends after `idle`.
            protocol = response.connection.protocol if response.connection else None
            if protocol is not None and not response.content.at_eof():
                protocol.start_timeout()
            return UpstreamResponse(
                response.status, headers, self.body_chunks(response), stream=True,
                release=lambda: release_response(response),
            )
        try:
            body = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self.broke_off(exc) from exc
        finally:
            release_response(response)
        return UpstreamResponse(response.status, headers, stream=False, body=body)

    async def get_json(self, path: str) -> Any:
        response = await self.request("GET", path)
        try:
            if response.status >= 400:
                raise UpstreamError(
                    f"upstream at {self.where} answered {path} with {response.status}"
                )
            return await response.json(content_type=None)
        except (ValueError, aiohttp.ClientError) as exc:
            raise UpstreamError(f"upstream at {self.where} sent a bad answer to {path}") from exc
        finally:
            release_response(response)


class OpenAIAdapter(HTTPUpstream):
    """Any OpenAI-compatible server (``backend_provider: custom``)."""

    name = "custom"
    passthrough = True
    ready_path = "/v1/models"

    async def send(self, job: Job) -> UpstreamResponse:
        path = job.path + ("?" + job.query if job.query else "")
        response = await self.request(
            job.method, path, body=job.body or None, headers=request_headers(job.headers)
        )
        return await self.relay(response)

    async def models(self) -> list[dict[str, Any]]:
        data = await self.get_json("/v1/models")
        items = data.get("data") if isinstance(data, dict) else None
        return [m for m in items if isinstance(m, dict)] if isinstance(items, list) else []

    async def check_ready(self) -> None:
        response = await self.request("GET", self.ready_path)
        release_response(response)
        if response.status in (401, 403):
            raise UpstreamError(f"upstream at {self.where} rejected the configured credentials")
        if response.status >= 400:
            raise UpstreamError(
                f"upstream at {self.where} answered {self.ready_path} with {response.status}"
            )


class VllmServerAdapter(OpenAIAdapter):
    """A vLLM OpenAI server (``backend_provider: vllm`` with ``url``)."""

    name = "vllm"
    ready_path = "/health"

    async def check_ready(self) -> None:
        await super().check_ready()
        # /health needs no key, so it cannot tell a wrong api_key; /v1/models does.
        response = await self.request("GET", "/v1/models")
        release_response(response)
        if response.status in (401, 403):
            raise UpstreamError(f"upstream at {self.where} rejected the configured credentials")


def credential_headers(config: BaseConfig) -> dict[str, str]:
    """The upstream credentials from the config, as headers."""
    headers = {}
    if config.api_key is not None:
        name = config.api_key_header_name
        key = config.api_key.get_secret_value()
        headers[name] = f"Bearer {key}" if name.lower() == "authorization" else key
    if config.bearer_token is not None:
        headers["Authorization"] = f"Bearer {config.bearer_token.get_secret_value()}"
    return headers


def release_response(response: aiohttp.ClientResponse) -> None:
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
        return exc.os_error.strerror or type(exc.os_error).__name__
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response body was incomplete"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return type(exc).__name__
