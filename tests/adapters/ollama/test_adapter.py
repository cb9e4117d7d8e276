"""OllamaAdapter against the fake Ollama on 127.0.0.1: HTTP, streams, errors, readiness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.adapters.base import Job, UpstreamResponse
from proxy.adapters.ollama.adapter import OllamaAdapter
from proxy.config import BaseConfig, build_config
from proxy.errors import BadRequest, NotFound, ProxyError, UpstreamError, UpstreamTimeout
from proxy.upstream.retry import retry_after as retry_after_seconds
from tests.conftest import free_port
from tests.fakes.ollama import FAKE_OLLAMA, FakeOllama, create_fake_ollama, embedding
from tests.fakes.openapi import problems

SECRET = "sk-test-secret-0123456789"
USER = [{"role": "user", "content": "why is the sky blue?"}]
REQUEST_SCHEMAS = {
    "/api/chat": "ChatRequest",
    "/api/generate": "GenerateRequest",
    "/api/embed": "EmbedRequest",
}


def make_config(url: str, **overrides: Any) -> BaseConfig:
    """An ollama config for ``url``; a ``None`` override drops that key."""
    data: dict[str, Any] = {
        "backend_provider": "ollama",
        "url": url,
        "api_key": SECRET,
        "model_name_alias": "llama3.2:latest",
        "model": {"name": "chat-model", "aliases": ["chat"]},
        "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30},
        "ollama": {"options": {"num_ctx": 4096}, "keep_alive": "10m"},
    }
    data["timeouts"] |= overrides.pop("timeouts", {})
    data |= overrides
    return build_config({k: v for k, v in data.items() if v is not None})


class Env:
    def __init__(self, state: FakeOllama, url: str, session: aiohttp.ClientSession) -> None:
        self.state, self.url, self.session = state, url, session

    def adapter(self, **overrides: Any) -> OllamaAdapter:
        return OllamaAdapter(make_config(self.url, **overrides), self.session)


@pytest.fixture
async def env(aiohttp_server: Any) -> AsyncIterator[Env]:
    app = create_fake_ollama()
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        yield Env(app[FAKE_OLLAMA], str(server.make_url("")), session)


def job(
    endpoint: Any, payload: dict[str, Any], *, stream: bool = False, model: str = "chat-model"
) -> Job:
    return Job(
        endpoint=endpoint,
        method="POST",
        path={"chat": "/v1/chat/completions", "completions": "/v1/completions"}.get(
            endpoint, "/v1/embeddings"
        ),
        query="",
        body=orjson.dumps(payload),
        payload=payload,
        model=model,
        upstream_model="llama3.2:latest" if endpoint != "embeddings" else "all-minilm",
        stream=stream,
        headers={},
        request_id="req-1",
    )


def sse(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ")
        data = block[6:]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


async def collect(resp: UpstreamResponse) -> tuple[list[bytes], ProxyError | None]:
    """The chunks a relay would send, and the error that ended the stream, if any."""
    chunks: list[bytes] = []
    try:
        async for chunk in resp.chunks():
            chunks.append(chunk)
    except ProxyError as exc:
        return chunks, exc
    finally:
        await resp.release()
    return chunks, None


def check_requests(state: FakeOllama) -> None:
    """Every request the adapter sent fits Ollama's openapi.yaml and carries the credential."""
    for recorded in state.requests:
        assert recorded.headers.get("Authorization") == f"Bearer {SECRET}"
        if recorded.path in REQUEST_SCHEMAS:
            assert problems(recorded.body, REQUEST_SCHEMAS[recorded.path]) == []


# --- answers -------------------------------------------------------------------------------


async def test_chat(env: Env) -> None:
    resp = await env.adapter().send(
        job("chat", {"model": "chat-model", "messages": USER, "temperature": 0})
    )
    assert resp.status == 200 and not resp.stream
    body = orjson.loads(await resp.read())
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "chat-model"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Echo: why is the sky blue?",
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] == 6
    assert resp.usage.prompt_tokens == 6 and resp.usage.completion_tokens == 6
    assert resp.usage.extra["tokens_per_second"] == pytest.approx(100.0)
    assert set(resp.usage.extra) >= {
        "total_duration",
        "load_duration",
        "eval_duration",
        "prompt_eval_duration",
    }
    sent = env.state.requests[-1].body
    assert sent["model"] == "llama3.2:latest" and sent["stream"] is False
    assert sent["options"] == {"num_ctx": 4096, "temperature": 0, "top_p": 1.0}
    assert sent["keep_alive"] == "10m"
    check_requests(env.state)


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_stream(env: Env, include_usage: bool) -> None:
    payload = {"messages": USER, "stream": True, "stream_options": {"include_usage": include_usage}}
    resp = await env.adapter().send(job("chat", payload, stream=True))
    assert resp.stream and resp.headers["Content-Type"] == "text/event-stream"
    chunks, error = await collect(resp)
    assert error is None
    events = sse(b"".join(chunks))
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == "Echo: why is the sky blue?"
    finals = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["stop"]
    usage_events = [e for e in events[:-1] if not e["choices"]]
    assert [e["usage"]["completion_tokens"] for e in usage_events] == ([6] if include_usage else [])
    assert all(e["model"] == "chat-model" for e in events[:-1])
    assert resp.usage.completion_tokens == 6 and resp.usage.extra["eval_duration"] > 0
    assert env.state.finished_streams == 1
    check_requests(env.state)


@pytest.mark.parametrize("stream", [False, True])
async def test_completions(env: Env, stream: bool) -> None:
    payload = {"prompt": "Once upon", "max_tokens": 2, "stream": stream}
    resp = await env.adapter().send(job("completions", payload, stream=stream))
    chunks, error = await collect(resp)
    assert error is None
    if stream:
        events = sse(b"".join(chunks))
        text = "".join(e["choices"][0]["text"] for e in events[:-1])
        reason = events[-2]["choices"][0]["finish_reason"]
        assert events[0]["id"].startswith("cmpl-")
    else:
        body = orjson.loads(b"".join(chunks))
        assert body["object"] == "text_completion" and body["model"] == "chat-model"
        text, reason = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
    assert text == "Echo: Once "
    assert reason == "length"
    assert env.state.requests[-1].body["options"]["num_predict"] == 2
    check_requests(env.state)


@pytest.mark.parametrize(
    ("text", "encoding"), [("hello world", None), (["a", "b c"], "float"), ("x", "base64")]
)
async def test_embeddings(env: Env, text: Any, encoding: str | None) -> None:
    payload = {"input": text, "dimensions": 4, "encoding_format": encoding}
    resp = await env.adapter().send(job("embeddings", {k: v for k, v in payload.items() if v}))
    body = orjson.loads(await resp.read())
    texts = [text] if isinstance(text, str) else text
    assert len(body["data"]) == len(texts) and body["model"] == "chat-model"
    if encoding != "base64":
        assert [d["embedding"] for d in body["data"]] == [embedding(t, 4) for t in texts]
    assert resp.usage.prompt_tokens is not None and resp.usage.prompt_tokens > 0
    assert body["usage"]["prompt_tokens"] == resp.usage.prompt_tokens
    assert env.state.requests[-1].body["dimensions"] == 4
    check_requests(env.state)


async def test_an_empty_string_is_embedded_once(env: Env) -> None:
    """OpenAI embeds ``""``; Ollama takes a bare ``""`` for no input at all."""
    resp = await env.adapter().send(job("embeddings", {"input": ""}))
    body = orjson.loads(await resp.read())
    vectors = [d["embedding"] for d in body["data"]]
    assert len(vectors) == 1 and vectors[0] == embedding("", len(vectors[0]))
    check_requests(env.state)


@pytest.mark.parametrize("stream", [False, True])
async def test_tools(env: Env, stream: bool) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    payload = {
        "messages": [{"role": "user", "content": "Tokyo"}],
        "tools": [tool],
        "stream": stream,
    }
    resp = await env.adapter().send(job("chat", payload, stream=stream))
    chunks, error = await collect(resp)
    assert error is None
    if stream:
        events = sse(b"".join(chunks))[:-1]
        calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
        reason = events[-1]["choices"][0]["finish_reason"]
    else:
        choice = orjson.loads(b"".join(chunks))["choices"][0]
        calls, reason = choice["message"]["tool_calls"], choice["finish_reason"]
        assert choice["message"]["content"] is None
    assert reason == "tool_calls"
    assert len(calls) == 1 and calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}
    assert env.state.requests[-1].body["tools"] == [tool]
    check_requests(env.state)


async def test_json_mode(env: Env) -> None:
    payload = {"messages": USER, "response_format": {"type": "json_object"}}
    resp = await env.adapter().send(job("chat", payload))
    content = orjson.loads(await resp.read())["choices"][0]["message"]["content"]
    assert orjson.loads(content) == {"answer": "Echo: why is the sky blue?"}
    assert env.state.requests[-1].body["format"] == "json"


@pytest.mark.parametrize("knob", ["split_lines", "one_write", "no_final_newline"])
async def test_stream_framing(env: Env, knob: str) -> None:
    payload = {"messages": USER, "stream": True}
    plain, _ = await collect(await env.adapter().send(job("chat", payload, stream=True)))
    setattr(env.state, knob, True)
    framed, error = await collect(await env.adapter().send(job("chat", payload, stream=True)))
    assert error is None

    def strip(raw: bytes) -> list[Any]:
        return [
            e if e == "[DONE]" else {k: v for k, v in e.items() if k not in ("id", "created")}
            for e in sse(raw)
        ]

    assert strip(b"".join(framed)) == strip(b"".join(plain))
    if knob == "split_lines":
        assert len(framed) > 3  # relayed line by line, not buffered to the end


# --- errors --------------------------------------------------------------------------------


async def test_model_not_pulled_is_404_with_a_pull_hint(env: Env) -> None:
    env.state.models.pop("llama3.2:latest")
    with pytest.raises(NotFound) as caught:
        await env.adapter().send(job("chat", {"messages": USER}))
    assert caught.value.status == 404
    assert "ollama pull" in caught.value.message and "chat-model" in caught.value.message
    # An alias hides the upstream tag from clients, also in errors.
    assert "llama3.2" not in caught.value.message
    same = job("chat", {"messages": USER}, model="llama3.2:latest")
    with pytest.raises(NotFound, match=r"`ollama pull llama3\.2:latest`"):
        await env.adapter().send(same)


@pytest.mark.parametrize(
    ("status", "retry_after", "kind", "client_status", "retryable", "after"),
    [
        (400, None, BadRequest, 400, False, None),
        (429, "7", UpstreamError, 429, True, 7.0),
        (500, None, UpstreamError, 502, False, None),
        (502, None, UpstreamError, 502, True, None),
        (503, "2", UpstreamError, 503, True, 2.0),
        (504, None, UpstreamError, 502, True, None),
    ],
)
async def test_upstream_statuses(
    env: Env,
    status: int,
    retry_after: str | None,
    kind: type[ProxyError],
    client_status: int,
    retryable: bool,
    after: float | None,
) -> None:
    env.state.fail_status, env.state.retry_after = status, retry_after
    env.state.fail_message = "the model failed to generate a response"
    for stream in (False, True):
        with pytest.raises(kind) as caught:
            await env.adapter().send(job("chat", {"messages": USER}, stream=stream))
        error = caught.value
        assert error.status == client_status
        assert "the model failed to generate a response" in error.message
        assert getattr(error, "retryable", False) is retryable
        # the adapter hands Retry-After on; the retry layer is the one place that parses it
        headers = getattr(error, "headers", None)
        assert (retry_after_seconds(headers) if headers else None) == after


async def test_wrong_credentials_are_a_502_without_the_secret(env: Env) -> None:
    env.state.require_authorization = "Bearer something-else"
    with pytest.raises(UpstreamError) as caught:
        await env.adapter().send(job("chat", {"messages": USER}))
    assert caught.value.status == 502 and not caught.value.retryable
    assert caught.value.code == "upstream_auth_failed"
    assert caught.value.message == "the upstream rejected this node's credentials"
    assert SECRET not in caught.value.message


async def test_credentials_as_configured(env: Env) -> None:
    chat = job("chat", {"messages": USER})
    await (await env.adapter(api_key=None, bearer_token="tok").send(chat)).read()
    assert env.state.requests[-1].headers["Authorization"] == "Bearer tok"
    await (await env.adapter(api_key_header="X-Key").send(chat)).read()
    assert env.state.requests[-1].headers["X-Key"] == SECRET
    await (await env.adapter(api_key=None).send(chat)).read()
    assert "Authorization" not in env.state.requests[-1].headers


@pytest.mark.parametrize("stream", [False, True])
async def test_invalid_json_from_upstream_is_502(env: Env, stream: bool) -> None:
    env.state.garbage = True
    env.state.chunk_delay = 0.02  # the bad line arrives after the first has been relayed
    adapter = env.adapter()
    if not stream:
        with pytest.raises(UpstreamError, match="not valid JSON") as caught:
            await adapter.send(job("chat", {"messages": USER}))
        assert caught.value.status == 502
        with pytest.raises(UpstreamError, match="not valid JSON"):
            await adapter.send(job("embeddings", {"input": "x"}))
        return
    chunks, error = await collect(await adapter.send(job("chat", {"messages": USER}, stream=True)))
    assert chunks and isinstance(error, UpstreamError) and error.status == 502
    assert "not valid JSON" in error.message


async def test_mid_stream_error_line_ends_the_stream_with_an_error(env: Env) -> None:
    env.state.error_after = 3
    env.state.chunk_delay = 0.02
    resp = await env.adapter().send(job("chat", {"messages": USER}, stream=True))
    chunks, error = await collect(resp)
    assert isinstance(error, UpstreamError) and not error.retryable
    assert "an error was encountered while running the model" in error.message
    events = sse(b"".join(chunks))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Echo: why is "
    assert "[DONE]" not in events


async def test_lines_before_an_error_in_the_same_read_are_relayed(env: Env) -> None:
    env.state.error_after, env.state.first_line_alone = 4, True
    chunks, error = await collect(
        await env.adapter().send(job("chat", {"messages": USER}, stream=True))
    )
    assert isinstance(error, UpstreamError)
    assert len(chunks) == 2  # the first line, then the rest of that read before the error
    events = sse(b"".join(chunks))
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Echo: why is the "
    )


async def test_error_as_the_first_line_is_raised_before_any_byte(env: Env) -> None:
    env.state.error_after = 0
    with pytest.raises(UpstreamError, match="an error was encountered"):
        await env.adapter().send(job("chat", {"messages": USER}, stream=True))


async def test_stream_cut_before_done(env: Env) -> None:
    env.state.stop_before_done = True
    chunks, error = await collect(
        await env.adapter().send(job("chat", {"messages": USER}, stream=True))
    )
    assert chunks and isinstance(error, UpstreamError)
    assert "before its final 'done'" in error.message


async def test_empty_stream_is_a_retryable_error_before_any_byte(env: Env) -> None:
    env.state.empty_stream = True
    with pytest.raises(UpstreamError, match="without a line") as caught:
        await env.adapter().send(job("chat", {"messages": USER}, stream=True))
    assert caught.value.retryable




async def test_connection_refused_is_retryable(env: Env) -> None:
    adapter = OllamaAdapter(make_config(f"http://127.0.0.1:{free_port()}"), env.session)
    with pytest.raises(UpstreamError) as caught:
        await adapter.send(job("chat", {"messages": USER}))
    assert caught.value.retryable and caught.value.status == 502
    assert "unreachable" in caught.value.message and SECRET not in caught.value.message
    with pytest.raises(UpstreamError, match="unreachable"):
        await adapter.check_ready()


async def test_first_byte_timeout_is_retryable(env: Env) -> None:
    env.state.header_delay = 1.0
    with pytest.raises(UpstreamTimeout) as caught:
        await env.adapter(timeouts={"first_byte": 0.1}).send(
            job("chat", {"messages": USER}, stream=True)
        )
    assert caught.value.status == 504 and caught.value.retryable


async def test_idle_timeout_mid_stream_is_not_retryable(env: Env) -> None:
    env.state.chunk_delay = 0.5
    resp = await env.adapter(timeouts={"idle": 0.1}).send(
        job("chat", {"messages": USER}, stream=True)
    )
    chunks, error = await collect(resp)
    assert len(chunks) == 1
    assert isinstance(error, UpstreamTimeout) and error.status == 504 and not error.retryable


async def test_total_timeout(env: Env) -> None:
    env.state.chunk_delay = 0.1
    resp = await env.adapter(timeouts={"total": 0.25}).send(
        job("chat", {"messages": USER}, stream=True)
    )
    _, error = await collect(resp)
    assert isinstance(error, UpstreamTimeout)


async def test_release_cancels_the_upstream_request(env: Env) -> None:
    env.state.reply = " ".join(["word"] * 50)
    env.state.chunk_delay = 0.02
    resp = await env.adapter().send(job("chat", {"messages": USER}, stream=True))
    chunks = resp.chunks()
    assert (await anext(chunks)).startswith(b"data: ")
    await resp.release()
    await resp.release()  # idempotent
    async with asyncio.timeout(2):
        while env.state.disconnects == 0:
            await asyncio.sleep(0.01)
    assert env.state.finished_streams == 0


async def test_unsupported_params_are_refused_before_any_request(env: Env) -> None:
    with pytest.raises(BadRequest) as caught:
        await env.adapter().send(job("chat", {"messages": USER, "n": 3}))
    assert caught.value.param == "n"
    assert env.state.requests == []


# --- models and readiness ------------------------------------------------------------------


async def test_models_lists_the_public_name_first(env: Env) -> None:
    models = await env.adapter().models()
    assert [m["id"] for m in models] == ["chat-model", "chat", "all-minilm:latest"]
    assert all(m["object"] == "model" and m["owned_by"] == "library" for m in models)
    assert models[0]["created"] == 1746405464  # 2025-05-04T17:37:44-07:00
    plain = await env.adapter(model=None, model_name_alias=None).models()
    assert [m["id"] for m in plain] == ["llama3.2:latest", "all-minilm:latest"]


async def test_check_ready(env: Env) -> None:
    await env.adapter().check_ready()
    await env.adapter(model_name_alias="llama3.2").check_ready()  # ":latest" is implied
    assert [r.path for r in env.state.requests] == ["/api/version", "/api/tags"] * 2
    check_requests(env.state)
    with pytest.raises(UpstreamError, match=r"run `ollama pull qwen3:8b`"):
        await env.adapter(model_name_alias="qwen3:8b").check_ready()
    env.state.fail_status, env.state.fail_paths = 500, ("/api/version",)
    with pytest.raises(UpstreamError, match="/api/version with 500"):
        await env.adapter().check_ready()
