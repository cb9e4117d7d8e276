"""Ollama's answers as OpenAI's: whole responses, and NDJSON streams as SSE. No I/O here.

Whole answers: :func:`chat_response`, :func:`completion_response`, :func:`embeddings_response`.
Streams: :class:`NDJSONLines` cuts reads into lines (a line may span reads; a read may hold many
lines; the last line may lack its newline) and :class:`StreamTranslator` turns each parsed line
into SSE bytes. That runs once per upstream read, so the fixed part of every chunk is serialised
once and only the delta is encoded per line.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any, Literal

import orjson

from proxy.errors import UpstreamError
from proxy.wire import answers
from proxy.wire.tokens import counts

_FINISH_REASONS: Mapping[str, str] = {"length": "length", "stop": "stop"}


def finish_reason(obj: Mapping[str, Any], saw_tool_calls: bool) -> str:
    """OpenAI's finish_reason for Ollama's final object (``load``/``unload`` read as stop)."""
    if saw_tool_calls:
        return "tool_calls"
    reason = obj.get("done_reason")
    return _FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"


#: Ollama's token counts in its final object: prompt, then generated.
COUNTS = ("prompt_eval_count", "eval_count")


def token_counts(obj: Mapping[str, Any]) -> tuple[int | None, int | None, bool]:
    """Prompt and generated tokens (``None`` where absent or not a count, see
    ``proxy.wire.tokens``), and whether a count was present but not one."""
    (prompt, completion), invalid = counts(obj, COUNTS)
    return prompt, completion, invalid


def usage(obj: Mapping[str, Any]) -> dict[str, int]:
    """OpenAI's ``usage`` for the client; a count that is not one reads as 0."""
    prompt, completion, _ = token_counts(obj)
    return answers.usage(prompt or 0, completion or 0)


def timings(obj: Mapping[str, Any]) -> dict[str, float]:
    """Ollama's durations in seconds, plus generation and prompt speed in tokens per second."""
    out = {
        key: obj[key] / 1e9
        for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
        if type(obj.get(key)) is int and obj[key] >= 0
    }
    prompt, completion, _ = token_counts(obj)
    if out.get("eval_duration") and completion:
        out["tokens_per_second"] = completion / out["eval_duration"]
    if out.get("prompt_eval_duration") and prompt:
        out["prompt_tokens_per_second"] = prompt / out["prompt_eval_duration"]
    return out


def tool_calls(calls: list[Any], start: int = 0) -> list[dict[str, Any]]:
    """OpenAI tool calls (JSON-string arguments, ids) from Ollama's (object arguments)."""
    out = []
    for offset, call in enumerate(calls):
        fn = call.get("function") or {}
        arguments = fn.get("arguments")
        out.append(
            {
                "index": start + offset,
                "id": call.get("id") or f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {
                    "name": fn.get("name") or "",
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else orjson.dumps(arguments or {}).decode(),
                },
            }
        )
    return out


def chat_logprobs(entries: list[Any] | None) -> dict[str, Any] | None:
    """OpenAI chat ``logprobs`` (``{"content": [...]}``); Ollama's entries have the same shape."""
    if not entries:
        return None
    return {"content": [_token_logprob(entry) for entry in entries], "refusal": None}


def _token_logprob(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "token": entry.get("token", ""),
        "logprob": entry.get("logprob", 0.0),
        "bytes": entry.get("bytes"),
        "top_logprobs": [
            {"token": t.get("token", ""), "logprob": t.get("logprob", 0.0), "bytes": t.get("bytes")}
            for t in entry.get("top_logprobs") or ()
        ],
    }


def completion_logprobs(entries: list[Any] | None, offset: int = 0) -> dict[str, Any] | None:
    """Legacy completions ``logprobs`` (parallel lists) from Ollama's per-token entries."""
    if not entries:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        token = entry.get("token", "")
        tokens.append(token)
        values.append(entry.get("logprob", 0.0))
        tops.append(
            {t.get("token", ""): t.get("logprob", 0.0) for t in entry.get("top_logprobs") or ()}
        )
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_response(
    obj: Mapping[str, Any],
    *,
    model: str,
    response_id: str,
    created: int,
    max_tool_calls: int | None = None,
) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` for a non-streamed ``/api/chat`` answer.

    ``max_tool_calls`` (1 for ``parallel_tool_calls: false``) keeps only the first calls.
    """
    message = obj.get("message") or {}
    calls = tool_calls((message.get("tool_calls") or [])[:max_tool_calls])
    out_message: dict[str, Any] = {
        "role": "assistant",
        "content": message.get("content") or (None if calls else ""),
    }
    if calls:
        for call in calls:
            del call["index"]  # index belongs to stream deltas only
        out_message["tool_calls"] = calls
    if message.get("thinking"):
        out_message["reasoning"] = message["thinking"]
    choice = answers.chat_choice(out_message, finish_reason(obj, bool(calls)),
                                 chat_logprobs(obj.get("logprobs")))
    return answers.completion("chat", response_id, created, model, [choice], usage(obj))


def completion_response(
    obj: Mapping[str, Any], *, model: str, response_id: str, created: int
) -> dict[str, Any]:
    """The OpenAI ``text_completion`` for a non-streamed ``/api/generate`` answer."""
    choice = answers.text_choice(obj.get("response") or "", finish_reason(obj, False),
                                 completion_logprobs(obj.get("logprobs")))
    return answers.completion("completions", response_id, created, model, [choice], usage(obj))


def embeddings_response(
    obj: Mapping[str, Any], *, model: str, encoding_format: str | None
) -> dict[str, Any]:
    """The OpenAI embeddings list; ``base64`` packs each vector as little-endian float32."""
    return answers.embeddings(model, list(obj.get("embeddings") or ()),
                              token_counts(obj)[0] or 0, encoding_format)


class NDJSONLines:
    """Splits a byte stream into lines; feed reads in order, then ``flush`` for the last one."""

    __slots__ = ("_pending", "_pending_size", "max_line")

    def __init__(self, max_line: int = 16 * 1024 * 1024) -> None:
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines ``data`` finishes (blank ones included; callers skip them)."""
        if b"\n" not in data:
            if data:
                self._pending.append(data)
                self._pending_size += len(data)
                if self._pending_size > self.max_line:
                    raise UpstreamError(f"Ollama sent a line longer than {self.max_line} bytes")
            return []
        if self._pending:
            self._pending.append(data)
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            self._pending.append(tail)
            self._pending_size = len(tail)
        return lines

    def flush(self) -> bytes:
        """What is left after the last read: a final line sent without its newline, or b""."""
        tail = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return tail


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One NDJSON line as an object; ``None`` for a blank line. Raises 502 on bad JSON."""
    if not line or line.isspace():
        return None
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("Ollama sent a line that is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise UpstreamError("Ollama sent a JSON line that is not an object")
    return obj


class StreamTranslator:
    """Turns the objects of one Ollama stream into OpenAI SSE events.

    ``line(obj)`` returns the SSE bytes for one Ollama object (possibly b"") and raises
    ``UpstreamError`` for an ``{"error": ...}`` line. After the ``done`` object, ``final`` holds
    it and ``end()`` returns the closing events (usage chunk if asked for, then ``[DONE]``).
    The first chat delta carries ``role``; a done object yields a chunk with ``finish_reason``.
    """

    def __init__(
        self,
        kind: Literal["chat", "completions"],
        *,
        model: str,
        response_id: str,
        created: int,
        include_usage: bool,
        max_tool_calls: int | None = None,
    ) -> None:
        self.kind = kind
        self.final: dict[str, Any] | None = None
        self._include_usage = include_usage
        self._max_tool_calls = max_tool_calls
        self._tool_calls = 0
        self._role_sent = False
        self._text_offset = 0
        self._chunks = answers.Chunks(kind, response_id, created, model)

    def line(self, obj: Mapping[str, Any]) -> bytes:
        error = obj.get("error")
        if error is not None:
            raise UpstreamError(f"Ollama failed: {_error_text(error)}")
        out = self._chat(obj) if self.kind == "chat" else self._completion(obj)
        if obj.get("done"):
            self.final = dict(obj)
            out += self._chunks.finish(finish_reason(obj, self._tool_calls > 0))
        return out

    def end(self) -> bytes:
        """The closing events; raises ``UpstreamError`` if the stream stopped before ``done``."""
        if self.final is None:
            raise UpstreamError("Ollama closed the stream before its final 'done' object")
        if not self._include_usage:
            return answers.DONE
        return self._chunks.usage(usage(self.final)) + answers.DONE

    def _chat(self, obj: Mapping[str, Any]) -> bytes:
        message = obj.get("message") or {}
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
            if not message.get("tool_calls"):
                delta["content"] = ""
        if message.get("thinking"):
            delta["reasoning"] = message["thinking"]
        if message.get("content"):
            delta["content"] = message["content"]
        calls = message.get("tool_calls")
        if calls:
            if self._max_tool_calls is not None:
                calls = calls[: max(self._max_tool_calls - self._tool_calls, 0)]
            if calls:
                delta["tool_calls"] = tool_calls(calls, self._tool_calls)
                self._tool_calls += len(calls)
        if not delta:
            return b""
        return self._chunks.content(delta, chat_logprobs(obj.get("logprobs")))

    def _completion(self, obj: Mapping[str, Any]) -> bytes:
        text = obj.get("response")
        if not text:
            return b""
        logprobs = completion_logprobs(obj.get("logprobs"), self._text_offset)
        self._text_offset += len(text)
        return self._chunks.content(text, logprobs)


def _error_text(error: Any) -> str:
    return error if isinstance(error, str) else orjson.dumps(error).decode()
