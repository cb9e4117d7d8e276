"""OpenAI request fields to vLLM engine settings, and engine output to OpenAI answers.

Pure data in and out: nothing here imports vLLM, so the mapping is cheap to test and the
in-process adapter (``proxy.adapters.vllm.engine``) keeps only the engine plumbing. The
answer shapes match the mock adapter's and vLLM's own OpenAI server's: ``model`` is the
public name the client asked for, streams put the role in the first delta, end with a chunk
carrying ``finish_reason``, then (when ``stream_options.include_usage``) a usage chunk, then
``[DONE]``.
"""

from __future__ import annotations

import base64
import os
import struct
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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Answer:
    """The fixed parts of one answer (id, creation time, model, kind) and its renderers."""

    __slots__ = ("chat", "created", "ident", "model")

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.ident = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        self.created = int(time.time())

    def whole(self, text: str, finish: str | None, prompt_tokens: int,
              completion_tokens: int) -> dict[str, Any]:
        """A non-streamed answer."""
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "logprobs": None, "finish_reason": finish}
            if self.chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        )
        return {
            "id": self.ident,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def chunk(self, text: str, *, first: bool = False, finish: str | None = None) -> bytes:
        """One SSE event: a text delta (the role rides on the first), or the final chunk."""
        if self.chat:
            delta: dict[str, Any] = {} if finish is not None and not text else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return answers.event({"id": self.ident, "object": kind, "created": self.created,
                          "model": self.model, "choices": [choice]})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return answers.event({
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
        })


def embedding_inputs(payload: dict[str, Any]) -> list[str | list[int]]:
    """``input`` as a list of prompts (text, or token ids); shape checked by proxy.inputs."""
    value = payload["input"]
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]
    return list(value)


def embedding_item(index: int, vector: list[float], encoding: str) -> dict[str, Any]:
    """One ``data`` entry; ``base64`` is little-endian float32, as OpenAI sends it."""
    if encoding == "base64":
        raw = struct.pack(f"<{len(vector)}f", *vector)
        embedding: Any = base64.b64encode(raw).decode("ascii")
    else:
        embedding = vector
    return {"object": "embedding", "index": index, "embedding": embedding}


def embedding_encoding(payload: dict[str, Any]) -> str:
    encoding = payload.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("encoding_format must be float or base64", param="encoding_format")
    return str(encoding)
