"""A deterministic built-in backend: the answer is a function of SHA-256(model, prompt).

It needs nothing installed and no network, so the proxy can be tried at once, and tests get
byte-stable answers. Output length is ``min(max_tokens, 16)`` words.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.errors import BadRequest
from proxy.wire import answers

WORDS = (
    "the a node proxy model token stream answer network backend quick steady small fast "
    "bright quiet river stone cloud signal light path bridge garden echo field harbor lantern "
    "meadow orbit pixel quartz ripple summit timber vector willow amber cedar delta ember "
    "falcon glacier horizon island jasper kernel lumen marble nectar opal prism quill raven "
    "sable tundra umber velvet wander zephyr and of to in on with"
).split()
DEFAULT_WORDS = 16
DEFAULT_DIMENSIONS = 16


class MockAdapter(Adapter):
    name = "mock"

    async def send(self, job: Job) -> UpstreamResponse:
        payload = job.payload or {}
        model = job.model or "mock"
        if job.endpoint == "embeddings":
            return UpstreamResponse.from_json(embeddings(model, payload))
        prompt = _prompt(job.endpoint, payload)
        limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
        if limit is not None and (type(limit) is not int or limit < 1):
            raise BadRequest("max_tokens must be a positive integer", param="max_tokens")
        count = DEFAULT_WORDS if limit is None else min(limit, DEFAULT_WORDS)
        words = list(_words(model, prompt, count))
        finish = "length" if limit is not None and limit < DEFAULT_WORDS else "stop"
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": count,
            "total_tokens": len(prompt.split()) + count,
        }
        chat = job.endpoint == "chat"
        ident = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        created = int(time.time())
        if job.stream:
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
            shown = usage if include_usage else None
            events = _stream(ident, created, model, chat, words, finish, shown)
            response = UpstreamResponse.from_sse(events)
        else:
            text = " ".join(words)
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            )
            response = UpstreamResponse.from_json(
                {
                    "id": ident,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        response.usage.prompt_tokens = usage["prompt_tokens"]
        response.usage.completion_tokens = count
        return response

    async def models(self) -> list[dict[str, Any]]:
        return [{"id": "mock", "object": "model", "created": 0, "owned_by": "model-backend-proxy"}]


def _words(model: str, prompt: str, count: int) -> Iterator[str]:
    seed = hashlib.sha256(f"{model}\0{prompt}".encode()).digest()
    block = 0
    produced = 0
    while produced < count:
        digest = hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        for byte in digest:
            if produced == count:
                return
            yield WORDS[byte % len(WORDS)]
            produced += 1
        block += 1


def _prompt(endpoint: str, payload: dict[str, Any]) -> str:
    if endpoint == "completions":
        prompt = payload.get("prompt", "")
        return prompt if isinstance(prompt, str) else "\n".join(map(str, prompt))
    parts = []
    for message in payload.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        role = message.get("role", "") if isinstance(message, dict) else ""
        parts.append(f"{role}: {content or ''}")
    return "\n".join(parts)


async def _stream(
    ident: str,
    created: int,
    model: str,
    chat: bool,
    words: list[str],
    finish: str,
    usage: dict[str, int] | None,
) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict[str, Any] | str, finish_reason: str | None) -> bytes:
        choice: dict[str, Any] = (
            {"index": 0, "delta": delta, "finish_reason": finish_reason}
            if chat
            else {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        )
        return answers.event(
            {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
        )

    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        if chat:
            delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
            yield chunk(delta, None)
        else:
            yield chunk(text, None)
    yield chunk({} if chat else "", finish)
    if usage is not None:
        yield answers.event(
            {
                "id": ident,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
    yield answers.DONE


def embeddings(model: str, payload: dict[str, Any]) -> dict[str, Any]:
    inputs = payload.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("input must be a string or a non-empty list", param="input")
    dims = payload.get("dimensions", DEFAULT_DIMENSIONS)
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 4096:
        raise BadRequest("dimensions must be an integer from 1 to 4096", param="dimensions")
    data = []
    tokens = 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else str(item)
        tokens += len(text.split())
        raw = b"".join(
            hashlib.sha256(f"{model}\0{text}\0{block}".encode()).digest()
            for block in range(math.ceil(dims / 32))
        )
        vector = [b / 127.5 - 1.0 for b in raw[:dims]]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        unit = [v / norm for v in vector]
        data.append({"object": "embedding", "index": index, "embedding": unit})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
