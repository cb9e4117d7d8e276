"""Hot reload: in-flight work survives, broken edits change nothing, good edits apply next.

Most tests drive ``Reloader.reload`` on an in-process app, or its watcher on a clock they
move (``elapse``); one runs ``model-proxy serve`` as a real process and sends it SIGHUP and
SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import load_config
from proxy.server.app import create_app
from proxy.server.reload import RELOADER, Reloader
from proxy.server.runtime import RUNTIME
from proxy.upstream.clock import SYSTEM, Clock
from tests.conftest import free_port, upstream_url, wait_healthy
from tests.fakes.clock import FakeClock
from tests.fakes.faulty_upstream import Faulty, sse_events
from tests.fakes.openai_upstream import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, data: dict[str, Any]) -> None:
    # Keep the mtime moving even within one clock tick, so a watcher sees every edit.
    path.write_text(yaml.safe_dump(data))
    stamp = path.stat().st_mtime_ns + 10_000_000
    os.utime(path, ns=(stamp, stamp))


async def start(aiohttp_client: Any, path: Path, clock: Clock = SYSTEM) -> TestClient:
    client: TestClient = await aiohttp_client(
        create_app(load_config(path), config_path=str(path), clock=clock)
    )
    return client


async def waiting(clock: FakeClock) -> float:
    """Wait until the watcher waits on the clock again (turns of the loop, then, should it be
    closing an adapter meanwhile, a little real time: 10 s at most); when that wait ends."""
    for turn in range(2000):
        if clock.due is not None:
            return clock.due
        await asyncio.sleep(0 if turn < 1000 else 0.01)
    raise AssertionError("the watcher does not wait on the clock")


async def elapse(reloader: Reloader, clock: FakeClock, seconds: float) -> int:
    """Move the clock ``seconds`` on, letting the watcher take each look that falls due
    meanwhile and waiting for each to end (reload included); how many it took."""
    end, looks = clock.time + seconds, reloader.looks
    while (due := await waiting(clock)) <= end + 1e-9:
        looked = asyncio.ensure_future(reloader.looked.wait())
        clock.advance(due - clock.time)
        await asyncio.wait_for(looked, 10)
    clock.advance(end - clock.time)
    return reloader.looks - looks


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def reloads(client: TestClient, result: str) -> float:
    text = await (await client.get("/metrics")).text()
    prefix = f'model_proxy_config_reloads_total{{result="{result}"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines()
                 if line.startswith(prefix)), 0.0)


async def test_stream_in_flight_finishes_on_the_old_upstream(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    old_fake, new_fake = Faulty(events=10, event_delay=0.05), FakeOpenAI()
    old_up = await aiohttp_server(old_fake.app())
    new_up = await aiohttp_server(new_fake.app())
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "custom", "url": upstream_url(old_up)})
    client = await start(aiohttp_client, path)
    reloader = client.app[RELOADER]
    old_backend = client.app[RUNTIME].current()

    stream = await client.post("/v1/chat/completions", json=chat("m", stream=True))
    first = await stream.content.readline()
    assert first.startswith(b"data: ")
    write(path, {"backend_provider": "custom", "url": upstream_url(new_up),
                 "model_name_alias": "new-model"})
    assert await reloader.reload()

    resp = await client.post("/v1/chat/completions", json=chat("m"))
    assert resp.status == 200
    # next request: new config (the readiness probe may reach the new upstream too)
    chats = [seen for seen in new_fake.seen if seen.path == "/v1/chat/completions"]
    assert [seen.json()["model"] for seen in chats] == ["new-model"], new_fake.seen
    assert reloader.retired == [old_backend]  # old adapter kept while its stream runs

    rest = sse_events(first + await stream.read())
    assert [e["choices"][0]["delta"]["content"] for e in rest[:-1]] == [
        f"w{i}" for i in range(10)]
    assert rest[-1] == "[DONE]"
    assert old_fake.attempts == 1
    for _ in range(40):
        if not reloader.retired:
            break
        await asyncio.sleep(0.05)
    assert reloader.retired == []  # closed once its last request left
    assert await reloads(client, "ok") == 1


async def test_broken_edit_keeps_the_old_config_and_logs_one_line(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "model": {"name": "one"}})
    client = await start(aiohttp_client, path)
    path.write_text("backend_provider: mock\nmodel: {name: two}\nretries: {attemps: 2}\n")
    with caplog.at_level(logging.WARNING, logger="model_proxy"):
        assert not await client.app[RELOADER].reload()
    lines = [r.getMessage() for r in caplog.records if r.name == "model_proxy"]
    assert len(lines) == 1
    assert "reload rejected" in lines[0]
    assert "retries.attemps: unknown key; did you mean 'attempts'?" in lines[0]
    assert (await client.post("/v1/chat/completions", json=chat("one"))).status == 200
    assert (await client.post("/v1/chat/completions", json=chat("two"))).status == 404
    assert await reloads(client, "error") == 1
    assert await reloads(client, "ok") == 0


async def test_good_edit_applies_to_the_next_request(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "model": {"name": "one"}})
    client = await start(aiohttp_client, path)
    write(path, {"backend_provider": "mock", "model": {"name": "two"},
                 "limits": {"max_concurrency": 3}})
    assert await client.app[RELOADER].reload()
    assert (await client.post("/v1/chat/completions", json=chat("two"))).status == 200
    assert (await client.post("/v1/chat/completions", json=chat("one"))).status == 404
    assert client.app[RUNTIME].pipeline is not None
    assert client.app[RUNTIME].pipeline.limiter.max_active == 3


async def test_request_limits_and_copied_settings_follow_a_reload(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """Each request reads plain copies of the limits and of its backend's settings (not the
    pydantic models): a reload that changes them applies to the next request."""
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "model": {"name": "one"}})
    client = await start(aiohttp_client, path)
    two_messages = {"model": "one", "messages": [{"role": "user", "content": "x" * 2000}] * 2}
    big_header = {"X-Padding": "p" * 3000}
    assert (await client.post("/v1/chat/completions", json=two_messages)).status == 200
    assert (await client.post("/v1/chat/completions", json=chat("one"),
                              headers=big_header)).status == 200
    assert (await client.post("/v1/chat/completions", json=chat("two"))).status == 404

    write(path, {"backend_provider": "mock", "model": {"name": "two"},
                 "determinism": {"enforce": True},
                 "limits": {"max_messages": 1, "max_body_bytes": 2048,
                            "max_header_bytes": 2048}})
    assert await client.app[RELOADER].reload()
    many = await client.post("/v1/chat/completions", json={**two_messages, "model": "two"})
    assert many.status == 413  # over max_body_bytes before the messages are counted
    assert (await client.post("/v1/chat/completions", json={
        "model": "two", "messages": [{"role": "user", "content": "a"}] * 2})).status == 400
    # the header limit needs a restart (aiohttp's parser holds it): the running one stays
    assert (await client.post("/v1/chat/completions", json=chat("two"),
                              headers=big_header)).status == 200
    assert client.app[RUNTIME].limits.max_header_bytes == 16 * 1024
    answer = await client.post("/v1/chat/completions", json=chat("two"))
    assert answer.status == 200
    assert "X-Output-SHA256" in answer.headers  # determinism.enforce, now on
    backend = client.app[RUNTIME].current()
    assert (backend.public_name, backend.enforce) == ("two", True)
    assert (await client.post("/v1/chat/completions", json=chat("one"))).status == 404


async def test_settings_that_need_a_restart_are_reported(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "server": {"port": 8080}})
    client = await start(aiohttp_client, path)
    write(path, {"backend_provider": "mock", "server": {"port": 9999},
                 "model": {"name": "two"}})
    with caplog.at_level(logging.WARNING, logger="model_proxy"):
        assert await client.app[RELOADER].reload()
    assert any("server.port cannot change while running" in r.getMessage()
               for r in caplog.records)
    runtime = client.app[RUNTIME]
    assert runtime.config.server.port == 8080
    assert runtime.config.public_name == "two"


async def test_watched_file_is_reloaded_when_it_changes(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "one"}})
    clock = FakeClock()
    client = await start(aiohttp_client, path, clock)
    reloader = client.app[RELOADER]
    await elapse(reloader, clock, reloader.watch_interval)  # a look at the unchanged file
    assert client.app[RUNTIME].config.public_name == "one"
    write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "two"}})
    # rewritten in place: seen at the next look, applied once it has stayed so for `settle`
    await elapse(reloader, clock, reloader.watch_interval)
    assert client.app[RUNTIME].config.public_name == "one"
    await elapse(reloader, clock, reloader.settle)
    assert client.app[RUNTIME].config.public_name == "two"
    assert (await client.post("/v1/chat/completions", json=chat("two"))).status == 200


# --- a real process -------------------------------------------------------------------------


async def served_name(base: str, session: aiohttp.ClientSession) -> str:
    async with session.get(base + "/v1/models") as resp:
        return str((await resp.json())["data"][0]["id"])


async def test_sighup_and_sigterm_on_a_real_process(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    slow = Faulty(events=1000, event_delay=0.05)
    upstream: TestServer = await aiohttp_server(slow.app())
    port = free_port()
    path = tmp_path / "model_backend.yaml"
    base_config = {"backend_provider": "custom", "url": upstream_url(upstream),
                   "server": {"port": port, "shutdown_grace": 0.5}}
    write(path, {**base_config, "model": {"name": "one"}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(path), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(base, process)
            assert await served_name(base, session) == "one"

            write(path, {**base_config, "model": {"name": "two"}})
            process.send_signal(signal.SIGHUP)
            for _ in range(50):
                if await served_name(base, session) == "two":
                    break
                await asyncio.sleep(0.1)
            assert await served_name(base, session) == "two"

            path.write_text("backend_provider: custom\n")  # url missing: invalid
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert await served_name(base, session) == "two"

            # A stream still running when SIGTERM's grace is over ends with an error event.
            async with session.post(base + "/v1/chat/completions",
                                    json=chat("two", stream=True)) as stream:
                first = await stream.content.readline()
                assert first.startswith(b"data: ")
                process.send_signal(signal.SIGTERM)
                events = sse_events(first + await stream.read())
            assert events[-1]["error"]["code"] == "shutting_down"
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    rejected = [line for line in log.splitlines() if "reload rejected" in line]
    assert len(rejected) == 1
    assert "url is required for backend_provider custom" in rejected[0]
    assert "config reloaded" in log
