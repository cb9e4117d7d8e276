"""vLLM's own OpenAI layer, driven in-process: the proxy hands it requests, not HTTP.

``vllm serve`` is a FastAPI app around serving classes (``OpenAIServingChat``,
``OpenAIServingCompletion``, ``ServingEmbedding``) that take a parsed request model and a
``raw_request`` they read only for headers and per-request state. Here the same classes are
built by vLLM's own ``init_app_state`` and called directly: the request model is parsed from
the bytes the client sent, the answer (JSON, or the SSE strings of a stream) is relayed as
vLLM renders it, and every refusal keeps vLLM's status, type, message and ``param``. So the
in-process mode answers as ``vllm serve`` does (``n``, logprobs, ``echo``, tools, structured
outputs, reasoning parsers, usage in streams, the same 400 for ``max_tokens`` over the
context), without a port or a second process.

What stays the proxy's: timeouts, a client that goes away (closing the stream aborts the
engine request), token counts for ``/metrics``, and the translation of vLLM's
``ErrorResponse`` into a :class:`~proxy.errors.ProxyError`, in :func:`error_from`.

vLLM is imported inside functions only, like the rest of the in-process adapter.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import orjson
from multidict import CIMultiDict

from proxy.adapters.base import JSON_HEADERS, Job, UpstreamResponse, Usage
from proxy.errors import ProxyError, Unavailable, UpstreamError, UpstreamTimeout
from proxy.wire.relayed import Relayed

#: ``state`` attribute of vLLM's serving object for each endpoint, and what vLLM says when
#: the model cannot serve it (its router raises ``NotImplementedError``: a 501).
HANDLERS: Mapping[str, tuple[str, str]] = {
    "chat": ("openai_serving_chat", "The model does not support Chat Completions API"),
    "completions": ("openai_serving_completion", "The model does not support Completions API"),
    "embeddings": ("serving_embedding", "The model does not support Embeddings API"),
}
_USAGE_MARK = b'"usage":{"prompt_tokens"'


class RawRequest:
    """What vLLM's serving classes read from ``raw_request``: ``headers`` (``X-Request-Id``,
    priority, data-parallel rank, trace context) and ``state`` (they store the request's
    metadata there). ``app.state`` is vLLM's own, for its error handlers."""

    __slots__ = ("app", "headers", "state")

    def __init__(self, headers: Mapping[str, str], request_id: str, app_state: Any) -> None:
        self.headers: CIMultiDict[str] = CIMultiDict(headers)
        if request_id:
            self.headers["X-Request-Id"] = request_id
        self.state = types.SimpleNamespace()
        self.app = types.SimpleNamespace(state=app_state)


class Frontend:
    """vLLM's serving objects over one engine, built as ``vllm serve`` builds them."""

    def __init__(self, state: Any) -> None:
        from pydantic import TypeAdapter
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

        self.state = state
        #: The request model of each endpoint, as vLLM's router parses it from the body.
        self.models: dict[str, Any] = {
            "chat": TypeAdapter(ChatCompletionRequest),
            "completions": TypeAdapter(CompletionRequest),
            "embeddings": TypeAdapter(EmbeddingRequest),  # a union of two request shapes
        }

    @classmethod
    async def open(cls, engine: Any, args: Any, tasks: tuple[Any, ...]) -> Frontend:
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        state = State()
        await init_app_state(engine, state, args, tasks)
        return cls(state)

    async def answer(self, job: Job, first_byte: float, total: float) -> UpstreamResponse:
        """Serve one request; ``ProxyError`` for anything vLLM refuses or fails."""
        raw = RawRequest(job.headers, job.request_id, self.state)
        attribute, unsupported = HANDLERS[job.endpoint]
        handler = getattr(self.state, attribute, None)
        # A stream must begin (its first event) within first_byte; a whole answer must be
        # complete within total.
        limit = first_byte if job.stream else total
        deadline = asyncio.get_running_loop().time() + limit
        try:
            async with asyncio.timeout_at(deadline):
                if handler is None:
                    raise NotImplementedError(unsupported)
                request = self.models[job.endpoint].validate_json(job.body)
                if job.endpoint == "embeddings":
                    return _whole_response(await handler(request, raw), _renamer(job))
                create = (handler.create_chat_completion if job.endpoint == "chat"
                          else handler.create_completion)
                result = await create(request, raw)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"the vLLM engine did not answer within {limit:g} s") from exc
        except Exception as exc:  # every vLLM refusal becomes an answer
            raise await error_from(exc, raw) from exc
        return await _response(result, deadline, limit, _renamer(job))


def _renamer(job: Job) -> Relayed:
    """vLLM names its served model in answers; they name the model the client asked for
    (``proxy.wire.relayed``, on bytes)."""
    return Relayed(job.model or "")


async def _response(result: Any, deadline: float, limit: float,
                    renamer: Relayed) -> UpstreamResponse:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        raise _proxy_error(result)
    if not isinstance(result, AsyncGenerator):
        from starlette.responses import JSONResponse

        body = bytes(JSONResponse(content=result.model_dump()).body)
        response = UpstreamResponse(200, JSON_HEADERS, stream=False, body=renamer.rename(body))
        usage = getattr(result, "usage", None)
        if usage is not None:
            response.usage.prompt_tokens = usage.prompt_tokens
            response.usage.completion_tokens = usage.completion_tokens
        return response
    # The first event inside ``send``: until the engine has produced something, a timeout
    # can still become a status (and the retry layer sees it).
    try:
        async with asyncio.timeout_at(deadline):
            first = await anext(result, None)
    except TimeoutError as exc:
        await result.aclose()
        raise UpstreamTimeout(f"the vLLM engine produced nothing within {limit:g} s") from exc
    except BaseException:
        await result.aclose()
        raise
    usage = Usage()
    response = UpstreamResponse.from_sse(_events(first, result, usage, renamer),
                                         release=result.aclose)
    response.usage = usage
    return response


async def _events(first: str | None, rest: AsyncGenerator[str, None],
                  usage: Usage, renamer: Relayed) -> AsyncIterator[bytes]:
    event = first
    while event is not None:
        data = renamer.rename(event.encode())
        if _USAGE_MARK in data:  # the usage event (stream_options.include_usage)
            _count(data, usage)
        yield data
        event = await anext(rest, None)


def _count(event: bytes, usage: Usage) -> None:
    try:
        counts = orjson.loads(event.removeprefix(b"data: ")).get("usage") or {}
    except orjson.JSONDecodeError:
        return
    usage.prompt_tokens = counts.get("prompt_tokens")
    usage.completion_tokens = counts.get("completion_tokens")


def _whole_response(result: Any, renamer: Relayed) -> UpstreamResponse:
    """A starlette ``Response`` (what ``ServingEmbedding`` returns) as ours."""
    body = bytes(result.body)
    if result.status_code == 200:
        body = renamer.rename(body)
    response = UpstreamResponse(result.status_code, JSON_HEADERS, stream=False, body=body)
    if result.status_code == 200:
        usage = orjson.loads(body).get("usage") or {}
        response.usage.prompt_tokens = usage.get("prompt_tokens")
    return response


async def error_from(exc: Exception, raw: RawRequest) -> ProxyError:
    """What ``vllm serve``'s exception handlers answer for ``exc``, as a ``ProxyError``."""
    from pydantic import ValidationError
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, ValidationError):
        return await _validation_error(exc, raw)
    return _proxy_error(create_error_response(exc))


async def _validation_error(exc: Any, raw: RawRequest) -> ProxyError:
    """A request model that did not parse: FastAPI's ``RequestValidationError`` (its errors
    located under ``body``), rendered by vLLM's own handler for it."""
    from fastapi.exceptions import RequestValidationError
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.exception_handling.handlers.validation import (
        validation_exception_handler,
    )

    errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
    answer = await validation_exception_handler(raw, RequestValidationError(errors))  # type: ignore[arg-type]
    return _proxy_error(ErrorResponse.model_validate_json(bytes(answer.body)))


def _proxy_error(error: Any) -> ProxyError:
    """vLLM's ``ErrorResponse`` with its status, type, message and ``param``."""
    info = error.error
    status = int(info.code)
    if status == 503:
        return Unavailable(info.message, type=info.type, param=info.param, retry_after=1)
    if status >= 500 and status != 501:  # 501: the model cannot do that; nothing failed
        return UpstreamError(info.message, status=status, type=info.type, param=info.param)
    return ProxyError(info.message, status=status, type=info.type, param=info.param)
