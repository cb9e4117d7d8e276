"""``model-proxy serve`` as a real process: start, serve, drain on SIGTERM, refuse bad config."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.server.runtime import RUNTIME
from tests.conftest import StartProxy, free_port, upstream_url, wait_healthy
from tests.fakes.openai_upstream import FakeOpenAI


async def start_process(config: Path, port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "-c",
        str(config),
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@asynccontextmanager
async def serving(config: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A ``serve`` process on a free port, healthy; killed afterwards if still running."""
    port = free_port()
    proc = await start_process(config, port)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_lets_in_flight_stream_finish(
    tmp_path: Path, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    fake_openai.event_delay, fake_openai.chunks = 0.2, 6
    config = tmp_path / "model_backend.yaml"
    config.write_text(
        f"backend_provider: custom\nurl: {upstream_url(openai_upstream)}\n"
        "server: {shutdown_grace: 10}\napi_key: planted-secret-7\n"
    )
    async with serving(config) as (proc, url), aiohttp.ClientSession() as session:
        resp = await session.post(
            url + "/v1/chat/completions",
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        )
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(resp.read(), timeout=10)
        assert rest.endswith(b"data: [DONE]\n\n")
        assert rest.count(b"data: ") == 7
        # no new connections once draining has begun
        await asyncio.sleep(0.2)
        try:
            async with session.get(url + "/healthz") as late:
                assert late.status != 200
        except aiohttp.ClientConnectionError:
            pass
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert "serving custom on http://127.0.0.1" in stderr
    assert "shutting down" in stderr
    assert "planted-secret-7" not in stderr
    assert "Traceback" not in stderr


async def test_serve_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "model_backend.yaml"
    config.write_text("backend_provider: custom\n")
    proc = await start_process(config, free_port())
    _, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    assert proc.returncode == 2
    assert err.decode().strip() == f"{config}: url: url is required for backend_provider custom"


async def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "model_backend.yaml"
    config.write_text("backend_provider: mock\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = await start_process(config, taken.getsockname()[1])
        _, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    assert proc.returncode == 1
    assert "cannot serve on 127.0.0.1:" in err.decode()
    assert "Traceback" not in err.decode()


async def test_readyz_is_503_while_shutting_down(start_proxy: StartProxy) -> None:
    client = await start_proxy({"backend_provider": "mock"})
    assert (await client.get("/readyz")).status == 200
    client.app[RUNTIME].shutting_down = True
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json()) == {"status": "unavailable", "reason": "shutting down"}


async def test_one_oversized_header_gets_the_json_431(tmp_path: Path) -> None:
    config = tmp_path / "model_backend.yaml"
    config.write_text("backend_provider: mock\nlimits: {max_header_bytes: 16384}\n")
    async with serving(config) as (_, url), aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        async with session.post(
            url + "/v1/chat/completions", json=body, headers={"X-Huge": "h" * 20_000}
        ) as resp:
            assert resp.status == 431
            error = (await resp.json())["error"]
            assert error["code"] == "headers_too_large"
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
