"""Shared fixtures: real servers on 127.0.0.1 — the proxy itself and fake upstreams."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import build_config
from proxy.server.app import create_app
from proxy.upstream.clock import SYSTEM, Clock
from tests.fakes.openai_upstream import FakeOpenAI

StartProxy = Callable[..., Awaitable[TestClient]]

#: The slow-marked suites a default run leaves out, and the command that runs each
#: (``bash .ci/run`` runs them all, after installing what they need).
SLOW_SUITES = {
    "tests/adapters/vllm/": "vLLM on CPU (needs requirements/ci.txt installed, 3 to 5 minutes): "
                            "setsid .venv/bin/python -m pytest -q -m slow tests/adapters/vllm",
    "tests/": "soak and live Prometheus (Prometheus: apt-get install prometheus): "
              ".venv/bin/python -m pytest -q -m slow --ignore=tests/adapters/vllm",
}
LEFT_OUT = pytest.StashKey[dict[str, int]]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    if not items:
        return
    left_out = items[0].config.stash.setdefault(LEFT_OUT, {})
    for item in items:
        if item.get_closest_marker("slow") is not None:
            suite = next(s for s in SLOW_SUITES if item.nodeid.startswith(s))
            left_out[suite] = left_out.get(suite, 0) + 1


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say which slow suites this run left out and the command that runs them; the reasons
    for skipped tests are in pytest's short summary (``-rs``)."""
    left_out = config.stash.get(LEFT_OUT, {})
    if left_out:
        terminalreporter.section("left out (slow)")
        for suite, count in left_out.items():
            terminalreporter.write_line(f"{count} tests: {SLOW_SUITES[suite]}")


@pytest.fixture
def fake_openai() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def openai_upstream(aiohttp_server: Any, fake_openai: FakeOpenAI) -> TestServer:
    """The fake OpenAI server, started; its recordings are on the ``fake_openai`` fixture."""
    return await aiohttp_server(fake_openai.app())


@pytest.fixture
def start_proxy(aiohttp_client: Any) -> StartProxy:
    """Start the proxy for a config mapping; returns an aiohttp client bound to it.

    Each call builds a fresh app with its own metrics registry.
    """

    async def start(config: dict[str, Any], *, clock: Clock = SYSTEM,
                    **client_kwargs: Any) -> TestClient:
        return await aiohttp_client(create_app(build_config(config), clock=clock),
                                    **client_kwargs)

    return start


def upstream_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_healthy(url: str, proc: asyncio.subprocess.Process, seconds: float = 15) -> None:
    """Wait until the proxy process at ``url`` answers ``/healthz``; fail if it exits."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise AssertionError(f"proxy exited with {proc.returncode}")
            try:
                async with session.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("proxy did not become healthy")
