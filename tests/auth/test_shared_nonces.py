"""The nonce store replicas share: a real ``redis-server`` and real ``serve`` processes.

A nonce used on one proxy process is refused by a second; with Redis gone, signed requests
are refused with 503 (fail closed) while probes and metrics keep answering; with Redis back,
signed requests pass again. Skipped only where ``redis-server`` is not installed (Debian
package ``redis-server``); CI installs it (.ci/deploy-checks) and sets REDIS_SERVER_REQUIRED,
and then a missing one fails instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from proxy.auth.shared_nonces import KEY_PREFIX
from proxy.config import load_config
from proxy.errors import ConfigError
from tests.conftest import StartProxy, free_port, wait_healthy
from tests.fakes.fxn_node import gateway_headers

GATEWAY_KEY = bytes(31) + b"\x2a"
REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None and not os.environ.get("REDIS_SERVER_REQUIRED"),
    reason="redis-server is not installed (Debian: apt-get install redis-server; bash .ci/run "
           "installs it and runs these)",
)
BODY = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'


def gateway() -> str:
    return str(gateway_headers(GATEWAY_KEY, b"")["X-Address"])


class RedisServer:
    """``redis-server`` on 127.0.0.1, in a temporary directory, started and stopped here."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS_SERVER is not None, "redis-server is required (REDIS_SERVER_REQUIRED)"
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
            str(self.directory), "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--maxmemory-policy", "noeviction",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("redis-server did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def config_text(store: str) -> str:
    return ("backend_provider: mock\nmodel: {name: mock-model}\n"
            f"auth: {{fxn_signatures: {{allowed_addresses: ['{gateway()}'], window: 60, "
            f"nonce_store: '{store}'}}}}\nlogging: {{format: json}}\n")


@asynccontextmanager
async def serving(path: Path) -> AsyncIterator[str]:
    port = free_port()
    log = path.with_suffix(f".{port}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(path), "--port", str(port),
        stdout=log, stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        log.close()


async def post(session: aiohttp.ClientSession, url: str,
               headers: dict[str, str]) -> tuple[int, Any]:
    async with session.post(url + "/v1/chat/completions", data=BODY,
                            headers={**headers, "Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


@needs_redis
async def test_replicas_share_nonces_and_fail_closed_without_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text(config_text(redis_server.url))
    async with serving(path) as first, serving(path) as second, \
            aiohttp.ClientSession() as session:
        signed = gateway_headers(GATEWAY_KEY, BODY, nonce="shared-1")
        assert (await post(session, first, signed))[0] == 200
        status, body = await post(session, second, signed)  # the replay, at another replica
        assert status == 401 and body["error"]["code"] == "replayed"
        fresh = gateway_headers(GATEWAY_KEY, BODY, nonce="shared-2")
        assert (await post(session, second, fresh))[0] == 200

        await redis_server.stop()
        for url in (first, second):
            status, body = await post(
                session, url, gateway_headers(GATEWAY_KEY, BODY, nonce=f"down-{url[-5:]}"))
            assert status == 503, body
            assert body["error"]["code"] == "nonce_store_unavailable"
            assert "nonce store" in body["error"]["message"]
            for probe in ("/healthz", "/metrics"):
                async with session.get(url + probe) as resp:
                    assert resp.status == 200, probe
            async with session.get(url + "/metrics") as resp:
                assert 'status="503"' in await resp.text()

        await redis_server.start()  # empty: what it knew is gone (see docs/deploy.md on restarts)
        for url in (first, second):
            nonce = f"back-{url[-5:]}"
            assert (await post(session, url, gateway_headers(GATEWAY_KEY, BODY, nonce=nonce)))[
                0] == 200
    logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert "Traceback" not in logs
    assert "nonce store is unavailable" in logs and "answers again" in logs
    assert redis_server.url not in logs


@needs_redis
async def test_a_claim_expires_when_the_window_closes(
    start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    client = await start_proxy({
        "backend_provider": "mock", "model": {"name": "mock-model"},
        "auth": {"fxn_signatures": {"allowed_addresses": [gateway()], "window": 60,
                                    "nonce_store": redis_server.url}},
    })
    timestamp = int(time.time()) - 10
    signed = gateway_headers(GATEWAY_KEY, BODY, nonce="ttl-1", timestamp=str(timestamp))
    resp = await client.post("/v1/chat/completions", data=BODY, headers=signed)
    assert resp.status == 200
    resp = await client.post("/v1/chat/completions", data=BODY, headers=signed)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "replayed"
    store = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        keys = [k async for k in store.scan_iter(KEY_PREFIX + "*")]
        assert len(keys) == 1 and keys[0].decode().endswith(":ttl-1")
        expires = await store.expiretime(keys[0])
        assert expires == timestamp + 60 + 1
    finally:
        await store.aclose()


@needs_redis
async def test_without_a_window_a_claim_never_expires(
    start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    client = await start_proxy({
        "backend_provider": "mock",
        "auth": {"fxn_signatures": {"allowed_addresses": [gateway()], "window": 0,
                                    "nonce_store": redis_server.url}},
    })
    signed = gateway_headers(GATEWAY_KEY, BODY, nonce="old-1", timestamp="1000")
    assert (await client.post("/v1/chat/completions", data=BODY, headers=signed)).status == 200
    resp = await client.post("/v1/chat/completions", data=BODY, headers=signed)
    assert resp.status == 401
    store = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        (key,) = [k async for k in store.scan_iter(KEY_PREFIX + "*")]
        assert await store.ttl(key) == -1  # kept: no timestamp check would refuse a replay
    finally:
        await store.aclose()


@needs_redis
async def test_an_unsigned_or_badly_signed_request_claims_nothing(
    start_proxy: StartProxy, redis_server: RedisServer
) -> None:
    client = await start_proxy({
        "backend_provider": "mock",
        "auth": {"fxn_signatures": {"allowed_addresses": [gateway()],
                                    "nonce_store": redis_server.url}},
    })
    forged = gateway_headers(bytes(31) + b"\x2b", BODY, nonce="forged-1")
    forged["X-Address"] = gateway()
    resp = await client.post("/v1/chat/completions", data=BODY, headers=forged)
    assert resp.status == 401
    store = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert [k async for k in store.scan_iter(KEY_PREFIX + "*")] == []
    finally:
        await store.aclose()


@pytest.mark.parametrize("store", ["http://user:secret-pw@host/", "secret-pw"])
def test_a_store_that_is_not_redis_is_one_line_without_the_url(
    tmp_path: Path, store: str
) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text(config_text(store))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert problem.startswith(
        f"{path}: auth.fxn_signatures.nonce_store: must be journal, memory or")
    assert "secret-pw" not in problem


def test_a_journal_is_the_default_store_and_memory_a_choice(tmp_path: Path) -> None:
    path = tmp_path / "model_backend.yaml"
    for store in ("journal", "memory"):
        path.write_text(config_text(store))
        signatures = load_config(path).auth.fxn_signatures
        assert signatures is not None and signatures.redis_url is None
        assert signatures.journaled is (store == "journal")
        assert signatures.state_dir == str(tmp_path)  # beside the config file
