"""``backend_provider: ollama``: OpenAI jobs on Ollama's native API (/api/chat, /api/generate,
/api/embed), with answers that read exactly like OpenAI's.

The mapping itself is in :mod:`.requests` (requests) and :mod:`.replies` (answers,
NDJSON to SSE); this module does the HTTP: timeouts, error statuses, the stream's lifetime.
Sending, credentials and connection errors are ``HTTPUpstream``'s, shared with the other HTTP
adapters. Ollama's timings land in ``UpstreamResponse.usage.extra`` for the metrics layer:
``total_duration``, ``load_duration``, ``prompt_eval_duration``, ``eval_duration`` (seconds),
``tokens_per_second`` and ``prompt_tokens_per_second``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from proxy.adapters.base import Job, UpstreamResponse, Usage
from proxy.adapters.http import HTTPUpstream, Stage
from proxy.adapters.lean import Answer
from proxy.adapters.ollama import replies
from proxy.adapters.ollama import requests as wire
from proxy.adapters.ollama.replies import NDJSONLines, StreamTranslator, parse_line
from proxy.config import BaseConfig, OllamaConfig, OllamaSection
from proxy.errors import (
    RETRYABLE_STATUSES,
    BadRequest,
    NotFound,
    ProxyError,
    UpstreamError,
)
from proxy.wire import answers
from proxy.wire.models import MAX_MODELS, ollama_models, parse

_PATHS = {"chat": "/api/chat", "completions": "/api/generate", "embeddings": "/api/embed"}
_JSON = {"Content-Type": "application/json"}
_ERROR_SNIPPET = 300  # characters of a non-JSON error body worth showing


class OllamaAdapter(HTTPUpstream):
    """Talks to one Ollama server; ``config.url`` is its base URL (no ``/v1``).

    Timeouts: ``connect`` and ``total`` bound the HTTP request (aiohttp); ``first_byte``
    bounds the wait for the first NDJSON line (for ``stream: false``, for the whole answer,
    which Ollama sends at once); ``idle`` bounds each later read.
    """

    name = "ollama"
    sampling = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "seed",
                "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs")
    top_k_off = 0

    def __init__(self, config: BaseConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        ollama = config.ollama if isinstance(config, OllamaConfig) else OllamaSection()
        self._options: Mapping[str, Any] = ollama.options
        self._keep_alive = ollama.keep_alive
        self._tag = config.upstream_name
        self._timeouts = config.timeouts

    # --- the seam --------------------------------------------------------------------------

    async def send(self, job: Job) -> UpstreamResponse:
        """POST the job to Ollama; stream jobs return once the first NDJSON line is in.

        Waiting for that line means an error Ollama reports as its first line, or a model
        load that outlasts ``first_byte``, still becomes a plain HTTP error the retry layer
        can act on, instead of an error event inside a 200 stream.
        """
        payload = job.payload
        if payload is None or job.endpoint not in _PATHS:
            raise NotFound(f"{job.path} is not served by the ollama backend", code="unknown_path")
        model = job.model or self._tag or ""
        tag = job.upstream_model or self._tag or model
        body = self._request_body(job, payload, tag)
        first_byte_by = asyncio.get_running_loop().time() + self._timeouts.first_byte
        resp = await self._post(_PATHS[job.endpoint], body, model=model, tag=tag)
        created = int(time.time())
        if job.stream and job.endpoint != "embeddings":
            options = payload.get("stream_options")
            translator = StreamTranslator(
                "chat" if job.endpoint == "chat" else "completions",
                model=model,
                response_id=answers.new_id("chat" if job.endpoint == "chat" else "completions"),
                created=created,
                include_usage=isinstance(options, Mapping) and bool(options.get("include_usage")),
                max_tool_calls=_max_tool_calls(payload),
            )
            return await self._stream(resp, translator, first_byte_by)
        obj = await self._read_json(resp, first_byte_by)
        if job.endpoint == "embeddings":
            answer = replies.embeddings_response(
                obj, model=model, encoding_format=payload.get("encoding_format")
            )
        elif job.endpoint == "chat":
            answer = replies.chat_response(
                obj,
                model=model,
                response_id=answers.new_id("chat"),
                created=created,
                max_tool_calls=_max_tool_calls(payload),
            )
        else:
            answer = replies.completion_response(
                obj, model=model, response_id=answers.new_id("completions"), created=created
            )
        out = UpstreamResponse.from_json(answer)
        _fill_usage(out.usage, obj)
        return out

    async def models(self) -> list[dict[str, Any]]:
        """Pulled models as OpenAI model objects, the configured public name first.

        The configured tag appears only under its public name (and aliases), so the upstream's
        own tag is never shown when an alias is set; other pulled models follow under theirs.
        """
        tags = await self._tags()
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

    async def facts(self) -> dict[str, Any]:
        """``/api/show`` of the configured model: its capabilities in OpenRouter's words, and
        the context it is served with (``ollama.options.num_ctx`` if set, else the model's)."""
        if self._tag is None:
            return {}
        resp = await self.request("POST", "/api/show", body=orjson.dumps({"model": self._tag}),
                                  headers=_JSON)
        raw = await self._read_all(resp, self._deadline(self._timeouts.idle))
        if resp.status != 200:
            raise UpstreamError(f"Ollama at {self.where} answered /api/show with {resp.status}")
        return show_facts(await _json_object(raw, "/api/show"), self._options.get("num_ctx"))

    async def check_ready(self) -> None:
        """Ollama answers ``/api/version`` and has the configured model pulled."""
        version = await self._get_json("/api/version")
        if not isinstance(version.get("version"), str):
            raise UpstreamError("Ollama gave no version from /api/version")
        if self._tag is None:
            return
        names = {_canonical(e.get("name") or e.get("model") or "") for e in await self._tags()}
        if _canonical(self._tag) not in names:
            raise UpstreamError(
                f"model {self._tag!r} is not pulled on the Ollama server; "
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
        self, path: str, body: dict[str, Any], *, model: str, tag: str
    ) -> Answer:
        """Send and wait for the status; a non-200 answer is read, released and raised."""
        # Ollama may stay silent while it loads a model: this adapter keeps its own read
        # deadlines (first_byte for the first line, idle after), so the client's own bound
        # between reads is switched off once the headers are in.
        resp = await self.request(
            "POST", path, body=orjson.dumps(body), headers=_JSON, read_timeout=None
        )
        if resp.status == 200:
            return resp
        raw = await self._read_all(resp, self._deadline(self._timeouts.idle))
        raise _status_error(resp.status, raw, resp.fields, model, tag)

    async def _read_json(self, resp: Answer, until: float) -> dict[str, Any]:
        return await _json_object(await self._read_all(resp, until), "its answer")

    async def _read_all(self, resp: Answer, until: float) -> bytes:
        """The whole body by loop time ``until``; the connection is released either way."""
        try:
            async with asyncio.timeout_at(until):
                return await self.read_all(resp, "start")
        except TimeoutError as exc:
            resp.close()
            raise self.error(exc, "start") from exc

    @staticmethod
    def _deadline(seconds: float) -> float:
        return asyncio.get_running_loop().time() + seconds

    async def _get_json(self, path: str) -> dict[str, Any]:
        resp = await self.request("GET", path)
        raw = await self._read_all(resp, self._deadline(self._timeouts.idle))
        if resp.status != 200:
            raise UpstreamError(
                f"Ollama answered {path} with {resp.status}: {_error_text(raw)}",
                retryable=resp.status in RETRYABLE_STATUSES,
            )
        return await _json_object(raw, path)

    async def _tags(self) -> list[dict[str, Any]]:
        """The pulled models of ``/api/tags``: entries that are not model objects are skipped
        (and logged), at most ``MAX_MODELS`` kept."""
        models = ollama_models(await self._get_json("/api/tags"))
        if models.skipped:
            self.note(logging.WARNING, f"Ollama's /api/tags held {models.skipped} entries that "
                      f"are not model objects or are over {MAX_MODELS}; skipped")
        return models.entries

    async def _stream(
        self, resp: Answer, translator: StreamTranslator, first_byte_by: float
    ) -> UpstreamResponse:
        lines = NDJSONLines()
        try:
            first = await self._first_lines(resp, lines, first_byte_by)
            head = b"".join(translator.line(obj) for obj in map(parse_line, first) if obj)
        except BaseException:
            resp.close()
            raise
        usage = Usage()
        idle = self._timeouts.idle
        loop = asyncio.get_running_loop()

        async def events() -> AsyncIterator[bytes]:
            out = head
            while translator.final is None:
                if out:
                    yield out
                chunk = await self._read(resp, loop.time() + idle, before_first_byte=False)
                # One SSE write per upstream read: every line the read finished, in order.
                parts: list[bytes] = []
                try:
                    for raw in lines.feed(chunk) if chunk else [lines.flush()]:
                        obj = parse_line(raw)
                        if obj is not None:
                            parts.append(translator.line(obj))
                except ProxyError:
                    if parts:  # what came before the failure in the same read still goes out
                        yield b"".join(parts)
                    raise
                out = b"".join(parts)
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

    async def _first_lines(
        self, resp: Answer, lines: NDJSONLines, first_byte_by: float
    ) -> list[bytes]:
        """The stream's first non-blank lines, read before answering (see send) by the
        first-byte deadline; a stream that ends without one is a retryable failure."""
        while True:
            chunk = await self._read(resp, first_byte_by, before_first_byte=True)
            if not chunk:
                last = lines.flush()
                if not last.strip():
                    raise UpstreamError("Ollama ended the stream without a line", retryable=True)
                return [last]
            first = [line for line in lines.feed(chunk) if line and not line.isspace()]
            if first:
                return first

    async def _read(
        self, resp: Answer, until: float, *, before_first_byte: bool
    ) -> bytes:
        """The next bytes by loop time ``until``: the first line's deadline is ``first_byte``
        (a model may be loading), each later read's is ``idle``."""
        stage: Stage = "start" if before_first_byte else "body"
        try:
            async with asyncio.timeout_at(until):
                return await self.read_some(resp, stage)
        except TimeoutError as exc:
            raise self.error(exc, stage) from exc


def _max_tool_calls(payload: Mapping[str, Any]) -> int | None:
    return 1 if payload.get("parallel_tool_calls") is False else None


async def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = await parse(raw)  # off the event loop when large
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"Ollama sent {what} as a body that is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise UpstreamError(f"Ollama sent {what} as JSON that is not an object")
    if isinstance(obj.get("error"), str):
        raise UpstreamError(f"Ollama failed: {obj['error']}")
    return obj


def _fill_usage(usage: Usage, final: Mapping[str, Any]) -> None:
    usage.prompt_tokens, usage.completion_tokens, usage.invalid = replies.token_counts(final)
    usage.extra = replies.timings(final)


def _status_error(
    status: int, raw: bytes, headers: Mapping[str, str], model: str, tag: str
) -> ProxyError:
    message = _error_text(raw)
    if tag != model:
        # Ollama names the tag in its messages; clients know the model by its public name.
        for name in sorted({tag, tag.removesuffix(":latest")}, key=len, reverse=True):
            message = message.replace(name, model)
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
    if status in (401, 403):
        # The node's credentials, not the client's: the client cannot fix this, so a 502.
        return UpstreamError(f"Ollama rejected the configured credentials ({status})")
    # Retry-After stays in the headers for the retry layer, the one place that parses it.
    retry = {"Retry-After": headers["Retry-After"]} if "Retry-After" in headers else None
    if status in (429, 503):
        return UpstreamError(
            f"Ollama is busy ({status}): {message}",
            status=status,
            retryable=True,
            headers=retry,
        )
    return UpstreamError(
        f"Ollama failed ({status}): {message}",
        retryable=status in RETRYABLE_STATUSES,
        headers=retry,
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


#: Ollama's capability names, as the catalog (OpenRouter) calls them.
_FEATURES = {"tools": ("tools",), "thinking": ("reasoning",),
             "completion": ("json_mode", "structured_outputs", "logprobs")}


def show_facts(show: Mapping[str, Any], num_ctx: Any = None) -> dict[str, Any]:
    """Catalog facts from an ``/api/show`` answer."""
    listed = show.get("capabilities")
    capabilities = [c for c in listed if isinstance(c, str)] if isinstance(listed, list) else []
    features = [f for c in capabilities for f in _FEATURES.get(c, ())]
    facts: dict[str, Any] = {
        "supported_features": sorted(set(features)),
        "input_modalities": ["text", "image"] if "vision" in capabilities else ["text"],
        "model_type": "embedding" if "embedding" in capabilities and "completion"
        not in capabilities else "chat",
    }
    info = show.get("model_info")
    context = None
    if isinstance(info, Mapping):
        arch = info.get("general.architecture")
        context = info.get(f"{arch}.context_length")
    if isinstance(num_ctx, int) and num_ctx > 0:
        context = num_ctx
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        facts["context_length"] = context
    return facts


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
