"""Several models behind one proxy (``models:``) and several upstreams behind one model
(``url:`` as a list): routing by name, 404s that list the served names, failover, spreading,
and a reload that swaps the whole set while in-flight requests finish on the old one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestClient

from proxy.config import load_config
from proxy.server.app import create_app
from proxy.server.reload import RELOADER
from proxy.server.runtime import RUNTIME
from tests.conftest import StartProxy, free_port, upstream_url
from tests.fakes.faulty_upstream import Faulty, sse_events
from tests.fakes.openai_upstream import FakeOpenAI


def answered(fake: FakeOpenAI) -> list[Any]:
    """The completions ``fake`` answered (the catalog also asks it for its model list)."""
    return [seen for seen in fake.seen if seen.path == "/v1/chat/completions"]


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def metric_lines(client: TestClient, name: str) -> list[str]:
    text = await (await client.get("/metrics")).text()
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def test_requests_go_to_the_model_they_name(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fake_a, fake_b = FakeOpenAI(), FakeOpenAI()
    up_a, up_b = await aiohttp_server(fake_a.app()), await aiohttp_server(fake_b.app())
    client = await start_proxy({"models": [
        {"backend_provider": "custom", "url": upstream_url(up_a),
         "model": {"name": "alpha", "aliases": ["a"]}, "model_name_alias": "alpha-7b-q4"},
        {"backend_provider": "custom", "url": upstream_url(up_b), "model": {"name": "beta"}},
        {"backend_provider": "mock", "model": {"name": "gamma"}},
    ]})
    for name in ("alpha", "a", "beta", "gamma", "beta"):
        resp = await client.post("/v1/chat/completions", json=chat(name))
        assert resp.status == 200, await resp.text()
    assert [s.json()["model"] for s in answered(fake_a)] == ["alpha-7b-q4", "alpha-7b-q4"]
    assert [s.json()["model"] for s in answered(fake_b)] == ["beta", "beta"]

    resp = await client.post("/v1/chat/completions", json=chat("delta"))
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "model_not_found"
    assert "'alpha', 'beta', 'gamma'" in error["message"]

    lines = await metric_lines(client, "model_proxy_requests_total")
    labels = {line.split('model="')[1].split('"')[0] for line in lines}
    assert labels == {"alpha", "beta", "gamma", "none"}  # configured names only
    assert not any("delta" in line for line in lines)


async def test_an_entry_takes_the_top_level_sections_it_does_not_give(tmp_path: Path) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({
        "timeouts": {"first_byte": 7},
        "limits": {"max_concurrency": 3},
        "models": [
            {"backend_provider": "mock", "model": {"name": "a"}},
            {"backend_provider": "mock", "model": {"name": "b"}, "timeouts": {"idle": 2}},
        ],
    }))
    config = load_config(path)
    a, b = config.entries
    assert a.timeouts.first_byte == 7 and b.timeouts.first_byte == 120  # its own section
    assert b.timeouts.idle == 2
    assert a.limits.max_concurrency == b.limits.max_concurrency == 3


async def test_the_single_model_file_keeps_routing_any_name_it_serves(
    start_proxy: StartProxy,
) -> None:
    client = await start_proxy({"backend_provider": "mock"})
    assert (await client.post("/v1/chat/completions", json=chat("whatever"))).status == 200
    client = await start_proxy({"backend_provider": "mock", "model": {"name": "one"}})
    resp = await client.post("/v1/chat/completions", json=chat("two"))
    assert resp.status == 404
    assert "this node serves 'one'" in (await resp.json())["error"]["message"]


async def test_reload_swaps_the_whole_set_and_in_flight_streams_finish_on_the_old_one(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    slow = Faulty(events=8, event_delay=0.05)
    slow_up = await aiohttp_server(slow.app())
    fresh = FakeOpenAI()
    fresh_up = await aiohttp_server(fresh.app())
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({"models": [
        {"backend_provider": "custom", "url": upstream_url(slow_up), "model": {"name": "a"}},
        {"backend_provider": "mock", "model": {"name": "b"}},
    ]}))
    client = await aiohttp_client(create_app(load_config(path), config_path=str(path)))
    old = client.app[RUNTIME].served
    stream = await client.post("/v1/chat/completions", json=chat("a", stream=True))
    first = await stream.content.readline()
    path.write_text(yaml.safe_dump({"models": [
        {"backend_provider": "custom", "url": upstream_url(fresh_up), "model": {"name": "a"}},
        {"backend_provider": "mock", "model": {"name": "c"}},
    ]}))
    reloader = client.app[RELOADER]
    assert await reloader.reload()
    assert client.app[RUNTIME].served is not old
    assert (await client.post("/v1/chat/completions", json=chat("a"))).status == 200
    assert len(answered(fresh)) == 1
    assert (await client.post("/v1/chat/completions", json=chat("b"))).status == 404
    assert (await client.post("/v1/chat/completions", json=chat("c"))).status == 200
    events = sse_events(first + await stream.read())
    assert len(events) == 9 and events[-1] == "[DONE]"  # the old upstream finished it
    assert slow.attempts == 1
    for _ in range(40):
        if not reloader.retired:
            break
        await asyncio.sleep(0.05)
    assert reloader.retired == []


async def test_failover_passes_over_a_down_and_a_slow_upstream(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    slow = Faulty(plan=["no_first_byte"])
    slow_up = await aiohttp_server(slow.app())
    good = FakeOpenAI()
    good_up = await aiohttp_server(good.app())
    down = f"http://127.0.0.1:{free_port()}"
    client = await start_proxy({
        "backend_provider": "custom",
        "url": [down, upstream_url(slow_up), upstream_url(good_up)],
        "timeouts": {"first_byte": 0.3},
        "retries": {"attempts": 1},
        "circuit": {"cooldown": 30},
    })
    resp = await client.post("/v1/chat/completions", json=chat("m"))
    assert resp.status == 200, await resp.text()
    assert slow.attempts == 1 and len(answered(good)) == 1
    # both failed upstreams cool down: the next requests go straight to the good one
    for stream in (False, True, False):
        resp = await client.post("/v1/chat/completions", json=chat("m", stream))
        assert resp.status == 200
        await resp.read()
    assert slow.attempts == 1 and len(answered(good)) == 4
    lines = await metric_lines(client, "model_proxy_upstream_attempts_total")
    counts = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert counts == {
        'model="any",outcome="failed",upstream="0"': 1.0,
        'model="any",outcome="failed",upstream="1"': 1.0,
        'model="any",outcome="ok",upstream="2"': 4.0,
    }


async def test_a_5xx_moves_on_and_the_last_upstream_answer_is_relayed(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    first, second = Faulty(plan=[(500, {})]), Faulty(plan=[(502, {})])
    ups = [await aiohttp_server(f.app()) for f in (first, second)]
    client = await start_proxy({
        "backend_provider": "custom", "url": [upstream_url(u) for u in ups],
        "retries": {"attempts": 1},
    })
    resp = await client.post("/v1/chat/completions", json=chat("m"))
    assert resp.status == 502  # each tried once; the last one's answer goes back
    assert first.attempts == 1 and second.attempts == 1


async def test_round_robin_and_least_busy_spread_the_load(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fakes = [FakeOpenAI() for _ in range(3)]
    ups = [await aiohttp_server(f.app()) for f in fakes]
    urls = [upstream_url(u) for u in ups]
    client = await start_proxy({"backend_provider": "custom", "url": urls})
    for _ in range(6):
        assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200
    assert [len(answered(f)) for f in fakes] == [2, 2, 2]

    slow = Faulty(events=20, event_delay=0.05)
    quick = FakeOpenAI()
    slow_up, quick_up = await aiohttp_server(slow.app()), await aiohttp_server(quick.app())
    client = await start_proxy({"backend_provider": "custom", "routing": "least_busy",
                                "url": [upstream_url(slow_up), upstream_url(quick_up)]})
    stream = await client.post("/v1/chat/completions", json=chat("m", stream=True))
    await stream.content.readline()  # a stream holds the first upstream
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200
    assert len(answered(quick)) == 3 and slow.attempts == 1
    await stream.read()
    backend = client.app[RUNTIME].backend
    assert [u.active for u in backend.upstreams] == [0, 0]  # the stream's place was given back


async def test_readyz_names_the_model_that_cannot_serve(start_proxy: StartProxy) -> None:
    client = await start_proxy({"models": [
        {"backend_provider": "mock", "model": {"name": "fine"}},
        {"backend_provider": "custom", "url": f"http://127.0.0.1:{free_port()}",
         "model": {"name": "gone"}},
    ]})
    resp = await client.get("/readyz")
    assert resp.status == 503
    reason = (await resp.json())["reason"]
    assert reason.startswith("model gone: ") and "fine" not in reason
    assert (await client.post("/v1/chat/completions", json=chat("fine"))).status == 200


async def test_a_model_is_ready_while_one_of_its_upstreams_is(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    good = await aiohttp_server(FakeOpenAI().app())
    down = f"http://127.0.0.1:{free_port()}"
    client = await start_proxy({"backend_provider": "custom", "url": [down, upstream_url(good)]})
    assert (await client.get("/readyz")).status == 200
    ports = {free_port() for _ in range(4)}  # two different closed ports
    assert len(ports) >= 2
    closed = [f"http://127.0.0.1:{port}" for port in sorted(ports)[:2]]
    client = await start_proxy({"backend_provider": "custom", "url": closed})
    assert (await client.get("/readyz")).status == 503
