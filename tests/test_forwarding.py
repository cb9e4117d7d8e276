"""Forwarding to an OpenAI-compatible upstream (custom, vllm server), against a real fake."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp.test_utils import TestServer

from tests.conftest import StartProxy, free_port, upstream_url
from tests.fakes.openai_upstream import FakeOpenAI

CHAT = {"model": "public", "messages": [{"role": "user", "content": "hi"}]}


def custom(server: TestServer, **extra: Any) -> dict[str, Any]:
    return {"backend_provider": "custom", "url": upstream_url(server), **extra}


def sse_events(raw: bytes) -> list[Any]:
    events = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_chat_is_forwarded_with_only_model_rewritten(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream, model_name_alias="upstream-7b"))
    body = {**CHAT, "temperature": 0.3, "vendor_extension": {"keep": [1, 2]}}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["choices"][0]["message"]["content"] == "w0 w1 w2"
    sent = fake_openai.seen[-1].json()
    assert sent == {**body, "model": "upstream-7b"}


async def test_body_bytes_pass_untouched_without_alias(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream))
    raw = b'{"model":"any-model",  "messages":[{"role":"user","content":"x"}] , "n": 1}'
    resp = await client.post(
        "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    assert fake_openai.seen[-1].body == raw


async def test_streaming_chat_and_completions(
    start_proxy: StartProxy, openai_upstream: TestServer
) -> None:
    client = await start_proxy(custom(openai_upstream))
    for path, body in [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"model": "public", "prompt": "once"}),
    ]:
        resp = await client.post(path, json={**body, "stream": True})
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.read())
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        assert len(events) == 5


async def test_completions_and_embeddings(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream))
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "once"})
    assert (await resp.json())["choices"][0]["text"] == "w0 w1 w2"
    resp = await client.post("/v1/embeddings", json={"model": "m", "input": ["a", "b"]})
    data = (await resp.json())["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert fake_openai.seen[-1].path == "/v1/embeddings"


async def test_other_v1_paths_pass_through(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream))
    resp = await client.post("/v1/audio/new-endpoint?x=1&y=two", data=b"raw-bytes")
    assert resp.status == 200
    assert await resp.json() == {
        "echo": "/v1/audio/new-endpoint",
        "method": "POST",
        "query": "x=1&y=two",
        "body": "raw-bytes",
    }
    resp = await client.delete("/v1/files/file-1")
    assert (await resp.json())["method"] == "DELETE"


async def test_auth_injection_and_header_hygiene(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream, api_key="upstream-key-1"))
    resp = await client.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={
            "Authorization": "Bearer client-secret",
            "X-Api-Key": "client-key",
            "X-Signature": "0xdead",
            "X-Address": "0xabc",
            "X-Timestamp": "1",
            "X-Nonce": "n",
            "Cookie": "c=1",
            "X-Request-Id": "req-42",
            "Proxy-Authorization": "Basic x",
        },
    )
    assert resp.status == 200
    sent = {k.lower(): v for k, v in fake_openai.seen[-1].headers.items()}
    assert sent["x-api-key"] == "upstream-key-1"
    assert "authorization" not in sent
    for name in (
        "x-signature",
        "x-address",
        "x-timestamp",
        "x-nonce",
        "cookie",
        "proxy-authorization",
    ):
        assert name not in sent
    assert sent["x-request-id"] == "req-42"
    # back to the client: upstream cookies and server internals are dropped, the rest kept
    assert "Set-Cookie" not in resp.headers
    assert resp.headers.get("Server") != "fake/1.0"
    assert resp.headers["X-Upstream-Detail"] == "kept"


async def test_vllm_server_gets_bearer_and_health_readiness(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(
        {"backend_provider": "vllm", "url": upstream_url(openai_upstream), "api_key": "vk"}
    )
    await client.post("/v1/chat/completions", json=CHAT)
    assert fake_openai.seen[-1].headers["Authorization"] == "Bearer vk"
    resp = await client.get("/readyz")
    assert resp.status == 200
    # /health for the engine, then a keyed /v1/models: /health cannot tell a wrong key
    assert [seen.path for seen in fake_openai.seen[-2:]] == ["/health", "/v1/models"]
    assert fake_openai.seen[-1].headers["Authorization"] == "Bearer vk"


async def test_bearer_token_is_sent_as_authorization(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream, bearer_token="tok"))
    await client.post("/v1/chat/completions", json=CHAT)
    assert fake_openai.seen[-1].headers["Authorization"] == "Bearer tok"


async def test_upstream_error_bodies_are_relayed_faithfully(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream))
    for status in (400, 404, 422, 500):
        body = {
            "error": {
                "message": f"upstream says {status}",
                "type": "x",
                "param": None,
                "code": status,
            }
        }
        fake_openai.fail_status, fake_openai.fail_body, fake_openai.fail_times = status, body, 1
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == status
        assert await resp.json() == body




async def test_upstream_down_is_502(start_proxy: StartProxy) -> None:
    port = free_port()
    client = await start_proxy(
        {"backend_provider": "custom", "url": f"http://127.0.0.1:{port}", "api_key": "never-shown"}
    )
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert "unreachable" in error["message"]
    assert f"127.0.0.1:{port}" not in error["message"] and str(port) not in error["message"]
    assert "never-shown" not in json.dumps(error)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert "unreachable" in (await resp.json())["reason"]


async def test_upstream_first_byte_timeout_is_504(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    from aiohttp import web

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow)
    server = await aiohttp_server(app)
    client = await start_proxy(custom(server, timeouts={"first_byte": 0.3}))
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 504
    assert time.monotonic() - started < 3
    assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_mid_stream_failure_becomes_final_sse_error_event(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    from aiohttp import web

    async def breaks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # a reset mid-body
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", breaks)
    server = await aiohttp_server(app)
    client = await start_proxy(custom(server))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    events = sse_events(await resp.read())
    assert events[0]["choices"][0]["delta"]["content"] == "a"
    assert events[-1]["error"]["type"] == "upstream_error"
    assert "broke off" in events[-1]["error"]["message"]


async def test_client_disconnect_cancels_upstream(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    fake_openai.event_delay, fake_openai.chunks = 0.1, 50
    client = await start_proxy(custom(openai_upstream))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(fake_openai.stream_cancelled.wait(), timeout=3)
    assert not fake_openai.stream_finished.is_set()


async def test_chunks_are_relayed_as_they_arrive(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    fake_openai.event_delay, fake_openai.chunks = 0.2, 6
    client = await start_proxy(custom(openai_upstream))
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    arrivals = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic() - started)
    # six content events 200 ms apart: the first must arrive long before the last is sent
    assert len(arrivals) == 8
    assert arrivals[0] < 0.15
    assert arrivals[-1] > 1.0
    assert arrivals[-1] - arrivals[0] > 0.9
