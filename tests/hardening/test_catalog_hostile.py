"""Model lists from a hostile upstream: ``/v1/models`` and ``/readyz`` still answer, malformed
entries are skipped, the list is bounded, and the refresh task outlives every answer (it
reads the upstream again once it is fixed, and SIGTERM still exits 0)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.server.runtime import RUNTIME
from proxy.wire.models import MAX_MODELS
from tests.conftest import StartProxy, upstream_url
from tests.server.test_run import serving


def deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"x": value}
    return value


HOSTILE_OPENAI = {"object": "list", "data": [
    {"id": "metadata-string", "metadata": "oops"}, {"id": "metadata-list", "metadata": [1]},
    {"id": 7}, {"id": ["x"]}, {"id": None}, "a string", 12, None,
    {"id": "deep", "nested": deep(400)}, {"id": "good-1", "object": "model"}]}


class Answers:
    """An upstream whose answer to each path is set by the test, as raw JSON bytes."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = {path: json.dumps(body).encode() for path, body in answers.items()}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = self.answers.get(request.path)
        if body is None:
            return web.json_response({"error": "not here"}, status=404)
        return web.Response(body=body, content_type="application/json")


async def ids(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(url + "/v1/models") as resp:
        assert resp.status == 200, await resp.text()
        return [m["id"] for m in (await resp.json())["data"]]


async def until(check: Any, seconds: float = 10) -> None:
    """Poll ``check`` until it holds: a bound against a hang, not a measure of speed."""
    async with asyncio.timeout(seconds):
        while not await check():
            await asyncio.sleep(0.05)


async def test_a_hostile_model_list_is_skipped_and_the_refresh_lives_on(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    upstream = Answers({"/v1/models": HOSTILE_OPENAI})
    server: TestServer = await aiohttp_server(upstream.app())
    config = tmp_path / "c.yaml"
    config.write_text(f"backend_provider: custom\nurl: {upstream_url(server)}\n")
    async with serving(config) as (proc, url), aiohttp.ClientSession() as session:
        async def listed(wanted: list[str]) -> bool:
            return await ids(session, url) == wanted

        await until(lambda: listed(["good-1"]))
        async with session.get(url + "/readyz") as resp:
            assert resp.status == 200, await resp.text()
        upstream.answers["/v1/models"] = b'{"data": [{"id": "fixed-2"}]}'
        proc.send_signal(signal.SIGHUP)  # a reload reads the upstream's list again
        await until(lambda: listed(["fixed-2"]))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert "Traceback" not in stderr, stderr
    assert "entries that are not model objects" in stderr


async def catalogued(client: TestClient) -> None:
    runtime = client.app[RUNTIME]

    async def gathered() -> bool:
        return all(id(b) in runtime.catalog.cache for b in runtime.served.backends)

    await until(gathered)


async def test_hostile_ollama_tags_and_show_fail_neither_the_catalog_nor_readiness(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    upstream = Answers({
        "/api/version": {"version": "0.9.0"},
        "/api/tags": {"models": ["llama3.2", 12, None, {"name": 5}, {"model": ["x"]},
                                {"name": "deep", "details": deep(400)},
                                {"name": "llama3.2:latest", "model": "llama3.2:latest"}]},
        "/api/show": {"capabilities": 7, "model_info": "none"},
    })
    server = await aiohttp_server(upstream.app())
    client = await start_proxy({"backend_provider": "ollama", "url": upstream_url(server),
                                "model_name_alias": "llama3.2"})
    await catalogued(client)
    resp = await client.get("/v1/models")
    assert resp.status == 200, await resp.text()
    listed = (await resp.json())["data"]
    assert [m["id"] for m in listed] == ["llama3.2:latest"]
    assert listed[0]["supported_features"] == []
    resp = await client.get("/readyz")
    assert resp.status == 200, await resp.text()


async def test_a_huge_model_list_is_bounded(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    many = {"data": [{"id": f"m-{i}", "object": "model"} for i in range(50_000)]}
    server = await aiohttp_server(Answers({"/v1/models": many}).app())
    client = await start_proxy({"backend_provider": "custom", "url": upstream_url(server)})
    await catalogued(client)
    resp = await client.get("/v1/models")
    assert resp.status == 200
    listed = (await resp.json())["data"]
    assert len(listed) == MAX_MODELS and listed[0]["id"] == "m-0"
