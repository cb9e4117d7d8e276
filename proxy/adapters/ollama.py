"""``backend_provider: ollama``: OpenAI jobs on Ollama's native API (/api/chat, /api/generate,
/api/embed), with answers that read exactly like OpenAI's.

The mapping itself is in :mod:`ollama_wire` (requests, whole responses) and
:mod:`ollama_stream` (NDJSON to SSE); this module does the HTTP: credentials, timeouts, error
statuses, and the stream's lifetime. Ollama's timings land in ``UpstreamResponse.usage.extra``
(seconds, and tokens per second) for the metrics layer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from yarl import URL

from proxy.adapters import ollama_replies as replies
from proxy.adapters import ollama_wire as wire
from proxy.adapters.base import Adapter, Job, UpstreamResponse, Usage
from proxy.adapters.ollama_replies import NDJSONLines, StreamTranslator, parse_line
from proxy.errors import BadRequest, NotFound, ProxyError, UpstreamError, UpstreamTimeout

_PATHS = {"chat": "/api/chat", "completions": "/api/generate", "embeddings": "/api/embed"}
_RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
_ERROR_SNIPPET = 300  # characters of a non-JSON error body worth showing


class OllamaAdapter(Adapter):
    """Talks to one Ollama server; ``config.url`` is its base URL (no ``/v1``)."""

    name = "ollama"

    def __init__(self, config: Any, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        if not config.url:
            raise ValueError("the ollama provider needs 'url'")  # config validation says so first
        self._base = URL(config.url.rstrip("/"))
        # The host alone names the server in messages: the URL may carry user:password.
        self._where = f"{self._base.host}:{self._base.port}"
        secret = config.bearer_token or config.api_key
        self._headers = {"Content-Type": "application/json"}
        if secret is not None:
            self._headers["Authorization"] = f"Bearer {secret.get_secret_value()}"
        ollama = getattr(config, "ollama", None)
        self._options: Mapping[str, Any] = dict(getattr(ollama, "options", None) or {})
        self._keep_alive: str | int | None = getattr(ollama, "keep_alive", None)
        self._tag: str | None = config.model_name_alias or config.model.name
        timeouts = config.timeouts
        self._connect: float | None = timeouts.connect
        self._first_byte: float | None = timeouts.first_byte
        self._idle: float | None = timeouts.idle
        self._total: float | None = timeouts.total
        # Idle and first-byte limits are enforced here, per read, not by aiohttp's sock_read:
        # sock_read also runs while Ollama loads a model before its first byte, which may
        # rightly take longer than the idle limit allows.
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=self._connect, sock_connect=self._connect
        )

    # --- the seam --------------------------------------------------------------------------

    async def send(self, job: Job) -> UpstreamResponse:
        """POST the job to Ollama; stream jobs return once the first NDJSON line is in.

        Waiting for that line means an error Ollama reports as its first line, or a model
        load that outlasts ``first_byte``, still becomes a plain HTTP error the retry layer
        can act on, instead of an error event inside a 200 stream.
        """
        payload = job.payload
        if payload is None or job.endpoint not in _PATHS:
            raise NotFound(f"{job.path} is not served by the ollama backend")
        model = job.model or self._tag or ""
        tag = job.upstream_model or self._tag or model
        body = self._request_body(job, payload, tag)
        deadline = None if self._total is None else asyncio.get_running_loop().time() + self._total
        resp = await self._post(_PATHS[job.endpoint], body, deadline, model=model, tag=tag)
        created = int(time.time())
        if job.endpoint == "embeddings":
            obj = await self._read_json(resp, deadline)
            out = UpstreamResponse.from_json(
                replies.embeddings_response(
                    obj, model=model, encoding_format=payload.get("encoding_format")
                )
            )
            out.usage.prompt_tokens = obj.get("prompt_eval_count")
            out.usage.extra = replies.timings(obj)
            return out
        max_calls = 1 if payload.get("parallel_tool_calls") is False else None
        if not job.stream:
            obj = await self._read_json(resp, deadline)
            if "error" in obj:
                raise UpstreamError(f"Ollama failed: {obj['error']}")
            if job.endpoint == "chat":
                answer = replies.chat_response(
                    obj,
                    model=model,
                    response_id=replies.new_id("chatcmpl"),
                    created=created,
                    max_tool_calls=max_calls,
                )
            else:
                answer = replies.completion_response(
                    obj, model=model, response_id=replies.new_id("cmpl"), created=created
                )
            out = UpstreamResponse.from_json(answer)
            _fill_usage(out.usage, obj)
            return out
        options = payload.get("stream_options")
        translator = StreamTranslator(
            "chat" if job.endpoint == "chat" else "completions",
            model=model,
            response_id=replies.new_id("chatcmpl" if job.endpoint == "chat" else "cmpl"),
            created=created,
            include_usage=isinstance(options, Mapping) and bool(options.get("include_usage")),
            max_tool_calls=max_calls,
        )
        return await self._stream(resp, translator, deadline)

    async def models(self) -> list[dict[str, Any]]:
        """Pulled models as OpenAI model objects, the configured public name first.

        The configured tag appears only under its public name (and aliases), so the upstream's
        own tag is never shown when an alias is set; other pulled models follow under theirs.
        """
        tags = (await self._get_json("/api/tags")).get("models") or []
        public = [n for n in (self.config.model.name, *self.config.model.aliases) if n]
        wanted = _canonical(self._tag) if self._tag else None
        first: list[dict[str, Any]] = []
        rest: list[dict[str, Any]] = []
        for entry in tags:
            name = entry.get("name") or entry.get("model") or ""
            if wanted is not None and _canonical(name) == wanted and public:
                first.extend(_model_object(entry, shown) for shown in public)
            else:
                rest.append(_model_object(entry, name))
        return first + rest

    async def check_ready(self) -> None:
        """Ollama answers ``/api/version`` and has the configured model pulled."""
        version = await self._get_json("/api/version")
        if not isinstance(version.get("version"), str):
            raise UpstreamError(f"Ollama at {self._where} gave no version from /api/version")
        if self._tag is None:
            return
        tags = (await self._get_json("/api/tags")).get("models") or []
        names = {_canonical(e.get("name") or e.get("model") or "") for e in tags}
        if _canonical(self._tag) not in names:
            raise UpstreamError(
                f"model {self._tag!r} is not pulled on the Ollama server at {self._where}; "
                f"run `ollama pull {self._tag}`"
            )

    # --- HTTP ------------------------------------------------------------------------------

    def _request_body(self, job: Job, payload: Mapping[str, Any], tag: str) -> dict[str, Any]:
        if job.endpoint == "embeddings":
            return wire.embed_request(
                payload, tag, options=self._options, keep_alive=self._keep_alive
            )
        build = wire.chat_request if job.endpoint == "chat" else wire.generate_request
        return build(
            payload, tag, options=self._options, keep_alive=self._keep_alive, stream=job.stream
        )

    async def _post(
        self, path: str, body: dict[str, Any], deadline: float | None, *, model: str, tag: str
    ) -> aiohttp.ClientResponse:
        """Send and wait for the status; a non-200 answer is read, released and raised."""
        with self._mapped(before_first_byte=True):
            async with asyncio.timeout_at(self._until(self._first_byte, deadline)):
                resp = await self.session.post(
                    self._base.with_path(path),
                    data=orjson.dumps(body),
                    headers=self._headers,
                    timeout=self._client_timeout,
                )
                if resp.status == 200:
                    return resp
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
        raise _status_error(resp.status, raw, resp.headers.get("Retry-After"), model, tag)

    async def _read_json(self, resp: aiohttp.ClientResponse, deadline: float | None) -> Any:
        try:
            with self._mapped(before_first_byte=True):
                async with asyncio.timeout_at(self._until(self._idle, deadline)):
                    raw = await resp.read()
        finally:
            resp.release()
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError("Ollama answered with a body that is not valid JSON") from exc
        if not isinstance(obj, dict):
            raise UpstreamError("Ollama answered with JSON that is not an object")
        return obj

    async def _get_json(self, path: str) -> dict[str, Any]:
        limit = self._first_byte if self._first_byte is not None else self._total
        with self._mapped(before_first_byte=True):
            async with asyncio.timeout_at(self._until(limit, None)):
                async with self.session.get(
                    self._base.with_path(path), headers=self._headers, timeout=self._client_timeout
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
        if status != 200:
            raise UpstreamError(
                f"Ollama at {self._where} answered {path} with {status}: {_error_text(raw)}",
                retryable=status in _RETRYABLE_STATUSES,
            )
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"Ollama answered {path} with a body that is not JSON") from exc
        if not isinstance(obj, dict):
            raise UpstreamError(f"Ollama answered {path} with JSON that is not an object")
        return obj

    async def _stream(
        self, resp: aiohttp.ClientResponse, translator: StreamTranslator, deadline: float | None
    ) -> UpstreamResponse:
        lines = NDJSONLines()
        first: list[bytes] = []
        try:
            # The first line is read before answering (see send); its limit is first_byte.
            while not first:
                chunk = await self._read(resp, self._first_byte, deadline, before_first_byte=True)
                if not chunk:
                    first = [lines.flush()]
                    break
                first = [line for line in lines.feed(chunk) if line and not line.isspace()]
            head = b"".join(translator.line(obj) for obj in map(parse_line, first) if obj)
        except BaseException:
            resp.close()
            raise
        usage = Usage()

        async def events() -> AsyncIterator[bytes]:
            out = head
            while translator.final is None:
                if out:
                    yield out
                chunk = await self._read(resp, self._idle, deadline, before_first_byte=False)
                batch = lines.feed(chunk) if chunk else [lines.flush()]
                # One SSE write per upstream read: every line the read finished, in order.
                out = b"".join(translator.line(obj) for obj in map(parse_line, batch) if obj)
                if not chunk:
                    break
            if translator.final is not None:
                _fill_usage(usage, translator.final)
            yield out + translator.end()

        def release() -> None:
            # A finished stream hands the connection back (aiohttp still closes it if bytes
            # are left); one cut short is closed, which is how Ollama learns to stop
            # generating for a client that has gone.
            if translator.final is not None:
                resp.release()
            else:
                resp.close()

        out = UpstreamResponse.from_sse(events(), release)
        out.usage = usage
        return out

    async def _read(
        self,
        resp: aiohttp.ClientResponse,
        limit: float | None,
        deadline: float | None,
        *,
        before_first_byte: bool,
    ) -> bytes:
        with self._mapped(before_first_byte=before_first_byte):
            async with asyncio.timeout_at(self._until(limit, deadline)):
                return await resp.content.readany()

    @staticmethod
    def _until(limit: float | None, deadline: float | None) -> float | None:
        if limit is None:
            return deadline
        end = asyncio.get_running_loop().time() + limit
        return end if deadline is None else min(end, deadline)

    @contextmanager
    def _mapped(self, *, before_first_byte: bool) -> Iterator[None]:
        """Translate aiohttp and timeout failures to the project's errors, in one place.

        Before the first byte nothing reached the client, so connection failures and timeouts
        are retryable; after it, a retry would duplicate output, so they are not.
        """
        try:
            yield
        except ProxyError:
            raise
        except TimeoutError as exc:  # asyncio.timeout and aiohttp's connect timeouts alike
            stage = "answer" if before_first_byte else "send more of its answer"
            raise UpstreamTimeout(
                f"Ollama at {self._where} did not {stage} in time", retryable=before_first_byte
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                f"cannot connect to Ollama at {self._where}", retryable=True
            ) from exc
        except aiohttp.ClientError as exc:
            stage = "before answering" if before_first_byte else "mid-answer"
            raise UpstreamError(
                f"the connection to Ollama at {self._where} failed {stage}",
                retryable=before_first_byte,
            ) from exc


def _fill_usage(usage: Usage, final: Mapping[str, Any]) -> None:
    usage.prompt_tokens = final.get("prompt_eval_count")
    usage.completion_tokens = final.get("eval_count")
    usage.extra = replies.timings(final)


def _status_error(
    status: int, raw: bytes, retry_after: str | None, model: str, tag: str
) -> ProxyError:
    message = _error_text(raw)
    if status == 404:
        # The public name alone when an alias hides the tag; the operator's pull hint otherwise.
        hint = f"`ollama pull {tag}`" if tag == model else "`ollama pull` for the configured model"
        return NotFound(
            f"model {model!r} is not available on this node's Ollama server "
            f"(the operator needs to run {hint}): {message}",
            code="model_not_found",
            param="model",
        )
    if status == 400:
        return BadRequest(f"Ollama rejected the request: {message}")
    after = _retry_after(retry_after)
    if status in (429, 503):
        return UpstreamError(
            f"Ollama is busy ({status}): {message}",
            status=status,
            retryable=True,
            retry_after=after,
        )
    return UpstreamError(
        f"Ollama failed ({status}): {message}",
        retryable=status in _RETRYABLE_STATUSES,
        retry_after=after,
    )


def _error_text(raw: bytes) -> str:
    """Ollama's ``{"error": "..."}`` message, or the start of whatever else the body holds."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:_ERROR_SNIPPET].decode(errors="replace").strip() or "(empty body)"
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return str(obj["error"])
    return orjson.dumps(obj).decode()[:_ERROR_SNIPPET]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None  # an HTTP date: rare from Ollama; the retry layer's backoff applies


def _canonical(name: str) -> str:
    """``llama3.2`` and ``llama3.2:latest`` are the same model to Ollama."""
    return name if ":" in name else f"{name}:latest"


def _model_object(entry: Mapping[str, Any], model_id: str) -> dict[str, Any]:
    name = entry.get("model") or entry.get("name") or ""
    owner, _, _ = name.rpartition("/")
    return {
        "id": model_id,
        "object": "model",
        "created": _epoch(entry.get("modified_at")),
        "owned_by": owner or "library",
    }


def _epoch(stamp: Any) -> int:
    if not isinstance(stamp, str):
        return 0
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return 0
