"""OpenAI request fields to vLLM engine settings, and engine output to OpenAI answers.

Pure data in and out: nothing here imports vLLM, so the mapping is cheap to test and the
in-process adapter (``proxy.adapters.vllm.engine``) keeps only the engine plumbing. The
answer shapes match the mock adapter's and vLLM's own OpenAI server's: ``model`` is the
public name the client asked for, streams put the role in the first delta, end with a chunk
carrying ``finish_reason``, then (when ``stream_options.include_usage``) a usage chunk, then
``[DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.errors import BadRequest
from proxy.wire import answers

#: Request fields copied onto vLLM's ``SamplingParams`` as they are (names are the same).
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


def reject_unsupported(endpoint: str, payload: dict[str, Any]) -> None:
    """400 for OpenAI features the in-process engine path does not implement.

    Silently ignoring them would hand the client an answer to a different question (no
    tool call, no JSON mode, one choice instead of ``n``); vLLM's own server does these.
    """
    if payload.get("n") not in (None, 1):
        raise BadRequest("n > 1 is not supported by the in-process vLLM engine", param="n")
    if payload.get("best_of") not in (None, 1):
        raise BadRequest("best_of is not supported by the in-process vLLM engine",
                         param="best_of")
    if payload.get("logprobs") or payload.get("top_logprobs"):
        raise BadRequest("logprobs are not supported by the in-process vLLM engine",
                         param="logprobs")
    if payload.get("echo"):
        raise BadRequest("echo is not supported by the in-process vLLM engine", param="echo")
    if payload.get("suffix"):
        raise BadRequest("suffix is not supported by the in-process vLLM engine", param="suffix")
    if payload.get("tools"):
        raise BadRequest("tools are not supported by the in-process vLLM engine; "
                         "run a vLLM server (url:) for tool calling", param="tools")
    if payload.get("logit_bias"):
        raise BadRequest("logit_bias is not supported by the in-process vLLM engine",
                         param="logit_bias")
    response_format = payload.get("response_format")
    if response_format and response_format.get("type", "text") != "text":
        raise BadRequest("response_format other than text is not supported by the in-process "
                         "vLLM engine", param="response_format")


def requested_max_tokens(payload: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` wins over the older ``max_tokens``, as in OpenAI's API."""
    value = payload.get("max_completion_tokens")
    return payload.get("max_tokens") if value is None else value


def clamp_max_tokens(requested: int | None, max_model_len: int, prompt_tokens: int) -> int:
    """What vLLM's server does: never more than the context has room for after the prompt."""
    room = max_model_len - prompt_tokens
    return room if requested is None else min(requested, room)


def sampling_options(payload: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``SamplingParams`` from the request, over the model's defaults.

    ``defaults`` are the model's generation-config values (vLLM's server applies them the
    same way); fields the request sets win.
    """
    options = {k: v for k, v in defaults.items() if k in SAMPLING_FIELDS}
    for name in SAMPLING_FIELDS:
        value = payload.get(name)
        if value is not None:
            options[name] = value
    stop = payload.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return options


def include_usage(payload: dict[str, Any]) -> bool:
    return bool((payload.get("stream_options") or {}).get("include_usage"))


class Answer:
    """The fixed parts of one answer (id, creation time, model, kind), rendered with the
    shared answer shapes of :mod:`proxy.wire.answers`."""

    __slots__ = ("chunks", "created", "ident", "kind", "model")

    def __init__(self, chat: bool, model: str) -> None:
        self.kind: answers.Kind = "chat" if chat else "completions"
        self.model = model
        self.ident = answers.new_id(self.kind)
        self.created = int(time.time())
        self.chunks = answers.Chunks(self.kind, self.ident, self.created, model)

    def whole(self, text: str, finish: str | None, prompt_tokens: int,
              completion_tokens: int) -> dict[str, Any]:
        """A non-streamed answer."""
        choice = (answers.chat_choice({"role": "assistant", "content": text}, finish)
                  if self.kind == "chat" else answers.text_choice(text, finish))
        return answers.completion(self.kind, self.ident, self.created, self.model, [choice],
                                  answers.usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str, *, first: bool = False, finish: str | None = None) -> bytes:
        """One SSE event: a text delta (the role rides on the first), or the final chunk."""
        out = b""
        if text or first or finish is None:
            if self.kind == "chat":
                delta: dict[str, Any] = {"content": text}
                if first:
                    delta = {"role": "assistant", **delta}
                out = self.chunks.content(delta)
            else:
                out = self.chunks.content(text)
        if finish is not None:
            out += self.chunks.finish(finish)
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self.chunks.usage(answers.usage(prompt_tokens, completion_tokens))


def embedding_inputs(payload: dict[str, Any]) -> list[str | list[int]]:
    """``input`` as a list of prompts (text, or token ids); shape checked by proxy.wire.checks."""
    value = payload["input"]
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]
    return list(value)
