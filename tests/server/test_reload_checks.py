"""A reload passes the checks ``serve`` runs at start-up, and a watched file is read only once
it has stopped changing: neither a refused config nor a half-written file is ever applied."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.server.reload import RELOADER
from proxy.server.runtime import RUNTIME
from tests.server.test_reload import chat, reloads, start, write

KEY = "reload-checks-key"
AUTHED = {"Authorization": f"Bearer {KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def status(client: TestClient, model: str, headers: dict[str, str] | None = None) -> int:
    resp = await client.post("/v1/chat/completions", json=chat(model), headers=headers or {})
    return resp.status


async def test_a_reload_refuses_what_serve_refuses(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model_backend.yaml"
    exposed = {"backend_provider": "mock", "model": {"name": "one"},
               "server": {"host": "0.0.0.0"}}
    write(path, {**exposed, "auth": {"api_keys": [KEY]}})
    client = await start(aiohttp_client, path)
    assert await status(client, "one") == 401

    write(path, {**exposed, "model": {"name": "two"}})  # auth dropped on a public address
    with caplog.at_level(logging.WARNING, logger="model_proxy"):
        assert not await client.app[RELOADER].reload()
    (line,) = [r.getMessage() for r in caplog.records if "reload rejected" in r.getMessage()]
    assert f"{path}: server.host: 0.0.0.0 is reachable from other machines" in line
    assert await status(client, "one") == 401
    assert await status(client, "two", AUTHED) == 404  # nothing of it applied
    assert await reloads(client, "error") == 1

    # what serve accepts with a warning, a reload accepts with the same warning
    write(path, {**exposed, "model": {"name": "two"}, "auth": {"allow_unauthenticated": True}})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model_proxy"):
        assert await client.app[RELOADER].reload()
    assert any("SERVING WITHOUT AUTHENTICATION on 0.0.0.0" in r.getMessage()
               for r in caplog.records)
    assert await status(client, "two") == 200


async def test_a_watched_file_is_applied_only_once_it_stops_changing(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "model_backend.yaml"
    whole = {"backend_provider": "mock", "watch": True, "model": {"name": "one"},
             "auth": {"api_keys": [KEY]}}
    write(path, whole)
    client = await start(aiohttp_client, path)
    reloader = client.app[RELOADER]
    reloader.clock = clock = Clock()
    reloader.settle = 1.0

    # caught while being written: the auth section is not there yet
    write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "two"}})
    assert not await reloader.poll()
    assert await status(client, "one") == 401
    clock.now += 0.5
    assert not await reloader.poll()  # not yet settled
    assert await status(client, "two") == 401

    write(path, {**whole, "model": {"name": "two"}})  # the write completes
    clock.now += 0.9
    assert not await reloader.poll()  # changed since the last look: it starts to settle again
    assert await status(client, "two") == 401
    clock.now += 1.0
    assert await reloader.poll()
    assert client.app[RUNTIME].config.public_name == "two"
    assert await status(client, "two") == 401
    assert await status(client, "two", AUTHED) == 200
    assert not await reloader.poll()  # nothing changed since
    assert await reloads(client, "error") == 0


async def test_a_half_written_file_is_never_even_read(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "one"}})
    client = await start(aiohttp_client, path)
    reloader = client.app[RELOADER]
    reloader.clock = clock = Clock()
    for part in ("backend_provider: mock\nwatch: true\nmodel: {na",
                 "backend_provider: mock\nwatch: true\nmodel: {name: tw"):
        path.write_text(part)
        assert not await reloader.poll()
        clock.now += 0.5
    # renamed over the old file: the atomic way, applied once it has settled
    new = tmp_path / "model_backend.yaml.new"
    new.write_text("backend_provider: mock\nwatch: true\nmodel: {name: two}\n")
    new.rename(path)
    assert not await reloader.poll()
    clock.now += reloader.settle
    assert await reloader.poll()
    assert await status(client, "two") == 200
    assert await reloads(client, "error") == 0  # the partial files were never parsed
