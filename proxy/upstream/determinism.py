"""Answers a quorum can compare (``determinism: {enforce: true, seed: N}``).

:func:`force` overwrites a request's sampling so that every node decodes the same way
(temperature 0, top_p 1, top_k off where the backend has it, the configured seed).
:func:`stamp` makes an answer carry the SHA-256 of its output text: a whole answer in the
``X-Output-SHA256`` header and an ``output_sha256`` member; a stream, whose headers leave
before its text is known, in a last chunk before ``data: [DONE]``. The output text is every
choice's content (chat) or text (completions), in choice order; reasoning and tool calls are
not part of it.

Only configs that enforce determinism pay for this: a stream's events are parsed here.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.adapters.base import UpstreamResponse
from proxy.config import DeterminismSection

HEADER = "X-Output-SHA256"


def force(payload: dict[str, Any], settings: DeterminismSection, top_k_off: int | None) -> None:
    """Overwrite ``payload``'s sampling parameters in place; ``top_k_off`` is the upstream's
    value that turns top-k off (``Adapter.top_k_off``; ``None``: it takes no ``top_k``)."""
    payload["temperature"] = 0
    payload["top_p"] = 1
    payload["seed"] = settings.seed
    off = top_k_off
    if off is not None:
        payload["top_k"] = off
    else:
        payload.pop("top_k", None)


def output_text(answer: Any) -> str:
    """The output text of a whole chat or text completion."""
    parts = []
    for choice in (answer.get("choices") or ()) if isinstance(answer, dict) else ():
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        if isinstance(text, str):
            parts.append(text)
    return "".join(parts)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stamp(response: UpstreamResponse) -> None:
    """Make a successful answer carry its output's SHA-256 (in place)."""
    if response.status != 200:
        return
    if not response.stream:
        assert response.body is not None, "the pipeline reads whole answers before relay"
        try:
            answer = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(answer, dict):
            return
        hashed = digest(output_text(answer))
        answer["output_sha256"] = hashed
        response.body = orjson.dumps(answer)
        response.headers = {**_without_length(response.headers), HEADER: hashed}
        return
    response.map_chunks(_stamped_stream)


async def _stamped_stream(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    parts: list[str] = []
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *events, pending = pending.split(b"\n\n")
        out = []
        for event in events:
            data = event.removeprefix(b"data:").strip()
            if data == b"[DONE]":
                out.append(_final(digest("".join(parts))))
            elif data.startswith(b"{"):
                _collect(data, parts)
            out.append(event + b"\n\n")
        if out:
            yield b"".join(out)
    if pending:
        yield pending


def _collect(data: bytes, parts: list[str]) -> None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    for choice in obj.get("choices") or () if isinstance(obj, dict) else ():
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str):
            parts.append(text)


def _final(hashed: str) -> bytes:
    return b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [],
                                     "output_sha256": hashed}) + b"\n\n"


def _without_length(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() != "content-length"}
