"""OpenAI-compatible upstreams (``custom``, a vLLM server): bytes in, bytes out.

The body travels as received (the resolver has already rewritten ``model`` and asked for the
usage event); the answer is relayed chunk by chunk, renamed on bytes where its compact form
proves that right and parsed otherwise (``proxy.wire.relayed``).
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.adapters.base import VLLM_SAMPLING, Job, UpstreamResponse
from proxy.adapters.http import HTTPUpstream
from proxy.errors import UpstreamError
from proxy.wire.models import MAX_MODELS, openai_models


class OpenAIAdapter(HTTPUpstream):
    """Any OpenAI-compatible server (``backend_provider: custom``)."""

    name = "custom"
    passthrough = True
    asks_usage = True
    ready_path = "/v1/models"

    async def send(self, job: Job) -> UpstreamResponse:
        path = job.path + ("?" + job.query if job.query else "")
        response = await self.request(
            job.method, path, body=job.body or None, headers=job.headers
        )
        return await self.relay(response, None if job.endpoint == "passthrough" else job)

    async def models(self) -> list[dict[str, Any]]:
        models = openai_models(await self.get_json("/v1/models"))
        if models.skipped:
            self.note(logging.WARNING, f"the upstream's /v1/models held {models.skipped} "
                      f"entries that are not model objects or are over {MAX_MODELS}; skipped")
        return models.entries

    async def check_ready(self) -> None:
        response = await self.request("GET", self.ready_path)
        response.release()
        if response.status >= 400:
            raise UpstreamError(f"the upstream answered {self.ready_path} with {response.status}")


class VllmServerAdapter(OpenAIAdapter):
    """A vLLM OpenAI server (``backend_provider: vllm`` with ``url``)."""

    name = "vllm"
    ready_path = "/health"
    sampling = VLLM_SAMPLING
    top_k_off = -1

    async def check_ready(self) -> None:
        await super().check_ready()
        # /health needs no key, so it cannot tell a wrong api_key; /v1/models does (a 401 or
        # 403 raises in ``request``).
        response = await self.request("GET", "/v1/models")
        response.release()
