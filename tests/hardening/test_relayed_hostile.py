"""An upstream that spells its answers every way JSON allows, reports usage that is not a
count, or never ends an event: the client still gets valid JSON naming its model, its answer,
and a bounded stream (the proxy on 127.0.0.1, a raw-socket upstream)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import StartProxy
from tests.fakes.raw_upstream import RawRequest, RawUpstream, response

CLIENT_MODEL = "public-1"
UPSTREAM_NAMES = ("up-7b", "up-v2", "inner-model", "up")
ASK = {"model": CLIENT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
_BLANK = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE = re.compile(rb"\r\n|\r|\n")


def answer(model: str = "up-7b", **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                         "finish_reason": "stop"}], **extra}


def delta(i: int, model: str = "up-7b") -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": {"content": f"w{i}"}, "finish_reason": None}]}


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


#: Whole answers as an upstream may write them; each names an upstream model somewhere.
BODIES = {
    "pretty": json.dumps(answer(), indent=2),
    "space before colon": compact(answer()).replace('"model":', '"model" : '),
    "newline after colon": compact(answer()).replace('"model":', '"model":\n'),
    "tab after colon": compact(answer()).replace('"model":', '"model":\t'),
    "escaped key": compact(answer()).replace('"model"', '"\\u006dodel"'),
    "nested first": compact({"id": "c1", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "fine", "model": "inner-model"}}], "model": "up-7b"}),
    "escaped quote in value": compact(answer('up"7b')),
    "duplicate key": compact(answer()).replace('"model":"up-7b"',
                                               '"model":"up-7b","model":"up-v2"'),
    "big integer": compact(answer(seed=2**70)),
}


def events_of(data: bytes) -> list[str]:
    """The data of each event the client got, in SSE's own terms (any line end)."""
    out = []
    for raw in _BLANK.split(data):
        lines = [line for line in _LINE.split(raw) if line.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(line[5:].removeprefix(b" ") for line in lines).decode())
    return out


def assert_names_the_client(data: bytes, *, stream: bool) -> list[dict[str, Any]]:
    texts = [t for t in events_of(data) if t != "[DONE]"] if stream else [data.decode()]
    objs = [json.loads(text) for text in texts]  # valid JSON, every one
    assert objs and all(obj.get("model") == CLIENT_MODEL for obj in objs if "error" not in obj)
    for name in ("up-7b", "up-v2"):
        assert name.encode() not in data, name
    return objs


def serve(writes: Callable[[], list[bytes]], stream: bool) -> RawUpstream:
    async def answering(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        if not req.line.startswith("POST"):  # the proxy's readiness probe
            writer.write(response(200, b'{"object":"list","data":[]}'))
            return True
        parts = writes()
        if not stream:
            writer.write(response(200, b"".join(parts)))
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n")
        for part in parts:
            writer.write(part)
            await writer.drain()
        return False

    return RawUpstream(answering)


async def proxy_for(start_proxy: StartProxy, upstream: RawUpstream, **extra: Any) -> TestClient:
    await upstream.start()
    return await start_proxy({"backend_provider": "custom", "url": upstream.url,
                              "retries": {"attempts": 1}, **extra})


@pytest.mark.parametrize("case", sorted(BODIES))
async def test_every_spelling_of_a_whole_answer_names_the_clients_model(
    start_proxy: StartProxy, case: str
) -> None:
    upstream = serve(lambda: [BODIES[case].encode()], stream=False)
    try:
        client = await proxy_for(start_proxy, upstream)
        resp = await client.post("/v1/chat/completions", json=ASK)
        assert resp.status == 200
        (obj,) = assert_names_the_client(await resp.read(), stream=False)
        assert obj["choices"][0]["message"]["content"] == "fine"
    finally:
        await upstream.close()


def event(obj: Any, pretty: bool = False, end: str = "\n\n") -> bytes:
    return f"data: {json.dumps(obj) if pretty else compact(obj)}{end}".encode()


#: Streams, each as the upstream's writes.
STREAMS: dict[str, Callable[[], list[bytes]]] = {
    "pretty": lambda: [event(delta(0), pretty=True), event(delta(1), pretty=True)],
    "spelling changes after the first event": lambda: [
        event(delta(0)), event(delta(1, "up-v2")), event(delta(2)).replace(b'"model":',
                                                                          b'"model" :')],
    "escaped key in a later event": lambda: [
        event(delta(0)), event(delta(1)).replace(b'"model"', b'"\\u006dodel"')],
    "escaped quote in value": lambda: [event(delta(0, 'up"7b')), event(delta(1, 'up"7b'))],
    "nested model first": lambda: [event({"choices": [
        {"index": 0, "delta": {"content": "w", "model": "inner-model"}}],
        **{k: v for k, v in delta(0).items() if k != "choices"}})],
    "events in one write, the second respelled": lambda: [
        event(delta(0)) + event(delta(1)).replace(b'"model":', b'"model":\t ')],
    "bare CR": lambda: [event(delta(0), end="\r\r"), event(delta(1), end="\r\r")],
    "CRLF": lambda: [event(delta(0), end="\r\n\r\n"), event(delta(1), end="\r\n\r\n")],
}


@pytest.mark.parametrize("case", sorted(STREAMS))
async def test_every_spelling_of_a_stream_names_the_clients_model(
    start_proxy: StartProxy, case: str
) -> None:
    upstream = serve(lambda: [*STREAMS[case](), b"data: [DONE]\n\n"], stream=True)
    try:
        client = await proxy_for(start_proxy, upstream)
        resp = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
        assert resp.status == 200
        data = await resp.read()
        objs = assert_names_the_client(data, stream=True)
        assert all("error" not in obj for obj in objs), data
        assert events_of(data)[-1] == "[DONE]"
    finally:
        await upstream.close()


async def test_events_split_by_bare_cr_reach_the_client_as_they_arrive(
    start_proxy: StartProxy,
) -> None:
    """The upstream holds its stream open until the client has the first event."""
    got_first = asyncio.Event()

    async def held_open(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n" + event(delta(0), end="\r\r"))
        await writer.drain()
        await got_first.wait()
        writer.write(event(delta(1), end="\r\r") + b"data: [DONE]\r\r")
        return False

    upstream = RawUpstream(held_open)
    try:
        client = await proxy_for(start_proxy, upstream)
        resp = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
        first = b""
        async with asyncio.timeout(10):  # a guard against a hang, not a bound on speed
            while not events_of(first):
                first += await resp.content.readany()
        got_first.set()
        assert json.loads(events_of(first)[0])["choices"][0]["delta"]["content"] == "w0"
        rest = await resp.read()
        assert events_of(first + rest)[-1] == "[DONE]"
    finally:
        got_first.set()
        await upstream.close()


async def test_an_event_that_never_ends_fails_the_stream_at_the_bound(
    start_proxy: StartProxy,
) -> None:
    limit = 64 * 1024
    written = 0

    def endless() -> list[bytes]:
        nonlocal written
        parts = [b'data: {"model":"up-7b","choices":[{"delta":{"content":"']
        parts += [b"a" * 16384] * 256  # 4 MiB, no end
        written = sum(map(len, parts))
        return parts

    upstream = serve(endless, stream=True)
    try:
        client = await proxy_for(start_proxy, upstream,
                                 limits={"max_response_bytes": limit})
        resp = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
        data = await resp.read()
        assert len(data) < limit, len(data)  # nothing of the event, only the error
        (error,) = [json.loads(t) for t in events_of(data)]
        assert error["error"]["code"] == "upstream_response_too_large"
        assert str(limit) in error["error"]["message"]
    finally:
        await upstream.close()
    assert written > 4 * 1024 * 1024


async def metric(client: TestClient, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


IN, OUT = 'model_proxy_tokens_total{direction="in"}', 'model_proxy_tokens_total{direction="out"}'
INVALID = "model_proxy_usage_invalid_total"
BAD_COUNTS: list[Any] = [-4914, 2**63, 2**31, "5", [1], {"n": 1}, True, 1.5]


async def test_usage_that_is_not_a_count_is_not_counted_and_the_answer_stands(
    start_proxy: StartProxy,
) -> None:
    bodies = [compact(answer(usage={"prompt_tokens": bad, "completion_tokens": bad,
                                    "total_tokens": bad})).encode() for bad in BAD_COUNTS]
    bodies.append(compact(answer(usage={"prompt_tokens": 3, "completion_tokens": 2})).encode())
    upstream = serve(lambda: [bodies.pop(0)], stream=False)
    try:
        client = await proxy_for(start_proxy, upstream)
        for _ in range(len(BAD_COUNTS) + 1):
            resp = await client.post("/v1/chat/completions", json=ASK)
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["message"]["content"] == "fine"
        assert await metric(client, IN) == 3 and await metric(client, OUT) == 2
        assert await metric(client, INVALID) == len(BAD_COUNTS)
    finally:
        await upstream.close()


async def test_a_stream_carries_no_usage_the_client_did_not_ask_for(
    start_proxy: StartProxy,
) -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    last = {**delta(9), "choices": [], "usage": usage}
    writes = [event(delta(0)), event(last), event({**last, "usage": {**usage, "x": 1}}),
              event(last, pretty=True), event({**delta(1), "usage": usage}),
              event(last).replace(b'"usage"', b'"\\u0075sage"'), b"data: [DONE]\n\n"]
    upstream = serve(lambda: list(writes), stream=True)
    try:
        client = await proxy_for(start_proxy, upstream)
        resp = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
        data = await resp.read()
        objs = assert_names_the_client(data, stream=True)
        assert b"usage" not in data and b"\\u0075sage" not in data, data
        assert [o["choices"][0]["delta"]["content"] for o in objs] == ["w0", "w1"]
        assert await metric(client, IN) == 4 and await metric(client, OUT) == 2
    finally:
        await upstream.close()


def ollama_final(bad: Any) -> dict[str, Any]:
    return {"model": "llama", "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": ""}, "done": True,
            "done_reason": "stop", "prompt_eval_count": bad, "eval_count": bad,
            "eval_duration": 1000, "prompt_eval_duration": 1000, "total_duration": 5000}


@pytest.mark.parametrize("bad", BAD_COUNTS, ids=repr)
async def test_ollama_counts_that_are_not_counts_fail_no_answer(
    start_proxy: StartProxy, bad: Any
) -> None:
    async def ollama(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        piece = {"model": "llama", "message": {"role": "assistant", "content": "fine"},
                 "done": False}
        if json.loads(req.body).get("stream"):
            lines = compact(piece) + "\n" + compact(ollama_final(bad)) + "\n"
            writer.write(response(200, lines.encode(), {"Content-Type": "application/x-ndjson"}))
        else:
            whole = {**ollama_final(bad), "message": piece["message"]}
            writer.write(response(200, compact(whole).encode()))
        return True

    upstream = RawUpstream(ollama)
    try:
        client = await proxy_for(start_proxy, upstream, backend_provider="ollama",
                                 model={"name": CLIENT_MODEL}, model_name_alias="llama")
        resp = await client.post("/v1/chat/completions", json=ASK)
        assert resp.status == 200, await resp.text()
        whole = await resp.json()
        assert whole["choices"][0]["message"]["content"] == "fine"
        assert whole["usage"]["prompt_tokens"] == 0 and whole["model"] == CLIENT_MODEL
        resp = await client.post("/v1/chat/completions", json={
            **ASK, "stream": True, "stream_options": {"include_usage": True}})
        data = await resp.read()
        objs = [json.loads(t) for t in events_of(data) if t != "[DONE]"]
        assert events_of(data)[-1] == "[DONE]" and all("error" not in o for o in objs), data
        assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs
                       if o["choices"]) == "fine"
        assert objs[-1]["usage"]["completion_tokens"] == 0
        assert await metric(client, INVALID) == 2
        assert await metric(client, OUT) == 0
    finally:
        await upstream.close()


