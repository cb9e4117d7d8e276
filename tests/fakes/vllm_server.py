"""A fake ``vllm serve``: the OpenAI routes of :class:`FakeOpenAI`, plus ``/metrics`` in the
Prometheus text format under vLLM's own metric names and a ``/v1/models`` that lists the
models and LoRA adapters it is told to serve. Every reading can be changed on demand.

It keeps a toy prefix cache, so that a benchmark can tell how well routing kept prefixes
where they were cached: a prompt is cut in blocks of :data:`BLOCK` bytes, and a block counts
as a hit when the same leading blocks were seen before (``vllm:prefix_cache_hits`` and
``vllm:prefix_cache_queries``, counted in blocks rather than tokens).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.openai_upstream import FakeOpenAI

#: Bytes per block of the toy prefix cache (vLLM's blocks are 16 tokens, a few dozen bytes).
BLOCK = 64


@dataclass
class FakeVllm(FakeOpenAI):
    #: What ``/metrics`` reports (``running`` adds the requests this fake is answering now).
    waiting: float = 0
    running: float = 0
    kv_cache: float = 0.0
    #: LoRA adapters reported running (``vllm:lora_requests_info``).
    loras: tuple[str, ...] = ()
    #: The ids ``/v1/models`` lists.
    served: tuple[str, ...] = ("base",)
    #: Answer ``/metrics`` with this status instead (a dead metrics endpoint).
    metrics_status: int | None = None
    #: Answer ``/metrics`` with these bytes instead (not vLLM's page, or an oversized one).
    metrics_body: bytes | None = None
    #: Requests being answered now, and the toy prefix cache's counters.
    busy: int = 0
    hits: int = 0
    queries: int = 0
    metrics_reads: int = 0
    blocks: set[bytes] = field(default_factory=set)
    #: Seconds of "prefill" per block the toy cache missed, before the answer starts (a
    #: benchmark's stand-in for the work a prefix-cache hit saves; 0 in tests).
    prefill: float = 0.0

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/metrics", self.metrics)
        return app

    async def completion(self, request: web.Request) -> web.StreamResponse:
        self.busy += 1
        try:
            missed = self.cache(await request.read())
            if self.prefill and missed:
                await asyncio.sleep(self.prefill * missed)
            return await super().completion(request)
        finally:
            self.busy -= 1

    def cache(self, body: bytes) -> int:
        """Look the prompt's blocks up in the toy cache and add them; the blocks missed."""
        try:
            payload = json.loads(body)
        except ValueError:
            return 0
        prompt = payload.get("prompt") or json.dumps(
            [[m.get("role"), m.get("content")] for m in payload.get("messages", [])])
        data = str(prompt).encode()
        digest = hashlib.blake2b(digest_size=16)
        full = len(data) // BLOCK
        hit = True
        hits = 0
        for i in range(full):
            digest.update(data[i * BLOCK:(i + 1) * BLOCK])
            block = digest.copy().digest()
            hit = hit and block in self.blocks
            hits += hit
            self.blocks.add(block)
        self.hits += hits
        self.queries += full
        return full - hits

    async def metrics(self, request: web.Request) -> web.Response:
        self.metrics_reads += 1
        if self.metrics_status is not None:
            return web.Response(status=self.metrics_status, text="unavailable")
        if self.metrics_body is not None:
            return web.Response(body=self.metrics_body, content_type="text/plain")
        labels = 'engine="0",model_name="base"'
        loras = ",".join(self.loras)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(self.running + self.busy)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(self.waiting)}",
            "# TYPE vllm:num_requests_waiting_by_reason gauge",
            f'vllm:num_requests_waiting_by_reason{{{labels},reason="capacity"}} 99.0',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {self.kv_cache}",
            "# TYPE vllm:lora_requests_info gauge",
            f'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{loras}",'
            f'waiting_lora_adapters=""}} 1.7e9',
            "# TYPE vllm:prefix_cache_queries counter",
            f"vllm:prefix_cache_queries_total{{{labels}}} {float(self.queries)}",
            "# TYPE vllm:prefix_cache_hits counter",
            f"vllm:prefix_cache_hits_total{{{labels}}} {float(self.hits)}",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            f'vllm:time_to_first_token_seconds_bucket{{{labels},le="0.001"}} 0.0',
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def models(self, request: web.Request) -> web.Response:
        await self.record(request)
        data: list[dict[str, Any]] = [
            {"id": name, "object": "model", "created": 1, "owned_by": "vllm",
             "root": self.served[0], "parent": None if i == 0 else self.served[0]}
            for i, name in enumerate(self.served)
        ]
        return web.json_response({"object": "list", "data": data})
