"""The life of one in-process vLLM engine: its arguments (the ``engine:`` section as
``vllm serve`` flags, read by vLLM's own parser), a load in a thread that ends with vLLM's
OpenAI serving layer over the engine (``vllm.serving.Frontend``), the stat logger that feeds
``/metrics``, and a shutdown that reaps its processes.

Used by ``proxy.adapters.vllm.engine``; vLLM is imported inside functions only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import time
from typing import Any

from proxy.adapters.vllm.serving import Frontend
from proxy.config import EngineSection
from proxy.errors import ConfigError, Unavailable, UpstreamError, reason

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

    def __init__(self, section: EngineSection, served_names: tuple[str, ...]) -> None:
        self.section = section
        self.served_names = served_names
        # Bad settings fail here, before any loading.
        self.args = serve_args(section, served_names)
        self.stats = EngineStats()
        self.users = 1
        self.llm: Any = None
        self.error: str | None = None
        self.load_seconds = 0.0
        self.tasks: tuple[str, ...] = ()
        self.max_model_len = 0
        self.frontend: Frontend | None = None
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
            self.frontend = await Frontend.open(llm, args, self.tasks)
        except Exception as exc:
            self.error = f"the vLLM engine failed to load: {exc or reason(exc)}"[:1000]
            log.exception("loading the vLLM engine for %s failed", self.section.model)
            return
        self.llm = llm
        self.max_model_len = llm.model_config.max_model_len
        self.load_seconds = time.perf_counter() - start
        log.info("vLLM engine loaded %s in %.1f s (tasks: %s)", self.section.model,
                 self.load_seconds, ", ".join(self.tasks))

    async def loaded(self) -> None:
        """Wait for the load; raise ``UpstreamError`` if it failed."""
        if self._loading is not None:
            await asyncio.shield(self._loading)
        if self.error is not None:
            raise UpstreamError(self.error)

    def ready(self) -> Frontend:
        """vLLM's serving layer over the engine, or the reason it cannot take a request now."""
        if self.llm is not None and self.frontend is not None:
            if self.llm.errored:
                # A process of the engine (its core, a worker, a rank on another node)
                # exited: vLLM cannot recover from that in place.
                raise UpstreamError("the vLLM engine has stopped (an engine or worker process "
                                    "exited); restart the proxy", code="engine_dead")
            return self.frontend
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
        holder, self.llm, self.frontend = [self.llm], None, None
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


#: ``engine:`` keys with a ``vllm serve`` flag of the same name.
NAMED_FLAGS = (
    "model", "tokenizer", "dtype", "max_model_len", "kv_cache_memory_bytes",
    "gpu_memory_utilization", "tensor_parallel_size", "pipeline_parallel_size",
    "distributed_executor_backend", "seed", "served_model_name", "chat_template",
    "tool_call_parser", "enable_auto_tool_choice", "reasoning_parser",
)


def serve_args(section: EngineSection, served_names: tuple[str, ...]) -> Any:
    """The ``vllm serve`` arguments (an ``argparse.Namespace``) for the ``engine:`` section,
    parsed and checked by vLLM's own parser; ``ConfigError`` with one line per problem."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args

    parser = make_arg_parser(_parser_class()())
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    named = {name: getattr(section, name) for name in NAMED_FLAGS}
    named["served_model_name"] = list(served_names)
    problems: list[str] = []
    argv: list[str] = []
    for where, items in (("engine", named), ("engine.args", section.args)):
        for key, value in items.items():
            dest = key.replace("-", "_")
            action = actions.get(dest.split(".")[0])
            if action is None:
                close = difflib.get_close_matches(dest, actions, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{where}.{key}: not a vllm serve option{hint}")
                continue
            flag = "--" + dest.replace("_", "-") if "." not in dest else "--" + dest
            try:
                words = _flag_words(flag, action, value)
                parser.parse_args(words if dest == "model" else ["--model", section.model, *words])
            except _Refused as exc:
                problems.append(f"{where}.{key}: {_one_line(str(exc))}")
                continue
            argv += words
    if problems:
        raise ConfigError(problems)
    try:
        args = parser.parse_args(argv)
        args.disable_log_stats = False  # the stat loggers feed /metrics
        validate_parsed_serve_args(args)
    except (_Refused, TypeError, ValueError) as exc:
        raise ConfigError([f"engine: {_one_line(str(exc).removeprefix('Error: '))}"]) from None
    _check_parsers(args)
    return args


def _check_parsers(args: Any) -> None:
    """Tool-call and reasoning parsers by a name vLLM knows (plugins loaded first, as
    ``vllm serve`` loads them); vLLM itself would find out only when serving starts."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    if getattr(args, "tool_parser_plugin", None):
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if getattr(args, "reasoning_parser_plugin", None):
        ReasoningParserManager.import_reasoning_parser(args.reasoning_parser_plugin)
    problems = []
    for key, known in (("tool_call_parser", ToolParserManager.list_registered()),
                       ("reasoning_parser", ReasoningParserManager.list_registered())):
        name = getattr(args, key, None)
        if not name:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"engine.{key}: vLLM has no parser {name!r}{hint}")
    if problems:
        raise ConfigError(problems)


def _one_line(message: str) -> str:
    """vLLM's message (pydantic's, often) on one line, without pydantic's links."""
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.strip().startswith("For further information")]
    return "; ".join(lines)[:1000]


class _Refused(Exception):
    """What vLLM's argument parser said about a value (instead of exiting)."""


def _parser_class() -> type[Any]:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):  # type: ignore[misc,unused-ignore]
        def error(self, message: str) -> Any:
            raise _Refused(message.removeprefix("argument "))

        def exit(self, status: int = 0, message: str | None = None) -> Any:
            raise _Refused(message or f"exit {status}")

    return Parser


def _flag_words(flag: str, action: Any, value: Any) -> list[str]:
    """``value`` as the words ``vllm serve`` would be given for ``flag``."""
    import argparse
    import json

    if value is None:
        return []
    boolean = isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction))
    if boolean and not isinstance(value, bool):
        raise _Refused(f"expected true or false, got {value!r}"[:200])
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag] if value else ["--no-" + flag.removeprefix("--")]
    if isinstance(action, argparse._StoreTrueAction):
        return [flag] if value else []
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, (list, tuple)):
        return [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
    if isinstance(value, bool):
        return [flag, "true" if value else "false"]
    return [flag, str(value)]


def _open(args: Any, stats: EngineStats) -> Any:
    """The engine, made as ``vllm serve`` makes it (the same arguments and usage context)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    context = UsageContext.OPENAI_API_SERVER
    vllm_config = engine_args.create_engine_config(usage_context=context)
    return AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=context,
        stat_loggers=[_stat_logger(stats)],
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=engine_args.aggregate_engine_logging,
        disable_log_stats=False,
    )


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
