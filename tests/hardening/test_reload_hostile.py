"""Hostile or broken files on SIGHUP: each one log line and an error count, the old config
serving on and never stalled, the next good file applied, and SIGTERM still a clean exit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp

from tests.conftest import free_port, wait_healthy
from tests.hardening.test_config_check import BOMB

BAD = {
    "list key": "? [a, b]\n: 1\n",
    "deep": "model: {aliases: " + "[" * 3000 + "]" * 3000 + "}\n",
    "bomb": BOMB,
    "big": "# padding\n" * 300_000,
    "binary": "backend_provider: mock\nmodel: {name: \x00\x01}\n",
}


async def reload_errors(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(base + "/metrics") as resp:
        text = await resp.text()
    prefix = 'model_proxy_config_reloads_total{result="error"} '
    return next((float(line[len(prefix):]) for line in text.splitlines()
                 if line.startswith(prefix)), 0.0)


async def served_name(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(base + "/v1/models") as resp:
        return str((await resp.json())["data"][0]["id"])


async def test_hostile_reloads_are_counted_and_the_next_good_one_applies(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "c.yaml"
    good = f"backend_provider: mock\nserver: {{port: {port}}}\nmodel: {{name: %s}}\n"
    path.write_text(good % "one")
    log = tmp_path / "stderr"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(base, proc)
            for i, (name, text) in enumerate(BAD.items(), start=1):
                path.write_text(text)
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                slowest = 0.0
                while await reload_errors(session, base) < i:
                    assert time.monotonic() < deadline, f"{name}: no reload error counted"
                    start = time.monotonic()
                    async with session.get(base + "/healthz") as resp:
                        assert resp.status == 200
                    slowest = max(slowest, time.monotonic() - start)
                    await asyncio.sleep(0.05)
                assert slowest < 1.0, f"{name}: the event loop stalled for {slowest:.1f} s"
                assert await served_name(session, base) == "one"
            path.write_text(good % "two")
            proc.send_signal(signal.SIGHUP)
            for _ in range(100):
                if await served_name(session, base) == "two":
                    break
                await asyncio.sleep(0.05)
            assert await served_name(session, base) == "two"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    rejected = [line for line in text.splitlines() if "config reload rejected" in line]
    assert len(rejected) == len(BAD), text[-3000:]
    assert os.path.getsize(log) < 20_000
