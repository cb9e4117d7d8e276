"""``model_proxy_upstream_up`` follows the upstream with no one polling ``/readyz``: answers
and failures set it, a background probe keeps it current, and an open circuit reads 0."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import build_config
from proxy.errors import UpstreamError
from proxy.server.app import create_app
from proxy.server.runtime import RUNTIME
from proxy.upstream.pipeline import ANSWERED, BUSY, DOWN, Verdict, judge, judge_error
from tests.conftest import StartProxy, free_port, upstream_url
from tests.fakes.openai_upstream import FakeOpenAI

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def up(client: TestClient) -> float:
    text = await (await client.get("/metrics")).text()
    match = re.search(r"^model_proxy_upstream_up (\S+)$", text, re.M)
    assert match is not None
    return float(match[1])


async def until_up(client: TestClient, value: float, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while await up(client) != value:
        assert time.monotonic() < deadline, f"upstream_up never became {value}"
        await asyncio.sleep(0.05)


async def test_answers_and_failures_set_it(
    start_proxy: StartProxy, openai_upstream: TestServer
) -> None:
    client = await start_proxy({"backend_provider": "custom", "url": upstream_url(openai_upstream),
                                "retries": {"attempts": 1}})
    assert await up(client) == 0  # nothing known yet
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert await up(client) == 1
    await openai_upstream.close()
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 502
    assert await up(client) == 0


async def test_the_background_probe_keeps_it_current(
    aiohttp_client: Any, aiohttp_server: Any
) -> None:
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    app = create_app(build_config({"backend_provider": "custom", "url": upstream_url(server)}))
    app[RUNTIME].readiness.probe_every = 0.1
    client = await aiohttp_client(app)
    await until_up(client, 1)
    assert any(seen.path == "/v1/models" for seen in fake.seen)
    await server.close()
    await until_up(client, 0)


async def test_an_open_circuit_reads_0(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy({"backend_provider": "custom", "url": upstream_url(openai_upstream),
                                "retries": {"attempts": 1}, "circuit": {"failures": 2}})
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert await up(client) == 1
    fake_openai.fail_status, fake_openai.fail_times, fake_openai.fail_body = 503, 2, {}
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 503
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert (await resp.json())["error"]["code"] == "circuit_open"
    # the upstream's own readiness path answers fine meanwhile; the circuit decides
    assert (await client.get("/readyz")).status == 503
    assert await up(client) == 0


async def test_a_url_list_sets_it_by_the_same_rule(
    start_proxy: StartProxy, openai_upstream: TestServer
) -> None:
    """One URL is a list of one: the same attempt loop, the same table of outcomes. A list
    whose first URL is down and second answers is up; one whose every URL fails is down."""
    down = f"http://127.0.0.1:{free_port()}"
    good = upstream_url(openai_upstream)
    client = await start_proxy({"backend_provider": "custom", "url": [down, good],
                                "retries": {"attempts": 1}, "routing": "round_robin"})
    for _ in range(2):  # each URL first once
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
        assert await up(client) == 1
    await openai_upstream.close()
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 502
    assert await up(client) == 0


@pytest.mark.parametrize(("status", "verdict"), [
    (200, ANSWERED), (201, ANSWERED), (400, ANSWERED), (404, ANSWERED), (422, ANSWERED),
    (429, BUSY), (500, BUSY), (501, BUSY), (502, DOWN), (503, DOWN), (504, DOWN),
])
def test_the_table_of_outcomes(status: int, verdict: Verdict) -> None:
    assert judge(status) is verdict


def test_errors_are_judged_by_whether_a_retry_could_help() -> None:
    assert judge_error(UpstreamError("refused", retryable=True)) is DOWN
    assert DOWN.failed and DOWN.fail_over and not DOWN.up
    broke = judge_error(UpstreamError("broke off mid-answer"))
    assert broke.failed and not broke.fail_over and not broke.up
