"""``model-proxy serve`` with an in-process engine, as a process: SIGTERM leaves nothing behind.

The engine here runs the tiny model as an embedding model (vLLM's pooling runner), so the
embeddings path is served by vLLM's ``ServingEmbedding`` too.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from tests.adapters.vllm.conftest import PUBLIC, SLOW, engine_section

pytestmark = SLOW


async def test_sigterm_reaps_the_engine_processes(tiny_model: Path, tmp_path: Path,
                                                  free_port: Any) -> None:
    port = free_port()
    config = {"backend_provider": "vllm", "model": {"name": PUBLIC},
              "server": {"port": port}, "engine": engine_section(tiny_model)}
    config["engine"]["args"] |= {"runner": "pooling", "convert": "embed"}
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(path)],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    family: list[psutil.Process] = []
    try:
        statuses = []
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    async with s.get(url + "/readyz") as r:
                        statuses.append(r.status)
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.5)
            assert statuses and statuses[-1] == 200, log_path.read_text()[-3000:]
            assert 503 in statuses  # it served while the engine loaded
            family = psutil.Process(process.pid).children(recursive=True)
            assert {p.name() for p in family} >= {"VLLM::EngineCore"}
            body = {"model": PUBLIC, "input": ["hello world", "the quick brown fox"]}
            async with s.post(url + "/v1/embeddings", json=body) as r:
                assert r.status == 200, await r.text()
                answer = await r.json()
            vectors = [item["embedding"] for item in answer["data"]]
            assert [item["index"] for item in answer["data"]] == [0, 1]
            assert len(vectors[0]) == len(vectors[1]) == 128 and vectors[0] != vectors[1]
            assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-3  # normalised, as vLLM does
            assert answer["usage"]["prompt_tokens"] > 2
            packed = {**body, "encoding_format": "base64", "input": "hello world"}
            async with s.post(url + "/v1/embeddings", json=packed) as r:
                raw = base64.b64decode((await r.json())["data"][0]["embedding"])
            assert struct.unpack(f"<{len(raw) // 4}f", raw) == pytest.approx(vectors[0], abs=1e-5)
            chat = {"model": PUBLIC, "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(url + "/v1/chat/completions", json=chat) as r:
                assert r.status == 501
                assert (await r.json())["error"]["message"] == (
                    "The model does not support Chat Completions API")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0, log_path.read_text()[-3000:]
        _gone, alive = psutil.wait_procs(family, timeout=15)
        assert not alive, f"engine processes outlived the proxy: {alive}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        for leftover in family:
            if leftover.is_running():
                leftover.kill()

