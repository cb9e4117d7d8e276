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
