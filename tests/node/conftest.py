"""A node-mode proxy between a fake scheduler/gateways and a fake chain, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.auth.signing import generate_key_file
from tests.conftest import StartProxy, upstream_url
from tests.fakes.fxn_network import FakeChain, send_request_headers

FIXTURES = Path(__file__).parent / "fixtures"
SCHEDULER_KEY = json.loads((FIXTURES / "scheduler_test_key.json").read_text())["private_key"]
GATEWAY_KEY = json.loads((FIXTURES / "gateway_test_key.json").read_text())["private_key"]
SCHEDULER = json.loads((FIXTURES / "scheduler_test_key.json").read_text())["address"]
GATEWAY = json.loads((FIXTURES / "gateway_test_key.json").read_text())["address"]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

StartNode = Callable[..., Awaitable[TestClient]]


def node_config(key_file: Path, rpc_url: str | None, **node: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "key_file": str(key_file),
        "scheduler_address": SCHEDULER,
        "public_ip": "203.0.113.7",
        **node,
    }
    if rpc_url is not None:
        section["chain"] = {
            "rpc_url": rpc_url,
            "router_address": FakeChain.router,
            "refresh": 0.05,
            "timeout": 2,
        }
    return {"backend_provider": "mock", "node": section}


async def signed(
    client: TestClient, path: str, key: str, payload: Any, **headers: str
) -> tuple[int, Any]:
    body = json.dumps(payload).encode()
    response = await client.post(
        path, data=body, headers={**send_request_headers(key, body), **headers}
    )
    text = await response.text()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "nodekey.json"
    generate_key_file(path)
    return path


@pytest.fixture
def chain() -> FakeChain:
    return FakeChain()


@pytest.fixture
async def chain_server(aiohttp_server: Any, chain: FakeChain) -> TestServer:
    server: TestServer = await aiohttp_server(chain.app())
    return server


@pytest.fixture
def start_node(start_proxy: StartProxy, key_file: Path, chain_server: TestServer) -> StartNode:
    """Start a node-mode proxy on the fake chain (``rpc_url`` overrides it; None: no chain)."""

    async def start(rpc_url: str | None = "chain", **node: Any) -> TestClient:
        url = upstream_url(chain_server) + "/" if rpc_url == "chain" else rpc_url
        config = node_config(key_file, url, **node)
        return await start_proxy(config)

    return start
