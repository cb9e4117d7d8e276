"""Every answer shape the proxy makes itself, in OpenAI's format: ids, usage, chat and text
completions, stream chunks, embeddings, and server-sent events. Pure data, no I/O.

The mock, Ollama and the in-process vLLM engine all answer through these builders, so their
answers agree: ``chatcmpl-``/``cmpl-`` ids of 24 hex digits, a ``logprobs`` member on every
choice (``null`` when there are none), ``usage`` with ``total_tokens``, one ``[DONE]``.
Streams are rendered on bytes: :class:`Chunks` serialises an answer's fixed part once and
splices each delta into it, so a chunk costs one small ``orjson.dumps``.
"""

from __future__ import annotations

import base64
import secrets
import struct
from collections.abc import Sequence
from typing import Any, Literal

import orjson

from proxy.errors import ProxyError

Kind = Literal["chat", "completions"]

DONE = b"data: [DONE]\n\n"
_OBJECTS = {"chat": "chat.completion", "completions": "text_completion"}
_CHUNK_OBJECTS = {"chat": "chat.completion.chunk", "completions": "text_completion"}
_ID_PREFIXES = {"chat": "chatcmpl", "completions": "cmpl"}


def event(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(exc: ProxyError, request_id: str = "") -> bytes:
    """The final event of a stream that failed after it started; ``request_id`` (when given)
    sits beside ``error``, as in the edge's error answers."""
    body = exc.body()
    if request_id:
        body["request_id"] = request_id
    return event(body)


def new_id(kind: Kind) -> str:
    """An OpenAI-style object id: ``chatcmpl-`` or ``cmpl-`` and 24 hex digits."""
    return f"{_ID_PREFIXES[kind]}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_choice(
    message: dict[str, Any], finish_reason: str | None, logprobs: Any = None, index: int = 0
) -> dict[str, Any]:
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}


def text_choice(
    text: str, finish_reason: str | None, logprobs: Any = None, index: int = 0
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(
    kind: Kind, ident: str, created: int, model: str, choices: Sequence[dict[str, Any]],
    usage: dict[str, int] | None,
) -> dict[str, Any]:
    """A whole (non-streamed) ``chat.completion`` or ``text_completion``."""
    out: dict[str, Any] = {"id": ident, "object": _OBJECTS[kind], "created": created,
                           "model": model, "choices": list(choices)}
    if usage is not None:
        out["usage"] = usage
    return out


def embedding_item(index: int, vector: Sequence[float], encoding: str | None) -> dict[str, Any]:
    """One ``data`` entry; ``base64`` is little-endian float32, as OpenAI sends it."""
    embedding: Any = vector
    if encoding == "base64":
        embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return {"object": "embedding", "index": index, "embedding": embedding}


def embeddings(
    model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int,
    encoding: str | None = None,
) -> dict[str, Any]:
    """The embeddings list for ``vectors`` in input order."""
    return {
        "object": "list",
        "data": [embedding_item(i, vector, encoding) for i, vector in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


class Chunks:
    """The stream chunks of one answer: ``content`` deltas, the ``finish`` chunk, ``usage``.

    A chat delta is an object (``{"role": ..., "content": ...}``); a text completion's is the
    text itself. Every chunk's choice has ``index`` 0 and a ``logprobs`` member.
    """

    __slots__ = ("_head", "_prefix", "kind")

    def __init__(self, kind: Kind, ident: str, created: int, model: str) -> None:
        self.kind = kind
        self._head = orjson.dumps(
            {"id": ident, "object": _CHUNK_OBJECTS[kind], "created": created, "model": model}
        )[:-1]
        field = b'"delta":' if kind == "chat" else b'"text":'
        self._prefix = b"data: " + self._head + b',"choices":[{"index":0,' + field

    def content(self, delta: Any, logprobs: Any = None) -> bytes:
        """One chunk carrying ``delta`` (a chat delta object, or completion text)."""
        tail = b"null" if logprobs is None else orjson.dumps(logprobs)
        return (self._prefix + orjson.dumps(delta) + b',"logprobs":' + tail
                + b',"finish_reason":null}]}\n\n')

    def finish(self, reason: str) -> bytes:
        """The chunk that ends the choice: an empty delta with ``finish_reason``."""
        empty = b"{}" if self.kind == "chat" else b'""'
        return (self._prefix + empty + b',"logprobs":null,"finish_reason":'
                + orjson.dumps(reason) + b"}]}\n\n")

    def usage(self, counts: dict[str, int]) -> bytes:
        """The usage chunk OpenAI sends for ``stream_options.include_usage``: no choices."""
        return b"data: " + self._head + b',"choices":[],"usage":' + orjson.dumps(counts) + b"}\n\n"
