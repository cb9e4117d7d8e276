"""A restart forgets no nonce of the window: a signed request captured before it is refused as
a replay after it, and a fresh signature made before it is accepted (the nonce journal, the
default store). Memory-only, an explicit choice, refuses whatever was signed before the start.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from proxy.auth.journal import FILE_NAME, JournaledNonces
from tests.auth.test_inbound import GATEWAY, GATEWAY_KEY
from tests.conftest import free_port
from tests.fakes.fxn_node import gateway_headers
from tests.hardening.wire import exchange, request, write_config
from tests.server.test_run import serving

BODY = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})


def signed(nonce: str, timestamp: int | None = None) -> bytes:
    headers = gateway_headers(GATEWAY_KEY, BODY.encode(), nonce=nonce,
                              timestamp=None if timestamp is None else str(timestamp))
    return request("POST", "/v1/chat/completions", BODY.encode(), headers)


def config_text(store: str = "") -> str:
    extra = f", nonce_store: {store}" if store else ""
    return (f"backend_provider: mock\n"
            f'auth: {{fxn_signatures: {{allowed_addresses: ["{GATEWAY}"]{extra}}}}}\n')


async def test_the_journal_remembers_the_window_across_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", config_text())
    async with serving(config) as (_, url):
        captured = signed("captured-1")
        status, _, body = await exchange(url, captured)
        assert status == 200, body
        status, _, body = await exchange(url, captured)
        assert status == 401 and b"replayed" in body
        # signed now, sent only after the restart (and killed, not stopped: no clean close)
        unused = signed("unused-1", int(time.time()))
    assert (tmp_path / FILE_NAME).exists()  # beside the config file
    async with serving(config) as (_, url):
        status, _, body = await exchange(url, captured)
        assert status == 401, body
        assert json.loads(body)["error"]["code"] == "replayed"
        status, _, body = await exchange(url, unused)
        assert status == 200, body
        status, _, body = await exchange(url, unused)
        assert status == 401 and b"replayed" in body


async def test_a_node_journals_its_nonces_with_no_signature_section_written(
    tmp_path: Path,
) -> None:
    """Node mode checks signatures whether or not ``auth.fxn_signatures`` is written; its
    nonces go to the journal all the same (``$MODEL_PROXY_STATE_DIR``, else beside the config),
    so what a restart must not reopen stays shut and what it must not refuse is accepted."""
    (tmp_path / "nodekey.key").write_text("0x" + "5c" * 31 + "01")
    config = write_config(tmp_path / "c.yaml", (
        "backend_provider: mock\n"
        f"node: {{key_file: nodekey.key, scheduler_address: '{GATEWAY}', public_ip: 192.0.2.1}}\n"))
    async with serving(config) as (_, url):
        captured = signed("captured-1")
        status, _, body = await exchange(url, captured)
        assert status == 200, body
        unused = signed("unused-1", int(time.time()))
    assert (tmp_path / FILE_NAME).exists()
    async with serving(config) as (_, url):
        status, _, body = await exchange(url, captured)
        assert status == 401 and json.loads(body)["error"]["code"] == "replayed", body
        status, _, body = await exchange(url, unused)
        assert status == 200, body


async def test_a_signature_made_as_the_node_answers_its_first_probe_is_accepted(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "c.yaml", config_text())
    async with serving(config) as (_, url):
        # signed in the second the process started (serving returns once /healthz answers)
        status, _, body = await exchange(url, signed("first-second", int(time.time()) - 1))
        assert status == 200, body


async def test_memory_only_refuses_what_was_signed_before_the_start(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", config_text("memory"))
    async with serving(config) as (_, url):
        signed_at = int(time.time()) + 1  # after the proxy started
        captured = signed("captured-1", signed_at)
        status, _, body = await exchange(url, captured)
        assert status == 200, body
    while time.time() <= signed_at + 1:  # the restart comes after the signed second
        await asyncio.sleep(0.05)
    async with serving(config) as (_, url):
        status, _, body = await exchange(url, captured)
        assert status == 401, body
        assert b"before_start" in body
        status, _, body = await exchange(url, signed("fresh-1"))
        assert status == 200, body
    assert not (tmp_path / FILE_NAME).exists()


def test_the_journal_forgets_what_the_window_no_longer_accepts(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    journal = JournaledNonces.open(str(tmp_path), 60.0, 100, now=now)
    journal.add(("0xa", "old"), int(now) - 50)
    journal.add(("0xa", "new"), int(now))
    journal.expire(now + 20)  # "old" left the window: gone from memory and from the file
    assert ("0xa", "old") not in journal and ("0xa", "new") in journal
    journal.close()
    again = JournaledNonces.open(str(tmp_path), 60.0, 100, now=now + 20)
    assert len(again) == 1 and ("0xa", "new") in again
    again.close()
    later = JournaledNonces.open(str(tmp_path), 60.0, 100, now=now + 61)  # all gone
    assert len(later) == 0
    later.close()


def test_a_full_journal_keeps_its_horizon_across_a_restart(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    journal = JournaledNonces.open(str(tmp_path), float("inf"), 2, now=now)
    for i in range(3):  # the third forgets the first: the horizon becomes its timestamp
        journal.add(("0xa", f"n{i}"), 1000 + i)
    assert journal.horizon == 1000 and not journal.covers(1000)
    journal.close()
    again = JournaledNonces.open(str(tmp_path), float("inf"), 2, now=now)
    assert again.horizon == 1000 and not again.covers(1000)  # the forgotten stay refused
    assert ("0xa", "n1") in again and ("0xa", "n2") in again
    again.close()


async def test_an_unwritable_state_dir_is_one_line_and_no_start(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = write_config(tmp_path / "c.yaml", config_text().replace(
        "]}}", f'], state_dir: "{blocker}/state"}}}}'))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(config), "--port", str(free_port()),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    lines = [line for line in err.decode().splitlines() if "nonce journal" in line]
    assert len(lines) == 1, err.decode()
    assert "auth.fxn_signatures.state_dir: cannot keep the nonce journal" in lines[0]
    assert "Traceback" not in err.decode()
