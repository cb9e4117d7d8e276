"""``model-proxy test``: one job through the configured backend, in this process, no server.

What an operator runs to check a node by hand: the answer, how long it took, the time to the
first token and the token counts. The job takes the same way as a served request (adapter,
failover, retries); it fails with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from proxy.adapters.base import Job
from proxy.config import BaseConfig
from proxy.errors import ConfigError, ProxyError
from proxy.metrics import Metrics
from proxy.upstream.exchange import Exchange
from proxy.upstream.limiter import Limiter
from proxy.upstream.pipeline import Pipeline
from proxy.upstream.routing import Served


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    test = commands.add_parser("test", help="send one prompt through the configured backend")
    test.add_argument("-c", "--config", metavar="PATH",
                      help="config file (default: $MODEL_BACKEND_CONFIG, else "
                      "./model_backend.yaml)")
    test.add_argument("--model", help="model to ask (default: the first configured one)")
    test.add_argument("--prompt", default="Say hello in one short sentence.")
    test.add_argument("--stream", action="store_true", help="ask for a streamed answer")
    test.add_argument("--max-tokens", type=int, default=64)


@dataclass
class Outcome:
    text: str
    latency: float
    first_token: float | None
    prompt_tokens: int | None
    completion_tokens: int | None


def run(config: BaseConfig, args: argparse.Namespace) -> int:
    try:
        outcome = asyncio.run(
            trial(config, args.model, args.prompt, stream=args.stream, max_tokens=args.max_tokens)
        )
    except ConfigError as exc:
        print(f"model-proxy test: {exc.problems[0]}", file=sys.stderr)
        return 2
    except ProxyError as exc:
        print(f"model-proxy test: FAILED: {exc.message}", file=sys.stderr)
        return 1
    print(f"answer: {outcome.text}")
    print(f"latency: {outcome.latency * 1000:.1f} ms")
    ttft = outcome.first_token
    print("time to first token: " + (f"{ttft * 1000:.1f} ms" if ttft is not None else "-"))
    tokens = (f"prompt {outcome.prompt_tokens}, completion {outcome.completion_tokens}"
              if outcome.prompt_tokens is not None or outcome.completion_tokens is not None
              else "not reported by the upstream")
    print(f"tokens: {tokens}")
    return 0


async def trial(
    config: BaseConfig, model: str | None, prompt: str, *, stream: bool, max_tokens: int = 64
) -> Outcome:
    """Send one chat completion through the backend serving ``model``; raise ``ProxyError``."""
    pipeline = Pipeline(Metrics(CollectorRegistry()), Limiter(config.limits))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        served = Served([pipeline.build(entry, session) for entry in config.entries])
        if served.only is not None:
            backend = served.only
        else:
            backend = served.route(model) if model is not None else served.backends[0]
        entry = backend.config
        asked = model or entry.public_name or entry.upstream_name or "default"
        if entry.public_name is not None and asked not in (entry.public_name,
                                                            *entry.model.aliases):
            raise ProxyError(f"model {asked!r} is not served here; this node serves "
                             f"{', '.join(repr(n) for n in served.names)}")
        upstream_model = entry.upstream_name or asked
        payload: dict[str, Any] = {"model": upstream_model, "stream": stream,
                                   "max_tokens": max_tokens,
                                   "messages": [{"role": "user", "content": prompt}]}
        if stream:
            payload["stream_options"] = {"include_usage": True}
        job = Job(endpoint="chat", method="POST", path="/v1/chat/completions",
                  body=orjson.dumps(payload), payload=payload, model=asked,
                  upstream_model=upstream_model, stream=stream,
                  headers={"Content-Type": "application/json"}, request_id="")
        adapters = backend.adapters()
        try:
            for adapter in adapters:
                await adapter.start()
            for adapter in adapters:
                await adapter.until_started()
            return await _ask(pipeline, backend, job)
        finally:
            for adapter in adapters:
                await adapter.close()


async def _ask(pipeline: Pipeline, backend: Any, job: Job) -> Outcome:
    start = time.perf_counter()
    response = await pipeline.call(backend, job, Exchange(job.request_id))
    first: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    try:
        if response.status >= 400:
            raise ProxyError(f"the upstream answered {response.status}: "
                             f"{_error_message(await response.read())}")
        if not response.stream:
            body = _json(await response.read())
            first = time.perf_counter() - start
            message = (body.get("choices") or [{}])[0].get("message") or {}
            parts.append(str(message.get("content") or ""))
            usage = body.get("usage") or {}
        else:
            buffer = b""
            async for chunk in response.chunks():
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    data = event.strip().removeprefix(b"data:").strip()
                    if not data or data == b"[DONE]":
                        continue
                    obj = _json(data)
                    if "error" in obj:
                        raise ProxyError(f"the stream ended with an error: "
                                         f"{_error_message(data)}")
                    for choice in obj.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if first is None:
                                first = time.perf_counter() - start
                            parts.append(text)
                    usage = obj.get("usage") or usage
    finally:
        await response.release()
    latency = time.perf_counter() - start
    reported = response.reported_usage()
    prompt_tokens = usage.get("prompt_tokens", reported.prompt_tokens if reported else None)
    completion = usage.get("completion_tokens", reported.completion_tokens if reported else None)
    return Outcome("".join(parts), latency, first, prompt_tokens, completion)


def _json(data: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProxyError("the upstream's answer is not JSON") from None
    if not isinstance(obj, dict):
        raise ProxyError("the upstream's answer is not a JSON object")
    return obj


def _error_message(raw: bytes) -> str:
    try:
        obj = orjson.loads(raw)
        error = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(error, dict):
            return str(error.get("message"))[:300]
        if error is not None:
            return str(error)[:300]
    except orjson.JSONDecodeError:
        pass
    return raw[:300].decode(errors="replace")
