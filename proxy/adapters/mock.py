"""A deterministic built-in backend: the answer is a function of SHA-256(model, prompt).

It needs nothing installed and no network, so the proxy can be tried at once, and tests get
byte-stable answers. Output length is ``min(max_tokens, 16)`` words.
"""

from __future__ import annotations

import hashlib
import math
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
    sampling = ("max_tokens",)

    async def send(self, job: Job) -> UpstreamResponse:
        payload = job.payload or {}
        model = job.model or "mock"
        if job.endpoint == "embeddings":
            return UpstreamResponse.from_json(embeddings(model, payload))
        prompt = _prompt(job.endpoint, payload)
        # checked with the request: an integer of at least 1 (proxy.wire.checks)
        limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
        count = DEFAULT_WORDS if limit is None else min(limit, DEFAULT_WORDS)
        words = list(_words(model, prompt, count))
        finish = "length" if limit is not None and limit < DEFAULT_WORDS else "stop"
        prompt_tokens = len(prompt.split())
        counts = answers.usage(prompt_tokens, count)
        kind: answers.Kind = "chat" if job.endpoint == "chat" else "completions"
        ident = answers.new_id(kind)
        created = int(time.time())
        if job.stream:
            options = payload.get("stream_options") or {}
            shown = counts if options.get("include_usage") else None
            chunks = answers.Chunks(kind, ident, created, model)
            response = UpstreamResponse.from_sse(_stream(chunks, words, finish, shown))
        else:
            text = " ".join(words)
            choice = (answers.chat_choice({"role": "assistant", "content": text}, finish)
                      if kind == "chat" else answers.text_choice(text, finish))
            response = UpstreamResponse.from_json(
                answers.completion(kind, ident, created, model, [choice], counts))
        response.usage.prompt_tokens = prompt_tokens
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
    chunks: answers.Chunks, words: list[str], finish: str, usage: dict[str, int] | None
) -> AsyncIterator[bytes]:
    chat = chunks.kind == "chat"
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        if chat:
            yield chunks.content({"role": "assistant", "content": text} if i == 0
                                 else {"content": text})
        else:
            yield chunks.content(text)
    yield chunks.finish(finish)
    if usage is not None:
        yield chunks.usage(usage)
    yield answers.DONE


def embeddings(model: str, payload: dict[str, Any]) -> dict[str, Any]:
    inputs = payload.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("input must be a string or a non-empty list", param="input")
    dims = payload.get("dimensions") or DEFAULT_DIMENSIONS  # range checked with the request
    vectors = []
    tokens = 0
    for item in inputs:
        text = item if isinstance(item, str) else str(item)
        tokens += len(text.split())
        raw = b"".join(
            hashlib.sha256(f"{model}\0{text}\0{block}".encode()).digest()
            for block in range(math.ceil(dims / 32))
        )
        vector = [b / 127.5 - 1.0 for b in raw[:dims]]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        vectors.append([v / norm for v in vector])
    return answers.embeddings(model, vectors, tokens, payload.get("encoding_format"))
