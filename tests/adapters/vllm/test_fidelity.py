"""The in-process engine answers as ``vllm serve`` does: the same requests, sent to the proxy
(engine in-process) and to a real vLLM OpenAI server of the same model with the same
settings, get the same answers, field by field, but for ``id``, ``created`` and timings.

Streams are compared event by event. Sampled requests carry a seed, so they repeat.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.adapters.vllm.conftest import FIGURES, PUBLIC, SERVER_KEY, SLOW, Served

pytestmark = SLOW

#: Fields that differ between any two answers, whoever gives them.
VOLATILE = frozenset({"id", "created"})
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"]}}}
CHAT: Any = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Hello world"}]
# Closed value sets: the tiny model's made-up strings would otherwise run to max_tokens.
SCHEMA = {"type": "object", "properties": {"name": {"enum": ["Ann", "Bob"]},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "ok"]}


def chat(**fields: Any) -> tuple[str, dict[str, Any]]:
    return "/v1/chat/completions", {"model": PUBLIC, "messages": CHAT, "max_tokens": 12,
                                    "temperature": 0, **fields}


def completion(**fields: Any) -> tuple[str, dict[str, Any]]:
    return "/v1/completions", {"model": PUBLIC, "prompt": "Once upon a time", "max_tokens": 12,
                               "temperature": 0, **fields}


USAGE = {"stream_options": {"include_usage": True}}
#: name -> (path, body); those named "error: ..." are refused.
REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": chat(),
    "chat stream with usage": chat(stream=True, **USAGE),
    "completion": completion(),
    "completion stream with usage": completion(stream=True, **USAGE),
    "chat n=3, seeded sampling": chat(n=3, temperature=0.9, top_k=40, seed=11),
    "completion n=2, seeded, stream": completion(n=2, temperature=0.8, seed=5, stream=True),
    "chat logprobs, top_logprobs": chat(logprobs=True, top_logprobs=3),
    "chat logprobs, stream": chat(logprobs=True, top_logprobs=2, stream=True),
    "completion echo with logprobs": completion(echo=True, logprobs=2, max_tokens=6),
    "completion of two prompts": completion(prompt=["The fox", "A cat sat"], max_tokens=8),
    "chat tools, tool_choice auto": chat(tools=[WEATHER], tool_choice="auto"),
    "chat tools, tool_choice required": chat(tools=[WEATHER], tool_choice="required",
                                             max_tokens=100),
    "chat tools, named tool": chat(tools=[WEATHER], max_tokens=100, tool_choice={
        "type": "function", "function": {"name": "get_weather"}}),
    "chat tools required, stream": chat(tools=[WEATHER], tool_choice="required",
                                        max_tokens=100, stream=True, **USAGE),
    "chat json_object": chat(response_format={"type": "json_object"}, max_tokens=24),
    "chat json_schema": chat(max_tokens=100, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}),
    "chat stop and penalties": chat(stop=["e", "a"], presence_penalty=1.0,
                                    frequency_penalty=0.5, max_completion_tokens=20),
    "error: max_tokens over the context": chat(max_tokens=100_000),
    "error: prompt longer than the context": completion(prompt="hello world " * 400),
    "error: n > 1 with greedy sampling": chat(n=2),
    "error: json_schema without a schema": chat(response_format={"type": "json_schema"}),
}
ERRORS = sum(name.startswith("error:") for name in REQUESTS)


async def ask(session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any],
              key: str | None) -> tuple[int, Any]:
    """The status and the answer: JSON, or a stream's events (JSON, or the final text)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.post(url + path, json=body, headers=headers) as r:
        raw = await r.read()
        if r.headers.get("Content-Type", "").startswith("text/event-stream"):
            events = [line.removeprefix(b"data: ") for line in raw.split(b"\n")
                      if line.startswith(b"data: ")]
            assert events[-1] == b"[DONE]"
            return r.status, merged([orjson.loads(e) for e in events[:-1]])
        return r.status, orjson.loads(raw)


def merged(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream as one answer: each choice's deltas joined in order, the other fields of
    its events (one set per stream), and the usage event.

    How the tokens of an answer are cut into events depends on timing (vLLM merges the
    deltas a slow reader has not taken yet, and interleaves choices as they come), so two
    servers with the same answer need not send the same events; the joined answer is the same.
    """
    choices: dict[int, dict[str, Any]] = {}
    fields: list[dict[str, Any]] = []
    for event in events:
        for choice in event.get("choices") or []:
            join(choices.setdefault(choice["index"], {}), choice)
        rest = {k: v for k, v in event.items() if k != "choices"}
        if rest not in fields:
            fields.append(rest)
    return {"fields": fields, "choices": [choices[i] for i in sorted(choices)]}


def join(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Add one delta to what came before: strings and lists grow, the rest is replaced
    by a later value that is set."""
    for key, value in part.items():
        before = into.get(key)
        if isinstance(value, str) and isinstance(before, str) and key not in ("finish_reason",
                                                                              "role", "type"):
            into[key] = before + value
        elif isinstance(value, dict) and isinstance(before, dict):
            join(before, value)
        elif isinstance(value, list) and isinstance(before, list):
            if key == "tool_calls":  # deltas of the call at each index
                calls = {c.get("index", i): c for i, c in enumerate(before)}
                for call in value:
                    if call.get("index") in calls:
                        join(calls[call["index"]], call)
                    else:
                        before.append(call)
            else:
                before.extend(value)
        elif value is not None or key not in into:
            into[key] = value


def steady(answer: Any) -> Any:
    """The answer without its volatile fields, at every depth (tool calls have ids too)."""
    if isinstance(answer, list):
        return [steady(a) for a in answer]
    if isinstance(answer, dict):
        return {k: steady(v) for k, v in answer.items() if k not in VOLATILE}
    return answer


async def test_in_process_answers_as_vllm_serve(engine_proxy: Served, vllm_server: str) -> None:
    mismatches = []
    statuses = []
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        for name, (path, body) in REQUESTS.items():
            ours = await ask(session, engine_proxy.url, path, body, None)
            theirs = await ask(session, vllm_server, path, body, SERVER_KEY)
            statuses.append(ours[0])
            if name.startswith("error:"):
                # Errors: the same status and error fields; ``code`` is the proxy's own.
                ours_error, theirs_error = dict(ours[1]["error"]), dict(theirs[1]["error"])
                assert theirs_error.pop("code") == theirs[0]
                ours_error.pop("code")
                same = ours[0] == theirs[0] and ours_error == theirs_error
            else:
                same = ours[0] == theirs[0] == 200 and (
                    steady(ours[1]) == steady(theirs[1]))
            if not same:
                mismatches.append(f"{name}:\n  proxy:  {ours}\n  server: {theirs}")
    FIGURES[f"fidelity: {len(REQUESTS)} requests, each to both"] = (
        f"{time.perf_counter() - started:.1f} s")
    assert not mismatches, "\n".join(mismatches)
    assert statuses.count(400) == ERRORS >= 3 and statuses.count(200) == len(REQUESTS) - ERRORS


@pytest.mark.parametrize(
    "name", ["chat tools, named tool", "chat json_schema"])
async def test_structured_answers_are_structured(engine_proxy: Served, name: str) -> None:
    """Not only the same: tool calls and JSON schemas are followed by the in-process engine."""
    path, body = REQUESTS[name]
    async with aiohttp.ClientSession() as session:
        status, answer = await ask(session, engine_proxy.url, path, body, None)
    assert status == 200
    message = answer["choices"][0]["message"]
    if "tools" in body:
        assert message.get("tool_calls"), repr(message)
        call = message["tool_calls"][0]["function"]
        assert call["name"] == "get_weather"
        assert orjson.loads(call["arguments"])["city"] in ("Paris", "Oslo")
    else:
        assert message["content"].endswith("}"), repr(message)
        assert orjson.loads(message["content"])["name"] in ("Ann", "Bob"), repr(message)
