"""A fake Ollama server for tests: a real ``web.Application`` that follows Ollama's API docs.

It serves ``/api/chat``, ``/api/generate`` (NDJSON streams as ``application/x-ndjson`` by
default, one JSON object with ``"stream": false``), ``/api/embed``, ``/api/tags``, ``/api/show``
and ``/api/version``. Answers are deterministic: the reply is ``state.reply`` or an echo of the
last user message, split into word chunks; the final ``done`` object carries counters and
durations. Error bodies are ``{"error": "..."}`` with Ollama's statuses.

Tests steer it through :class:`FakeOllama` (``app[FAKE_OLLAMA]``): which models are pulled,
injected failures, a mid-stream error line, how lines are cut into writes, delays. It records
every request it gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler


@dataclass
class FakeModel:
    """One pulled model, as /api/tags and /api/show describe it."""

    name: str
    family: str = "llama"
    context_length: int = 8192
    capabilities: tuple[str, ...] = ("completion", "tools")
    parameter_size: str = "3.2B"


@dataclass
class Recorded:
    path: str
    body: Any
    headers: Mapping[str, str]


@dataclass
class FakeOllama:
    """The knobs and the log of one fake server; tests change the fields between requests."""

    models: dict[str, FakeModel] = field(
        default_factory=lambda: {
            "llama3.2:latest": FakeModel("llama3.2:latest"),
            "all-minilm:latest": FakeModel(
                "all-minilm:latest", family="bert", context_length=512, capabilities=("embedding",)
            ),
        }
    )
    version: str = "0.12.6"
    #: Fixed answer text; None answers with an echo of the last user message.
    reply: str | None = None
    thinking: str | None = None
    #: Ollama-shaped tool calls to answer with when the request has tools; None picks the first
    #: tool and fills its required arguments with the last user message.
    tool_calls: list[dict[str, Any]] | None = None
    #: Per-token log probabilities in the answer, when the request asks for them.
    logprobs: bool = True
    #: Fail requests to these paths with this status and ``{"error": fail_message}``.
    fail_status: int | None = None
    fail_message: str = "something went wrong"
    fail_paths: tuple[str, ...] = ("/api/chat", "/api/generate", "/api/embed")
    fail_times: int | None = None  # None: every request; n: the next n, then succeed
    retry_after: str | None = None
    #: Send ``{"error": ...}`` after this many content lines of a stream (0: as the first line).
    error_after: int | None = None
    error_message: str = "an error was encountered while running the model"
    #: 200 with a body that is not JSON (non-stream) or a line that is not JSON (stream).
    garbage: bool = False
    #: Stop a stream after the content lines, without the final ``done`` object.
    stop_before_done: bool = False
    #: Answer a stream with 200 and no lines at all.
    empty_stream: bool = False
    split_lines: bool = False  # write every line in two halves, with a pause between
    one_write: bool = False  # write the whole stream in a single write
    first_line_alone: bool = False  # the first line, a pause, then all the rest in one write
    no_final_newline: bool = False  # the last line goes out without its "\n"
    header_delay: float = 0.0  # seconds before the status line
    chunk_delay: float = 0.0  # seconds between stream lines
    #: When set, requests must carry ``Authorization: <this>`` or get 401.
    require_authorization: str | None = None
    requests: list[Recorded] = field(default_factory=list)
    #: The models ``/api/ps`` says are loaded in memory.
    loaded: tuple[str, ...] = ("llama3.2:latest",)
    #: Streams that ended because the client went away.
    disconnects: int = 0
    finished_streams: int = 0

    def app(self) -> web.Application:
        return create_fake_ollama(self)


FAKE_OLLAMA = web.AppKey("fake_ollama", FakeOllama)

_CREATED_AT = "2025-07-07T20:22:19.{:09d}Z"
_ROLES = ("system", "user", "assistant", "tool")


def create_fake_ollama(state: FakeOllama | None = None) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[FAKE_OLLAMA] = state or FakeOllama()
    app.router.add_post("/api/chat", _chat)
    app.router.add_post("/api/generate", _generate)
    app.router.add_post("/api/embed", _embed)
    app.router.add_post("/api/show", _show)
    app.router.add_get("/api/tags", _tags)
    app.router.add_get("/api/version", _version)
    app.router.add_get("/api/ps", _ps)
    return app


class _Fail(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        self.status, self.message, self.headers = status, message, headers


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Fail as fail:
        return _error(fail.status, fail.message, fail.headers)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def canonical(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


async def _begin(request: web.Request) -> tuple[FakeOllama, dict[str, Any]]:
    """Record the request and apply the checks and failures every POST endpoint shares."""
    state = request.app[FAKE_OLLAMA]
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    state.requests.append(Recorded(request.path, body, dict(request.headers)))
    if state.header_delay:
        await asyncio.sleep(state.header_delay)
    auth = state.require_authorization
    if auth is not None and request.headers.get("Authorization") != auth:
        raise _Fail(401, "unauthorized")
    if state.fail_status is not None and request.path in state.fail_paths:
        if state.fail_times is None or state.fail_times > 0:
            if state.fail_times is not None:
                state.fail_times -= 1
            headers = {"Retry-After": state.retry_after} if state.retry_after else None
            raise _Fail(state.fail_status, state.fail_message, headers)
    if not isinstance(body, dict):
        raise _Fail(400, "invalid JSON in request body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Fail(400, "model is required")
    if canonical(model) not in state.models:
        raise _Fail(404, f'model "{model}" not found, try pulling it first')
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise _Fail(400, "options must be an object")
    fmt = body.get("format")
    if fmt is not None and fmt != "json" and not isinstance(fmt, dict):
        raise _Fail(400, 'invalid format: must be "json" or a JSON schema object')
    return state, body


def _words(text: str) -> int:
    return len(text.split())


def _answer_text(state: FakeOllama, body: dict[str, Any], prompt: str) -> tuple[str, str]:
    """The answer and its done_reason, honouring format, stop and num_predict like a model."""
    text = state.reply if state.reply is not None else f"Echo: {prompt}"
    if body.get("format") is not None:
        text = orjson.dumps({"answer": text}).decode()
    options = body.get("options") or {}
    for stop in options.get("stop") or ():
        if stop and stop in text:
            text = text[: text.index(stop)]
    chunks = re.findall(r"\S+\s*|\s+", text)
    limit = options.get("num_predict")
    if isinstance(limit, int) and 0 <= limit < len(chunks):
        return "".join(chunks[:limit]), "length"
    return text, "stop"


def _chunks(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text) or [""]


def _final(prompt_tokens: int, eval_count: int) -> dict[str, Any]:
    """The counters and durations (nanoseconds) of a ``done`` object."""
    eval_duration = 10_000_000 * max(eval_count, 1)
    prompt_duration = 2_000_000 * max(prompt_tokens, 1)
    load = 1_500_000
    return {
        "total_duration": load + prompt_duration + eval_duration + 500_000,
        "load_duration": load,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": prompt_duration,
        "eval_count": eval_count,
        "eval_duration": eval_duration,
    }


def _logprobs(piece: str) -> list[dict[str, Any]]:
    return [
        {
            "token": piece,
            "logprob": -0.25,
            "bytes": list(piece.encode()),
            "top_logprobs": [{"token": piece, "logprob": -0.25, "bytes": list(piece.encode())}],
        }
    ]


async def _chat(request: web.Request) -> web.StreamResponse:
    state, body = await _begin(request)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return _error(400, "messages must be an array")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            return _error(400, "invalid message role")
        if not isinstance(message.get("content", ""), str):
            return _error(400, "message content must be a string")
    users = [m for m in messages if m["role"] == "user"]
    prompt = users[-1].get("content", "") if users else ""
    prompt_tokens = sum(_words(m.get("content", "")) + 1 for m in messages)
    tools = body.get("tools") or []
    calls: list[dict[str, Any]] = []
    if tools and messages and messages[-1]["role"] != "tool":
        calls = state.tool_calls if state.tool_calls is not None else _default_call(tools, prompt)
    if messages and messages[-1]["role"] == "tool":
        prompt = f"the tool said {messages[-1].get('content', '')}"
    text, reason = ("", "stop") if calls else _answer_text(state, body, prompt)
    pieces = _chunks(text)
    want_logprobs = bool(body.get("logprobs")) and state.logprobs

    def event(piece: str, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": piece}
        if index == 0 and state.thinking and body.get("think"):
            message["thinking"] = state.thinking
        if index == 0 and calls:
            message["tool_calls"] = calls
        out = {"model": body["model"], "created_at": _CREATED_AT.format(index), "message": message}
        if want_logprobs and piece:
            out["logprobs"] = _logprobs(piece)
        return out | {"done": False}

    final = {
        "model": body["model"],
        "created_at": _CREATED_AT.format(len(pieces)),
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": reason,
        **_final(prompt_tokens, len(pieces)),
    }
    if body.get("stream", True) is False:
        if state.garbage:
            return web.Response(text="<html>oops</html>", content_type="application/json")
        whole = event(text, 0)
        whole["message"]["content"] = text
        if want_logprobs:
            whole["logprobs"] = [lp for p in pieces if p for lp in _logprobs(p)]
        return web.json_response(whole | {k: v for k, v in final.items() if k != "message"})
    return await _stream(request, state, [event(p, i) for i, p in enumerate(pieces)], final)


def _default_call(tools: list[Any], prompt: str) -> list[dict[str, Any]]:
    fn = tools[0].get("function") or {}
    required = (fn.get("parameters") or {}).get("required") or []
    return [
        {"function": {"name": fn.get("name", ""), "arguments": dict.fromkeys(required, prompt)}}
    ]


async def _generate(request: web.Request) -> web.StreamResponse:
    state, body = await _begin(request)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        return _error(400, "prompt must be a string")
    text, reason = _answer_text(state, body, prompt + (body.get("suffix") or ""))
    pieces = _chunks(text)
    want_logprobs = bool(body.get("logprobs")) and state.logprobs

    def event(piece: str, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": body["model"],
            "created_at": _CREATED_AT.format(index),
            "response": piece,
            "done": False,
        }
        if want_logprobs and piece:
            out["logprobs"] = _logprobs(piece)
        return out

    final = {
        "model": body["model"],
        "created_at": _CREATED_AT.format(len(pieces)),
        "response": "",
        "done": True,
        "done_reason": reason,
        "context": [1, 2, 3],
        **_final(_words(prompt) + 1, len(pieces)),
    }
    if body.get("stream", True) is False:
        if state.garbage:
            return web.Response(text="not json", content_type="application/json")
        whole = final | {"response": text}
        if want_logprobs:
            whole["logprobs"] = [lp for p in pieces if p for lp in _logprobs(p)]
        return web.json_response(whole)
    return await _stream(request, state, [event(p, i) for i, p in enumerate(pieces)], final)


async def _stream(
    request: web.Request, state: FakeOllama, events: list[dict[str, Any]], final: dict[str, Any]
) -> web.StreamResponse:
    lines = [orjson.dumps(e) + b"\n" for e in events]
    if state.error_after is not None:
        lines = lines[: state.error_after]
        lines.append(orjson.dumps({"error": state.error_message}) + b"\n")
    elif state.garbage:
        lines.insert(1, b"{this is not json\n")
    elif not state.stop_before_done:
        lines.append(orjson.dumps(final) + b"\n")
    if state.no_final_newline:
        lines[-1] = lines[-1].rstrip(b"\n")
    if state.empty_stream:
        lines = []
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        if state.one_write:
            await response.write(b"".join(lines))
        elif state.first_line_alone and lines:
            await response.write(lines[0])
            await asyncio.sleep(0.02)
            await response.write(b"".join(lines[1:]))
        for line in () if state.one_write or state.first_line_alone else lines:
            if state.split_lines and len(line) > 1:
                half = len(line) // 2
                await response.write(line[:half])
                await asyncio.sleep(0.02)  # let the client's read return the first half alone
                await response.write(line[half:])
            else:
                await response.write(line)
            if state.chunk_delay:
                await asyncio.sleep(state.chunk_delay)
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        state.disconnects += 1
        raise
    state.finished_streams += 1
    return response


async def _embed(request: web.Request) -> web.Response:
    state, body = await _begin(request)
    inputs = body.get("input")
    # as Ollama's server/routes.go: an empty string is no input at all (zero embeddings)
    texts = ([inputs] if inputs else []) if isinstance(inputs, str) else inputs
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return _error(400, "invalid input type")
    dimensions = body.get("dimensions") or 8
    if state.garbage:
        return web.Response(text="{", content_type="application/json")
    return web.json_response(
        {
            "model": body["model"],
            "embeddings": [embedding(t, dimensions) for t in texts],
            "total_duration": 14_143_917,
            "load_duration": 1_019_500,
            "prompt_eval_count": sum(_words(t) + 1 for t in texts),
        }
    )


def embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector derived from SHA-256 of the text (what the fake answers for ``text``)."""
    digest = hashlib.sha256(text.encode()).digest() * (dimensions // 32 + 1)
    raw = [(b - 127.5) / 127.5 for b in digest[:dimensions]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


async def _show(request: web.Request) -> web.Response:
    state = request.app[FAKE_OLLAMA]
    body = await request.json()
    state.requests.append(Recorded(request.path, body, dict(request.headers)))
    model = state.models.get(canonical(str(body.get("model", ""))))
    if model is None:
        return _error(404, f"model '{body.get('model')}' not found")
    return web.json_response(
        {
            "parameters": 'stop                           "<|eot_id|>"',
            "license": "MIT",
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
            "template": "{{ .Prompt }}",
            "details": _details(model),
            "model_info": {
                "general.architecture": model.family,
                f"{model.family}.context_length": model.context_length,
            },
            "capabilities": list(model.capabilities),
        }
    )


def _details(model: FakeModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": model.family,
        "families": [model.family],
        "parameter_size": model.parameter_size,
        "quantization_level": "Q4_K_M",
    }


async def _ps(request: web.Request) -> web.Response:
    state = request.app[FAKE_OLLAMA]
    state.requests.append(Recorded(request.path, None, dict(request.headers)))
    return web.json_response({"models": [
        {"name": name, "model": name, "size": 5137025024,
         "digest": hashlib.sha256(name.encode()).hexdigest(),
         "details": _details(state.models.get(name) or FakeModel(name)),
         "expires_at": "2025-07-07T20:27:19.000000000Z", "size_vram": 5137025024}
        for name in state.loaded
    ]})


async def _tags(request: web.Request) -> web.Response:
    state = request.app[FAKE_OLLAMA]
    state.requests.append(Recorded(request.path, None, dict(request.headers)))
    return web.json_response(
        {
            "models": [
                {
                    "name": m.name,
                    "model": m.name,
                    "modified_at": "2025-05-04T17:37:44.706015396-07:00",
                    "size": 2019393189,
                    "digest": hashlib.sha256(m.name.encode()).hexdigest(),
                    "details": _details(m),
                }
                for m in state.models.values()
            ]
        }
    )


async def _version(request: web.Request) -> web.Response:
    state = request.app[FAKE_OLLAMA]
    state.requests.append(Recorded(request.path, None, dict(request.headers)))
    if state.fail_status is not None and request.path in state.fail_paths:
        return _error(state.fail_status, state.fail_message)
    return web.json_response({"version": state.version})
