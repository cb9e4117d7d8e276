"""Secrets that rotate: a ``*_file`` secret (``auth.api_keys_file``, an upstream's
``api_key_file``, ...) is watched as the config file is, through a Kubernetes-style Secret
mount whose ``..data`` link is swapped to a new directory by a rename. A secret file that
becomes empty or unreadable changes nothing: the old value serves, one log line says why.

The watcher runs on a clock the test moves (``elapse``): a revoked key is refused, and the
new one accepted, within one watch interval of that clock (``WATCH_INTERVAL`` to the look
that sees a swapped mount; ``SETTLE`` more for a file rewritten in place).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient

from proxy.server.reload import RELOADER, SETTLE, WATCH_INTERVAL, Reloader
from tests.conftest import free_port, upstream_url, wait_healthy
from tests.fakes.clock import FakeClock
from tests.fakes.openai_upstream import FakeOpenAI
from tests.server.test_reload import ROOT, chat, elapse, reloads, start, write

#: The longest a rotated secret waits before it applies, on the watcher's clock.
ONE_INTERVAL = 1.0


class SecretMount:
    """A directory laid out as the kubelet lays out a Secret volume: each key a link
    ``NAME -> ..data/NAME``, ``..data`` a link to a timestamped directory holding the files,
    an update a new directory and ``..data`` renamed over to it."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.root = root
        root.mkdir()
        self.generation = 0
        self.current = self._lay(files)
        os.symlink(self.current.name, root / "..data")
        for name in files:
            os.symlink(f"..data/{name}", root / name)

    def _lay(self, files: dict[str, str]) -> Path:
        self.generation += 1
        directory = self.root / f"..2026_01_01_00_00_0{self.generation}.{self.generation}"
        directory.mkdir()
        for name, text in files.items():
            (directory / name).write_text(text)
        return directory

    def update(self, files: dict[str, str]) -> None:
        old, self.current = self.current, self._lay(files)
        os.symlink(self.current.name, self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")
        shutil.rmtree(old)


def test_the_watch_interval_is_the_one_documented() -> None:
    assert WATCH_INTERVAL + SETTLE == ONE_INTERVAL
    docs = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert "within one second" in docs


async def status(client: TestClient, key: str) -> int:
    resp = await client.post("/v1/chat/completions", json=chat("m"),
                             headers={"Authorization": f"Bearer {key}"})
    return resp.status


async def watching(aiohttp_client: Any, path: Path, config: dict[str, Any]
                   ) -> tuple[TestClient, Reloader, FakeClock]:
    write(path, {**config, "watch": True})
    client = await start(aiohttp_client, path, clock := FakeClock())
    return client, client.app[RELOADER], clock


async def test_a_rotated_api_key_in_a_secret_mount_applies_without_touching_the_config(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    mount = SecretMount(tmp_path / "secrets", {"api_keys": "old-key\n"})
    path = tmp_path / "model_backend.yaml"
    client, reloader, clock = await watching(aiohttp_client, path, {
        "backend_provider": "mock", "model": {"name": "m"},
        "auth": {"api_keys_file": "secrets/api_keys"}})
    assert await status(client, "old-key") == 200
    assert await elapse(reloader, clock, ONE_INTERVAL) == 1  # nothing changed
    assert await reloads(client, "ok") == 0

    mount.update({"api_keys": "new-key\n"})
    assert await status(client, "new-key") == 401  # not looked at yet
    assert await elapse(reloader, clock, WATCH_INTERVAL) == 1  # the look that sees the swap
    assert await status(client, "old-key") == 401  # revoked
    assert await status(client, "new-key") == 200
    assert await elapse(reloader, clock, 4 * WATCH_INTERVAL) == 4
    assert await reloads(client, "ok") == 1
    assert set(clock.slept) == {WATCH_INTERVAL}  # a swap needs no second look


async def test_a_secret_file_rewritten_in_place_applies_too(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text("old-key\n")
    path = tmp_path / "model_backend.yaml"
    client, reloader, clock = await watching(aiohttp_client, path, {
        "backend_provider": "mock", "model": {"name": "m"},
        "auth": {"api_keys_file": str(keys)}})
    assert await elapse(reloader, clock, WATCH_INTERVAL / 2) == 0
    keys.write_text("new-key\n")
    stamp = keys.stat().st_mtime_ns + 10_000_000  # a new mtime even within one clock tick
    os.utime(keys, ns=(stamp, stamp))
    assert await elapse(reloader, clock, WATCH_INTERVAL / 2) == 1  # seen: left to settle
    assert await status(client, "old-key") == 200
    assert await elapse(reloader, clock, SETTLE) == 1  # unchanged since: read
    assert await status(client, "old-key") == 401
    assert await status(client, "new-key") == 200
    assert clock.slept[:2] == [WATCH_INTERVAL, SETTLE]
    assert await reloads(client, "ok") == 1


async def test_a_secret_rewritten_in_place_applies_within_one_interval_wherever_it_falls(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text("key-0\n")
    path = tmp_path / "model_backend.yaml"
    client, reloader, clock = await watching(aiohttp_client, path, {
        "backend_provider": "mock", "model": {"name": "m"},
        "auth": {"api_keys_file": str(keys)}})
    for n, offset in enumerate((0.0, 0.1, 0.5, WATCH_INTERVAL - 0.01, 0.3), start=1):
        await elapse(reloader, clock, offset)  # the rewrite falls anywhere in an interval
        keys.write_text(f"key-{n}\n")
        stamp = keys.stat().st_mtime_ns + 10_000_000 * n
        os.utime(keys, ns=(stamp, stamp))
        await elapse(reloader, clock, ONE_INTERVAL)
        assert await status(client, f"key-{n - 1}") == 401, offset
        assert await status(client, f"key-{n}") == 200, offset
    assert await reloads(client, "ok") == 5


async def test_a_rotated_upstream_key_is_the_one_sent_next(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    fake = FakeOpenAI()
    upstream = await aiohttp_server(fake.app())
    mount = SecretMount(tmp_path / "secrets", {"upstream": "first-secret"})
    path = tmp_path / "model_backend.yaml"
    client, reloader, clock = await watching(aiohttp_client, path, {
        "backend_provider": "custom", "url": upstream_url(upstream),
        "bearer_token_file": "secrets/upstream"})
    assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200
    mount.update({"upstream": "second-secret"})
    assert await elapse(reloader, clock, WATCH_INTERVAL) == 1
    assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200
    sent = [seen.headers["Authorization"] for seen in fake.seen
            if seen.path == "/v1/chat/completions"]
    assert sent == ["Bearer first-secret", "Bearer second-secret"]


async def test_a_rotated_signing_key_signs_the_next_request(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    from proxy.auth.signing import Signer

    first, second = "0x" + "5c" * 31 + "01", "0x" + "5c" * 31 + "02"
    fake = FakeOpenAI()
    upstream = await aiohttp_server(fake.app())
    mount = SecretMount(tmp_path / "secrets", {"fxn.key": first})
    path = tmp_path / "model_backend.yaml"
    client, reloader, clock = await watching(aiohttp_client, path, {
        "backend_provider": "fxn", "url": upstream_url(upstream), "fxn_id": "m",
        "fxn": {"private_key_file": "secrets/fxn.key"}})
    assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200
    mount.update({"fxn.key": second})
    assert await elapse(reloader, clock, WATCH_INTERVAL) == 1
    assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200
    signers = [seen.headers["X-Address"] for seen in fake.seen
               if seen.path == "/v1/chat/completions"]
    assert signers == [Signer.from_text(first).address, Signer.from_text(second).address]


@pytest.mark.parametrize("broken", ["empty", "gone"])
async def test_an_empty_or_unreadable_secret_keeps_the_old_one_with_one_log_line(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    mount = SecretMount(tmp_path / "secrets", {"api_keys": "old-key\n"})
    path = tmp_path / "model_backend.yaml"
    client, reloader, clock = await watching(aiohttp_client, path, {
        "backend_provider": "mock", "model": {"name": "m"},
        "auth": {"api_keys_file": "secrets/api_keys"}})
    if broken == "empty":
        mount.update({"api_keys": "# all keys revoked by mistake\n"})
    else:  # the directory ..data points to is gone: the link dangles
        shutil.rmtree(mount.current)
    with caplog.at_level(logging.INFO, logger="model_proxy"):
        assert await elapse(reloader, clock, ONE_INTERVAL) >= 1
        assert await elapse(reloader, clock, ONE_INTERVAL) >= 1  # looked at again: no 2nd line
    lines = [r.getMessage() for r in caplog.records if r.name == "model_proxy"]
    assert len(lines) == 1, lines
    assert "reload rejected, still serving the previous config" in lines[0]
    assert "auth.api_keys_file" in lines[0]
    assert ("is empty" if broken == "empty" else "No such file") in lines[0]
    assert "old-key" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)
    assert await status(client, "old-key") == 200
    assert await reloads(client, "error") == 1

    if broken == "gone":
        mount.current.mkdir()
    mount.update({"api_keys": "new-key\n"})  # mended: applied as any rotation
    assert await elapse(reloader, clock, ONE_INTERVAL) >= 1
    assert await status(client, "new-key") == 200
    assert await status(client, "old-key") == 401


async def test_sighup_rereads_a_rotated_secret_in_a_real_process(tmp_path: Path) -> None:
    mount = SecretMount(tmp_path / "secrets", {"api_keys": "old-key\n"})
    port = free_port()
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({
        "backend_provider": "mock", "model": {"name": "m"}, "server": {"port": port},
        "auth": {"api_keys_file": "secrets/api_keys"}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(path), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"

    async def answer(session: aiohttp.ClientSession, key: str) -> int:
        async with session.post(base + "/v1/chat/completions", json=chat("m"),
                                headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status

    try:
        await wait_healthy(base, process)
        async with aiohttp.ClientSession() as session:
            assert await answer(session, "old-key") == 200
            mount.update({"api_keys": "new-key\n"})
            process.send_signal(signal.SIGHUP)
            for _ in range(100):  # until the process has handled the signal
                if await answer(session, "new-key") == 200:
                    break
                await asyncio.sleep(0.05)
            assert await answer(session, "new-key") == 200
            assert await answer(session, "old-key") == 401
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    assert "config reloaded" in log
    assert "old-key" not in log and "new-key" not in log


def test_the_loader_records_the_secret_files_it_read(tmp_path: Path) -> None:
    from proxy.config import load_config

    (tmp_path / "up").write_text("secret")
    (tmp_path / "keys").write_text("k1\n")
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({
        "auth": {"api_keys_file": "keys"},
        "models": [{"backend_provider": "custom", "url": "http://127.0.0.1:1",
                    "model": {"name": "a"}, "api_key_file": "up"}]}))
    assert sorted(load_config(path).secret_files) == [str(tmp_path / "keys"),
                                                      str(tmp_path / "up")]

