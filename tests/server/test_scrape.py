"""Several vLLM (or Ollama) servers behind one model, from the outside: the proxy reads each
one's ``/metrics`` on its clock and routes by prefix, by session, by what each serves and by
how busy each says it is. The fake servers speak vLLM's metric names and change on demand."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from proxy.config import BalanceSection, load_config
from proxy.server.app import create_app
from proxy.server.reload import RELOADER
from proxy.server.runtime import RUNTIME
from proxy.server.scrape import SCRAPER
from tests.conftest import StartProxy, upstream_url
from tests.fakes.clock import FakeClock
from tests.fakes.ollama import FakeOllama
from tests.fakes.vllm_server import FakeVllm

INTERVAL = BalanceSection().interval


async def scrape(client: TestClient, clock: FakeClock) -> None:
    """Move the clock one interval on and wait for the scraper's round to end."""
    scraper = client.app[SCRAPER]
    for _ in range(1000):  # until the scraper sleeps on the clock
        if clock.sleeping:
            break
        await asyncio.sleep(0)
    assert clock.sleeping, "the scraper does not wait on the clock"
    rounds = scraper.rounds
    ended = asyncio.ensure_future(scraper.done.wait())
    clock.advance(INTERVAL)
    await asyncio.wait_for(ended, 10)
    assert scraper.rounds == rounds + 1


def chat(text: str, model: str = "base", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": text}], **extra}


def answered(fake: FakeVllm) -> list[Any]:
    return [s for s in fake.seen if s.path == "/v1/chat/completions"]


async def start_fleet(start_proxy: StartProxy, aiohttp_server: Any, fakes: list[FakeVllm],
                      **config: Any) -> tuple[TestClient, FakeClock]:
    servers = [await aiohttp_server(f.app()) for f in fakes]
    clock = FakeClock()
    client = await start_proxy({"backend_provider": "vllm",
                                "url": [upstream_url(s) for s in servers], **config},
                               clock=clock)
    await scrape(client, clock)
    return client, clock


async def send(client: TestClient, body: dict[str, Any], fakes: list[FakeVllm],
               headers: dict[str, str] | None = None) -> int:
    """Send ``body``; the position of the fake that answered it."""
    before = [len(answered(f)) for f in fakes]
    resp = await client.post("/v1/chat/completions", json=body, headers=headers or {})
    assert resp.status == 200, await resp.text()
    after = [len(answered(f)) for f in fakes]
    (served,) = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a > b]
    return served


async def gauge(client: TestClient, name: str, upstream: int,
                model: str = "any") -> float | None:
    text = await (await client.get("/metrics")).text()
    prefix = f'model_proxy_upstream_{name}{{model="{model}",upstream="{upstream}"}} '
    values = [float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)]
    return values[0] if values else None


async def test_a_prefix_stays_on_its_backend_and_a_busy_one_is_avoided(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fakes = [FakeVllm() for _ in range(3)]
    client, clock = await start_fleet(start_proxy, aiohttp_server, fakes, routing="prefix")
    home = await send(client, chat("the same question"), fakes)
    for _ in range(4):
        assert await send(client, chat("the same question"), fakes) == home
    assert len({await send(client, chat(f"question {i}"), fakes) for i in range(30)}) == 3

    fakes[home].waiting = 50  # its queue is over balance.max_waiting
    await scrape(client, clock)
    assert await gauge(client, "requests_waiting", home) == 50
    assert await gauge(client, "load_readable", home) == 1
    away = await send(client, chat("the same question"), fakes)
    assert away != home
    assert await send(client, chat("the same question"), fakes) == away  # the next in order

    fakes[home].waiting = 0
    await scrape(client, clock)
    assert await send(client, chat("the same question"), fakes) == home


async def test_a_dead_metrics_endpoint_falls_back_and_is_logged_once(
    start_proxy: StartProxy, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fakes = [FakeVllm() for _ in range(3)]
    fakes[1].metrics_status = 500
    fakes[2].metrics_body = b"<html>a login page</html>"
    with caplog.at_level(logging.INFO, logger="model_proxy"):
        client, clock = await start_fleet(start_proxy, aiohttp_server, fakes, routing="prefix")
        for _ in range(3):
            await scrape(client, clock)
        for i in range(6):
            await send(client, chat(f"q{i}"), fakes)
        unreadable = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
        assert len(unreadable) == 2, unreadable  # once per URL, not once per round
        assert "url 1 " in unreadable[0] + unreadable[1] and "answered 500" in "".join(unreadable)
        assert "not vLLM's metrics" in "".join(unreadable)
        assert fakes[1].metrics_reads == 4
        assert await gauge(client, "load_readable", 1) == 0
        assert await gauge(client, "requests_waiting", 1) is None

        fakes[1].metrics_status = None
        await scrape(client, clock)
        again = [r.getMessage() for r in caplog.records if "read again" in r.getMessage()]
        assert len(again) == 1 and "url 1 " in again[0]
        assert await gauge(client, "load_readable", 1) == 1


async def test_an_oversized_metrics_page_is_not_read(
    start_proxy: StartProxy, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fakes = [FakeVllm(), FakeVllm()]
    fakes[0].metrics_body = b"vllm:num_requests_waiting 0\n" + b"# padding\n" * 1000
    with caplog.at_level(logging.WARNING, logger="model_proxy"):
        client, _ = await start_fleet(start_proxy, aiohttp_server, fakes, routing="prefix",
                                      balance={"max_bytes": 4096})
    assert any("over 4096 bytes" in r.getMessage() for r in caplog.records)
    assert await gauge(client, "load_readable", 0) == 0
    assert await gauge(client, "load_readable", 1) == 1


async def test_two_proxies_agree_on_the_backend_of_each_prefix(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fakes = [FakeVllm() for _ in range(3)]
    servers = [await aiohttp_server(f.app()) for f in fakes]
    config = {"backend_provider": "vllm", "routing": "prefix",
              "url": [upstream_url(s) for s in servers]}
    clocks = [FakeClock(), FakeClock()]
    # the second proxy lists the URLs in another order: the choice does not depend on it
    proxies = [await start_proxy(config, clock=clocks[0]),
               await start_proxy({**config, "url": list(reversed(config["url"]))},
                                 clock=clocks[1])]
    for proxy, clock in zip(proxies, clocks, strict=True):
        await scrape(proxy, clock)
    prompts = [f"system prompt {i % 40}: question {i}" for i in range(300)]
    chosen = [[await send(p, chat(text), fakes) for text in prompts] for p in proxies]
    same = sum(a == b for a, b in zip(*chosen, strict=True))
    assert same / len(prompts) >= 0.99, same
    assert len(set(chosen[0])) == 3  # and the prefixes spread


async def test_a_session_sticks_and_its_header_stays_here(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fakes = [FakeVllm() for _ in range(3)]
    client, _ = await start_fleet(start_proxy, aiohttp_server, fakes, routing="session")
    headers = {"X-Session-ID": "conversation-a"}
    homes = {await send(client, chat(f"turn {i}"), fakes, headers) for i in range(8)}
    assert len(homes) == 1
    spread = {await send(client, chat("hi"), fakes, {"X-Session-ID": f"c{i}"})
              for i in range(30)}
    assert len(spread) == 3
    users = {await send(client, chat(f"turn {i}", user="alice"), fakes) for i in range(6)}
    assert len(users) == 1
    sent = [name.lower() for f in fakes for s in answered(f) for name in s.headers]
    assert "x-session-id" not in sent


async def test_a_lora_adapter_reaches_only_the_backend_that_serves_it(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fakes = [FakeVllm(), FakeVllm(served=("base", "sql-lora")), FakeVllm()]
    for routing in ("round_robin", "least_busy", "prefix", "session"):
        client, _ = await start_fleet(start_proxy, aiohttp_server, fakes, routing=routing)
        assert await gauge(client, "models_served", 1) == 2
        for i in range(6):
            assert await send(client, chat(f"q{i}", model="sql-lora"), fakes) == 1, routing
    client, _ = await start_fleet(start_proxy, aiohttp_server, fakes, routing="round_robin")
    # a name no URL lists goes to all of them, as before
    assert {await send(client, chat("q", model="other"), fakes) for _ in range(6)} == {0, 1, 2}


async def test_several_vllm_urls_route_by_prefix_unless_told_otherwise(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fakes = [FakeVllm() for _ in range(3)]
    client, _ = await start_fleet(start_proxy, aiohttp_server, fakes)  # no routing: written
    # the same prompt, again and again: one backend (its prefix cache), not each in turn
    assert len({await send(client, chat("the same question"), fakes) for _ in range(6)}) == 1
    assert len({await send(client, chat(f"system prompt {i}: q"), fakes)
                for i in range(30)}) == 3  # and different prompts spread
    client, _ = await start_fleet(start_proxy, aiohttp_server, fakes, routing="round_robin")
    assert {await send(client, chat("the same question"), fakes) for _ in range(6)} == {0, 1, 2}


async def test_failover_and_cool_down_in_prefix_mode(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fakes = [FakeVllm() for _ in range(3)]
    client, clock = await start_fleet(start_proxy, aiohttp_server, fakes, routing="prefix",
                                      retries={"attempts": 1}, circuit={"cooldown": 30})
    home = await send(client, chat("x"), fakes)
    fakes[home].fail_status, fakes[home].fail_times = 503, 1
    before = [len(answered(f)) for f in fakes]
    assert (await client.post("/v1/chat/completions", json=chat("x"))).status == 200
    tried = [i for i, f in enumerate(fakes) if len(answered(f)) > before[i]]
    assert len(tried) == 2 and home in tried  # it failed over at once
    (second,) = set(tried) - {home}
    assert await send(client, chat("x"), fakes) == second  # the failed one cools down
    clock.advance(30)
    assert await send(client, chat("x"), fakes) == home


async def test_the_scraper_follows_a_reload_and_a_single_url_is_never_read(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fakes = [FakeVllm() for _ in range(3)]
    urls = [upstream_url(await aiohttp_server(f.app())) for f in fakes]
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({"backend_provider": "vllm", "url": urls[0],
                                    "routing": "prefix"}))
    clock = FakeClock()
    client = await aiohttp_client(create_app(load_config(path), config_path=str(path),
                                             clock=clock))
    assert (await client.post("/v1/chat/completions", json=chat("q"))).status == 200
    for _ in range(100):
        await asyncio.sleep(0)
    assert clock.sleeping == 0  # one URL: the scraper waits for a reload, not on the clock
    assert fakes[0].metrics_reads == 0

    path.write_text(yaml.safe_dump({"backend_provider": "vllm", "url": urls,
                                    "routing": "prefix"}))
    assert await client.app[RELOADER].reload()
    await scrape(client, clock)
    assert [f.metrics_reads for f in fakes] == [1, 1, 1]
    upstreams = client.app[RUNTIME].backend.upstreams
    assert all(u.signals.readable and u.signals.models == {"base"} for u in upstreams)


async def test_an_ollama_list_reads_what_each_has_loaded(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    fakes = [FakeOllama(), FakeOllama(loaded=())]
    servers = [await aiohttp_server(f.app()) for f in fakes]
    clock = FakeClock()
    client = await start_proxy({"backend_provider": "ollama", "routing": "prefix",
                                "model_name_alias": "llama3.2:latest",
                                "url": [upstream_url(s) for s in servers]}, clock=clock)
    await scrape(client, clock)
    assert await gauge(client, "models_loaded", 0, "llama3.2:latest") == 1
    assert await gauge(client, "models_loaded", 1, "llama3.2:latest") == 0
    resp = await client.post("/v1/chat/completions", json=chat("hi", model="m"))
    assert resp.status == 200, await resp.text()
