"""Real vLLM on CPU: the tiny model, built once per run, and proxies in front of engines.

Every test here is ``slow`` (deselected by default; ``.ci/run`` runs this directory in its
own process group). vLLM is imported by the fixtures, never at collection, so the default
run neither pays for it nor needs it, and a missing vLLM makes every test here fail.

One engine serves the whole session: engines belong to the event loop that first used them,
so these tests and fixtures all run on the session loop (``LOOP`` marks).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import pytest_asyncio
from aiohttp import web

from bench import replicas
from bench.replicas import engine_section, quiet_environment
from proxy.config import build_config
from proxy.server.app import create_app
from proxy.server.runtime import RUNTIME

# Quiet, offline and telemetry-free, for this process and every process it starts.
quiet_environment()

PUBLIC = "tiny"
#: The vLLM server's other served name, and its API key.
SERVED_NAME = "tiny-llama"
SERVER_KEY = "sekret"
#: Marks for every test module here: slow, and on the loop the shared engine lives on.
LOOP = pytest.mark.asyncio(loop_scope="session")
SLOW = [
    pytest.mark.slow,
    LOOP,
    pytest.mark.timeout(600),
    # Raised by torch while vLLM imports (vLLM 0.32, torch 2.13); nothing else is filtered.
    pytest.mark.filterwarnings(
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning:torch.*"),
    # vLLM's request models warn when a request uses max_tokens (OpenAI's older name, which
    # clients still send); its server never shows it (Python hides DeprecationWarnings).
    pytest.mark.filterwarnings(
        "ignore:max_tokens is deprecated in favor of the max_completion_tokens field"
        ":DeprecationWarning"),
]
ENGINE_PROCESSES = ("VLLM::EngineCore", "VLLM::Worker")
#: Figures measured by the tests, printed at the end of the run.
FIGURES: dict[str, str] = {}


def engine_pids() -> list[int]:
    """This process's descendants that are vLLM engine processes."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() in ENGINE_PROCESSES:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama, built offline by the project's script."""
    return replicas.tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@dataclass
class Served:
    """A proxy app served on 127.0.0.1 by this test process."""

    app: web.Application
    runner: web.AppRunner
    url: str
    #: ``/readyz`` answers seen before it was ready, as (status, reason).
    not_ready: list[tuple[int, str]] = field(default_factory=list)

    @property
    def adapter(self) -> Any:
        return self.app[RUNTIME].current().adapter


async def serve(config: dict[str, Any], config_path: str | None = None) -> Served:
    app = create_app(build_config(config), config_path=config_path)
    # As in proxy.server.run: a client that goes away cancels its handler.
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return Served(app, runner, f"http://{host}:{port}")


async def wait_ready(url: str, timeout: float = 300) -> list[tuple[int, str]]:
    """Poll ``/readyz`` until 200; returns the non-ready answers seen on the way."""
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/readyz") as response:
                if response.status == 200:
                    return seen
                reason = (await response.json()).get("reason", "")
                seen.append((response.status, reason))
                if "loading" not in reason and "starting" not in reason:
                    raise AssertionError(f"not ready, and not loading: {reason}")
            await asyncio.sleep(0.5)
    raise AssertionError(f"not ready within {timeout} s: {seen[-3:]}")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine_proxy(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> AsyncIterator[Served]:
    """The proxy with an in-process engine, shared by the session; checks the shutdown."""
    import vllm  # noqa: F401  -- no vLLM is a failure here, never a skip

    config = {"backend_provider": "vllm", "model": {"name": PUBLIC},
              "engine": engine_section(tiny_model, frontend=True)}
    path = tmp_path_factory.mktemp("config") / "model_backend.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    served = await serve(config, config_path=str(path))
    served.not_ready = await wait_ready(served.url)
    FIGURES["in-process engine load"] = f"{time.perf_counter() - start:.1f} s"
    try:
        yield served
    finally:
        started = time.perf_counter()
        await served.runner.cleanup()
        FIGURES["in-process engine shutdown"] = f"{time.perf_counter() - started:.1f} s"
    await asyncio.sleep(0.5)
    assert engine_pids() == [], "engine processes left after the proxy shut down"


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``vllm serve`` of the tiny model (:func:`bench.replicas.start`), in its own process
    group, with the proxy's public name first (the model of the answers), then another one."""
    log = tmp_path_factory.mktemp("server") / "vllm-server.log"
    started = time.perf_counter()
    server = replicas.start(tiny_model, log, ["--served-model-name", PUBLIC, SERVED_NAME,
                                              "--api-key", SERVER_KEY])
    try:
        replicas.wait_healthy(server)
        FIGURES["vLLM OpenAI server start to /health"] = f"{time.perf_counter() - started:.1f} s"
        yield server.url
    finally:
        alive = replicas.stop(server)
        assert not alive, f"vLLM server processes outlived it: {alive}"


@pytest.fixture(scope="session")
def free_port() -> Iterator[Any]:
    def pick() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port

    yield pick


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("vLLM figures (CPU, tiny model)")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
