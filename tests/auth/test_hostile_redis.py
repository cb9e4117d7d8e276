"""A nonce store that answers what no Redis would: every such answer is "unavailable" (503
``nonce_store_unavailable``), without a traceback, without buffering what it announces, and
the proxy's probes keep answering meanwhile."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.auth.test_shared_nonces import BODY, GATEWAY_KEY, gateway
from tests.conftest import StartProxy
from tests.fakes.fxn_node import gateway_headers
from tests.fakes.redis_wire import FakeRedis


async def started(fake: FakeRedis) -> AsyncIterator[FakeRedis]:
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def proxy_on(start_proxy: StartProxy, store: str) -> TestClient:
    return await start_proxy({
        "backend_provider": "mock", "model": {"name": "mock-model"},
        "auth": {"fxn_signatures": {"allowed_addresses": [gateway()], "window": 60,
                                    "nonce_store": store}},
    })


async def signed(client: TestClient, nonce: str) -> tuple[int, Any]:
    resp = await client.post("/v1/chat/completions", data=BODY,
                             headers=gateway_headers(GATEWAY_KEY, BODY, nonce=nonce))
    return resp.status, await resp.json()


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("reply", [
    b"$-1\r\n",  # nil to everything
    b":1\r\n",  # an integer to everything
    b"+PONG\r\n",  # PONG to everything, the claim included
    b"*99999999\r\n",  # an array that never ends: refused at its header
    b"$999999999\r\n",  # a bulk string of a gigabyte: likewise
    b"?\r\n",  # not RESP at all
], ids=["nil", "integer", "pong", "endless-array", "huge-bulk", "garbage"])
async def test_an_answer_the_store_does_not_understand_is_a_503(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, reply: bytes
) -> None:
    async for fake in started(FakeRedis(reply)):
        client = await proxy_on(start_proxy, fake.url)
        with caplog.at_level(logging.INFO):
            for nonce in ("hostile-1", "hostile-2"):
                status, body = await signed(client, nonce)
                assert status == 503, body
                assert body["error"]["code"] == "nonce_store_unavailable"
            assert (await client.get("/healthz")).status == 200
        assert fake.commands  # it was asked
        assert_no_traceback(caplog)
        assert fake.url not in caplog.text


async def test_an_array_flooded_forever_is_not_read_into_memory(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    flood = b":1\r\n" * 16384
    async for fake in started(FakeRedis(b"*99999999\r\n", flood=flood, flood_limit=256 << 20)):
        client = await proxy_on(start_proxy, fake.url)
        with caplog.at_level(logging.INFO):
            status, body = await signed(client, "flood-1")
        assert status == 503, body
        # refused at the header: what it sent beyond that stayed in socket buffers, unread
        assert fake.written < 32 << 20
        assert_no_traceback(caplog)


async def test_probes_answer_while_a_claim_waits_on_a_silent_store(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    async for fake in started(FakeRedis(None)):
        client = await proxy_on(start_proxy, fake.url)
        with caplog.at_level(logging.INFO):
            claim = asyncio.ensure_future(signed(client, "silent-1"))
            while not fake.commands:  # the claim (its health check first) has reached the store
                await asyncio.sleep(0)
                assert not claim.done(), claim.result()
            for probe in ("/healthz", "/metrics"):
                assert (await client.get(probe)).status == 200
            assert not claim.done()
            fake.reply = b"$-1\r\n"
            await fake.close()  # its connections end: the claim fails at once, not at a timer
            status, body = await claim
        assert status == 503, body
        assert body["error"]["code"] == "nonce_store_unavailable"
        assert_no_traceback(caplog)
