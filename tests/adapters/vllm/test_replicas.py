"""Two real ``vllm serve`` replicas behind the proxy in ``routing: prefix``: the scraper reads
their real metrics, a prefix stays on one replica (whose own prefix cache then hits), two
proxies agree, and a model name only one replica serves reaches only it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from bench import replicas
from bench.fleet import answered_by, counters
from tests.adapters.vllm.conftest import PUBLIC, SLOW, Served, serve

pytestmark = SLOW

#: A name only the first replica serves (as a LoRA adapter loaded on one replica would be).
ONLY_FIRST = "tiny-first"
#: Long enough to fill several of vLLM's 16-token KV blocks (about 250 tokens).
SYSTEM = "You answer for the node network. " + "cache prefix replica token " * 30


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two replicas, started together, stopped (process groups whole) after this module."""
    names = [["--served-model-name", PUBLIC, ONLY_FIRST], ["--served-model-name", PUBLIC]]
    with replicas.replicas(tiny_model, 2, tmp_path_factory.mktemp("replicas"), names) as up:
        yield [r.url for r in up]


@pytest_asyncio.fixture(loop_scope="session")
async def proxies(fleet: list[str]) -> AsyncIterator[tuple[Served, Served]]:
    """Two proxies in front of them; the second lists the URLs in the other order."""
    config = {"backend_provider": "vllm", "routing": "prefix", "url": fleet}
    first = await serve(config)
    second = await serve({**config, "url": list(reversed(fleet))})
    try:
        yield first, second
    finally:
        await first.runner.cleanup()
        await second.runner.cleanup()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    """Poll ``check`` until true, with a deadline (the scraper and vLLM's counters run on
    their own clocks)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)


async def gauge(session: aiohttp.ClientSession, proxy: str, name: str,
                upstream: int) -> float | None:
    async with session.get(proxy + "/metrics") as resp:
        page = await resp.text()
    prefix = f'model_proxy_upstream_{name}{{model="any",upstream="{upstream}"}} '
    found = [float(line[len(prefix):]) for line in page.splitlines() if line.startswith(prefix)]
    return found[0] if found else None


def chat(question: str, model: str = PUBLIC) -> dict[str, Any]:
    """A later turn of one conversation: its prefix (the system prompt and the first user
    turn, what the proxy keys on) is the same whatever ``question`` is."""
    return {"model": model, "messages": [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": "hello"},
                                         {"role": "assistant", "content": "hello there"},
                                         {"role": "user", "content": question}]}


async def test_prefix_routing_over_two_real_replicas(
        fleet: list[str], proxies: tuple[Served, Served]) -> None:
    first, second = proxies
    async with aiohttp.ClientSession() as session:
        # the scraper reads both replicas' real /metrics and /v1/models
        for position in (0, 1):
            async def readable(p: int = position) -> bool:
                return (await gauge(session, first.url, "load_readable", p) == 1
                        and await gauge(session, first.url, "requests_running", p) is not None
                        and await gauge(session, first.url, "requests_waiting", p) is not None
                        and await gauge(session, first.url, "models_served", p) is not None)
            await until(readable, f"upstream {position}'s metrics read")
        assert await gauge(session, first.url, "models_served", 0) == 2
        assert await gauge(session, first.url, "models_served", 1) == 1

        # one prefix stays on one replica, and that replica's own prefix cache hits
        before = [await counters(session, [url]) for url in fleet]
        homes = {await answered_by(session, first.url, PUBLIC, chat(f"turn {i}"), {})
                 for i in range(4)}
        assert len(homes) == 1, homes
        home = int(homes.pop())
        other = 1 - home

        async def hit() -> bool:
            hits, _ = await counters(session, [fleet[home]])
            return hits > before[home][0]
        await until(hit, "prefix cache hits on the replica the prefix went to")
        assert await counters(session, [fleet[other]]) == before[other]

        # two proxies (the URLs in another order) agree on the replica of each prefix
        chosen: list[list[str]] = [[], []]
        for i in range(16):
            body = {"model": PUBLIC, "messages": [
                {"role": "system", "content": f"prompt {i}: " + SYSTEM},
                {"role": "user", "content": "hello"}]}
            chosen[0].append(fleet[int(await answered_by(session, first.url, PUBLIC, body, {}))])
            chosen[1].append(
                fleet[::-1][int(await answered_by(session, second.url, PUBLIC, body, {}))])
        assert chosen[0] == chosen[1]
        assert set(chosen[0]) == set(fleet)  # and the prefixes spread over both

        # a name only the first replica serves reaches only it, whatever its prefix says
        for i in range(6):
            body = chat(f"only {i}", model=ONLY_FIRST)
            assert await answered_by(session, first.url, ONLY_FIRST, body, {}) == "0"
            assert await answered_by(session, second.url, ONLY_FIRST, body, {}) == "1"
