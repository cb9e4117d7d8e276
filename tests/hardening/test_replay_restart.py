"""A signed request captured before a restart is not accepted again by the new process."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.auth.test_inbound import GATEWAY, GATEWAY_KEY
from tests.fakes.fxn_node import gateway_headers
from tests.hardening.wire import exchange, request, write_config
from tests.server.test_run import serving

BODY = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]})


async def test_replay_after_restart_is_refused(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        f'backend_provider: mock\nauth: {{fxn_signatures: {{allowed_addresses: ["{GATEWAY}"]}}}}\n',
    )
    async with serving(config) as (_, url):
        signed_at = int(time.time()) + 1  # after the proxy started
        captured = gateway_headers(GATEWAY_KEY, BODY.encode(), timestamp=str(signed_at),
                                   nonce="captured-1")
        raw = request("POST", "/v1/chat/completions", BODY.encode(), captured)
        status, _, body = await exchange(url, raw)
        assert status == 200, body
        status, _, body = await exchange(url, raw)
        assert status == 401 and b"replayed" in body
    while time.time() <= signed_at + 1:  # the restart comes after the signed second
        await asyncio.sleep(0.05)
    async with serving(config) as (_, url):
        status, _, body = await exchange(url, raw)
        assert status == 401, body
        assert b"before_start" in body
        fresh = gateway_headers(GATEWAY_KEY, BODY.encode(), nonce="fresh-1")
        status, _, body = await exchange(url, request("POST", "/v1/chat/completions",
                                                      BODY.encode(), fresh))
        assert status == 200, body
