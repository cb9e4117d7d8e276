"""A reload passes the checks ``serve`` runs at start-up, and a watched file is read only once
it is whole: replaced by a rename (applied at the look that sees it) or, rewritten in place,
unchanged a ``SETTLE`` later. Neither a refused config nor a half-written file is applied.

The watcher runs on a clock the test moves (``elapse``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.config import load_config
from proxy.server import reload as reload_module
from proxy.server.reload import RELOADER, SETTLE, WATCH_INTERVAL
from proxy.server.runtime import RUNTIME
from tests.fakes.clock import FakeClock
from tests.server.test_reload import chat, elapse, reloads, start, write

KEY = "reload-checks-key"
AUTHED = {"Authorization": f"Bearer {KEY}"}


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


async def test_a_file_rewritten_in_place_is_applied_only_once_it_stops_changing(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "model_backend.yaml"
    whole = {"backend_provider": "mock", "watch": True, "model": {"name": "one"},
             "auth": {"api_keys": [KEY]}}
    write(path, whole)
    client = await start(aiohttp_client, path, clock := FakeClock())
    reloader = client.app[RELOADER]

    # caught while being written: the auth section is not there yet
    write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "two"}})
    assert await elapse(reloader, clock, WATCH_INTERVAL) == 1
    assert await status(client, "one") == 401
    assert await status(client, "two") == 401
    assert await status(client, "two", AUTHED) == 404  # seen, not read: left to settle

    write(path, {**whole, "model": {"name": "two"}})  # the write completes before the next look
    assert await elapse(reloader, clock, SETTLE) == 1
    assert await status(client, "two") == 401
    assert await status(client, "two", AUTHED) == 404  # changed since the last look: settling
    assert await elapse(reloader, clock, SETTLE) == 1
    assert client.app[RUNTIME].config.public_name == "two"
    assert await status(client, "two") == 401
    assert await status(client, "two", AUTHED) == 200
    assert await elapse(reloader, clock, 10 * WATCH_INTERVAL) == 10  # nothing changed since
    assert await reloads(client, "ok") == 1
    assert await reloads(client, "error") == 0
    # the watcher's waits: one interval to see the change, one settle per look that found it
    # moving or still to settle, then intervals again
    assert clock.slept[:3] == [WATCH_INTERVAL, SETTLE, SETTLE]
    assert set(clock.slept[3:]) == {WATCH_INTERVAL}


async def test_a_half_written_file_is_never_even_read(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "one"}})
    client = await start(aiohttp_client, path, clock := FakeClock())
    reloader = client.app[RELOADER]
    for part, wait in (("backend_provider: mock\nwatch: true\nmodel: {na", WATCH_INTERVAL),
                       ("backend_provider: mock\nwatch: true\nmodel: {name: tw", SETTLE)):
        path.write_text(part)
        assert await elapse(reloader, clock, wait) == 1
    # renamed over the old file: the atomic way, applied at the first look that sees it
    new = tmp_path / "model_backend.yaml.new"
    new.write_text("backend_provider: mock\nwatch: true\nmodel: {name: two}\n")
    new.rename(path)
    assert await elapse(reloader, clock, SETTLE) == 1
    assert await status(client, "two") == 200
    assert await reloads(client, "error") == 0  # the partial files were never parsed


async def test_a_file_renamed_over_the_old_one_applies_at_the_next_look(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "one"}})
    client = await start(aiohttp_client, path, clock := FakeClock())
    reloader = client.app[RELOADER]
    assert await elapse(reloader, clock, WATCH_INTERVAL) == 1
    new = tmp_path / "model_backend.yaml.new"
    write(new, {"backend_provider": "mock", "watch": True, "model": {"name": "two"}})
    new.rename(path)
    assert await elapse(reloader, clock, WATCH_INTERVAL) == 1
    assert await status(client, "two") == 200
    assert await status(client, "one") == 404
    assert set(clock.slept) == {WATCH_INTERVAL}  # no second look was needed


async def test_a_file_written_to_while_it_was_read_is_not_applied(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model_backend.yaml"
    write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "one"}})
    client = await start(aiohttp_client, path, clock := FakeClock())
    reloader = client.app[RELOADER]

    def read_while_written(name: str) -> Any:
        # another writer rewrites the file in place while the reloader reads it
        config = load_config(name)
        write(path, {"backend_provider": "mock", "watch": True, "model": {"name": "three"}})
        monkeypatch.setattr(reload_module, "load_config", load_config)  # once
        return config

    monkeypatch.setattr(reload_module, "load_config", read_while_written)
    new = tmp_path / "model_backend.yaml.new"
    write(new, {"backend_provider": "mock", "watch": True, "model": {"name": "two"}})
    new.rename(path)
    assert await elapse(reloader, clock, WATCH_INTERVAL) >= 1
    assert await status(client, "one") == 200  # what was read is not applied
    assert await status(client, "two") == 404
    assert await elapse(reloader, clock, SETTLE) == 1  # read again once unchanged
    assert await status(client, "three") == 200
    assert await reloads(client, "ok") == 1
    assert await reloads(client, "error") == 0
