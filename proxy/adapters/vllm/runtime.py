"""The life of one in-process vLLM engine: its arguments, a load in a thread, the stat
logger that feeds ``/metrics``, and a shutdown that reaps its processes.

Used by ``proxy.adapters.vllm.engine``; vLLM is imported inside functions only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import time
from typing import Any

from proxy.config import EngineSection
from proxy.errors import ConfigError, Unavailable, UpstreamError

log = logging.getLogger("model_proxy")

#: Seconds a client is told to wait while the engine loads.
LOADING_RETRY_AFTER = 5.0


@dataclasses.dataclass(slots=True)
class EngineStats:
    """The engine's latest numbers, written by its stat logger after every engine step."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: int = 0


class Engine:
    """One loaded ``AsyncLLM``, shared by the adapters of successive configurations.

    ``users`` counts the adapters holding it; the last ``release`` shuts it down.
    """

    def __init__(self, section: EngineSection) -> None:
        self.section = section
        self.args = engine_args(section)  # bad engine args fail here, before any loading
        self.stats = EngineStats()
        self.users = 1
        self.llm: Any = None
        self.error: str | None = None
        self.load_seconds = 0.0
        self.tasks: tuple[str, ...] = ()
        self.max_model_len = 0
        self.defaults: dict[str, Any] = {}
        self._loading: asyncio.Task[None] | None = None

    def begin_loading(self) -> None:
        self._loading = asyncio.create_task(self._load(), name="vllm-engine-load")

    async def _load(self) -> None:
        start = time.perf_counter()
        args, stats = self.args, self.stats
        try:
            # Construction blocks for tens of seconds: a thread keeps the loop serving. The
            # engine comes back in a list emptied here because the executor's finished future
            # keeps its result alive, and with it the engine past shutdown.
            llm = (await asyncio.to_thread(lambda: [_open(args, stats)])).pop()
            self.tasks = tuple(await llm.get_supported_tasks())
        except Exception as exc:
            self.error = f"the vLLM engine failed to load: {type(exc).__name__}: {exc}"[:1000]
            log.exception("loading the vLLM engine for %s failed", self.section.model)
            return
        self.llm = llm
        self.max_model_len = llm.model_config.max_model_len
        self.defaults = llm.model_config.get_diff_sampling_param()
        self.load_seconds = time.perf_counter() - start
        log.info("vLLM engine loaded %s in %.1f s (tasks: %s)", self.section.model,
                 self.load_seconds, ", ".join(self.tasks))

    async def loaded(self) -> None:
        """Wait for the load; raise ``UpstreamError`` if it failed."""
        if self._loading is not None:
            await asyncio.shield(self._loading)
        if self.error is not None:
            raise UpstreamError(self.error)

    def ready(self) -> Any:
        """The engine, or the reason it cannot take a request now."""
        if self.llm is not None:
            if self.llm.errored:
                raise UpstreamError("the vLLM engine has stopped; restart the proxy")
            return self.llm
        if self.error is not None:
            raise UpstreamError(self.error)
        raise Unavailable("the vLLM engine is loading", code="loading",
                          retry_after=LOADING_RETRY_AFTER)

    async def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if self._loading is not None:
            # A load cannot be interrupted; let it finish so its processes can be reaped.
            await asyncio.shield(self._loading)
        holder, self.llm = [self.llm], None
        if holder[0] is None:
            return
        ctx = _zmq_context(holder[0])
        start = time.perf_counter()
        await asyncio.to_thread(_shutdown, holder)
        # The engine closed its sockets through this loop (call_soon_threadsafe); once they
        # are closed its zmq context can go, which vLLM itself leaves to garbage collection
        # (and a ResourceWarning).
        await asyncio.sleep(0)
        if ctx is not None:
            ctx.destroy(linger=0)
        log.info("vLLM engine shut down in %.1f s", time.perf_counter() - start)


def engine_args(section: EngineSection) -> Any:
    """``AsyncEngineArgs`` for the ``engine:`` section; ``ConfigError`` for unknown ``args``."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    named: dict[str, Any] = {
        "model": section.model,
        "tokenizer": section.tokenizer,
        "dtype": section.dtype,
        "max_model_len": section.max_model_len,
        "kv_cache_memory_bytes": section.kv_cache_memory_bytes,
        "gpu_memory_utilization": section.gpu_memory_utilization,
        "tensor_parallel_size": section.tensor_parallel_size,
        "pipeline_parallel_size": section.pipeline_parallel_size,
        "distributed_executor_backend": section.distributed_executor_backend,
        "seed": section.seed,
        # Stats feed /metrics through our own stat logger.
        "disable_log_stats": False,
    }
    kwargs = {k: v for k, v in named.items() if v is not None}
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    problems = []
    for key in section.args:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"engine.args.{key}: not a vLLM engine argument{hint}")
    if problems:
        raise ConfigError(problems)
    return AsyncEngineArgs(**kwargs, **section.args)


def _open(args: Any, stats: EngineStats) -> Any:
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(
        args, usage_context=UsageContext.ENGINE_CONTEXT, stat_loggers=[_stat_logger(stats)])


def _shutdown(holder: list[Any]) -> None:
    llm = holder.pop()
    llm.shutdown()
    # The last reference goes here, while the interpreter is whole: otherwise
    # AsyncLLM.__del__ runs shutdown again at exit and fails noisily.
    del llm


def _zmq_context(llm: Any) -> Any:
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    return getattr(resources, "ctx", None)


def _stat_logger(stats: EngineStats) -> Any:
    """A vLLM stat-logger class (its factory signature) that writes into ``stats``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotStatLogger(StatLoggerBase):  # type: ignore[misc,unused-ignore]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                stats.running = scheduler_stats.num_running_reqs
                stats.waiting = (scheduler_stats.num_waiting_reqs
                                 + scheduler_stats.num_skipped_waiting_reqs)
                stats.kv_cache_usage = scheduler_stats.kv_cache_usage
            if iteration_stats is not None:
                stats.prompt_tokens += iteration_stats.num_prompt_tokens
                stats.generation_tokens += iteration_stats.num_generation_tokens
                stats.preemptions += iteration_stats.num_preempted_reqs
                stats.finished += len(iteration_stats.finished_requests)

        def log_engine_initialized(self) -> None:
            pass

    return SnapshotStatLogger
