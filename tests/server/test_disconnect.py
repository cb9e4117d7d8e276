"""Clients that leave mid-answer, against a real ``serve`` process: each is a 499 with one
access-log line and no traceback, and its upstream request is cancelled."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import free_port, upstream_url, wait_healthy

STREAMS = 50
WHOLE = 10  # non-streamed requests whose client leaves while the upstream works


@dataclass
class Recording:
    """An OpenAI SSE upstream that streams slowly and records how each request ended."""

    started: int = 0
    cancelled: int = 0
    finished: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completion)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def completion(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.started += 1
        self.changed.set()
        try:
            if not payload.get("stream"):
                await asyncio.sleep(30)
                return web.json_response({"choices": []})
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            # a burst (no pause: the proxy writes while the client is leaving), or a trickle
            pause = 0.0 if payload.get("max_tokens") else 0.02
            for i in range(20000 if pause == 0 else 1500):  # 30 s at most
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1,
                         "model": "m", "choices": [{"index": 0, "delta": {"content": f"w{i}"},
                                                    "finish_reason": None}]}
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if pause or i % 100 == 99:
                    await asyncio.sleep(pause)
            await response.write(b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            self.cancelled += 1
            self.changed.set()
            raise
        except ConnectionResetError:  # the proxy closed the connection as we wrote
            self.cancelled += 1
            self.changed.set()
            return response
        self.finished += 1
        return response

    async def until(self, check: Any, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"started {self.started}, cancelled {self.cancelled}"
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass


def request_bytes(port: int, stream: bool, burst: bool) -> bytes:
    payload: dict[str, Any] = {"model": "m", "stream": stream,
                               "messages": [{"role": "user", "content": "hi"}]}
    if burst:
        payload["max_tokens"] = 9
    body = orjson.dumps(payload)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def leave(
    port: int, stream: bool, i: int, upstream: Recording, started: int = 0
) -> None:
    """Send one request, wait until its answer is under way, then go: by a reset or a close,
    while the upstream sends a burst or a trickle (by ``i``)."""
    abort, burst = i % 2 == 0, i % 4 < 2
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes(port, stream, burst))
    if stream:
        head = await asyncio.wait_for(reader.readuntil(b"data: "), 10)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
    else:
        await upstream.until(lambda: upstream.started >= started)
    if abort:  # a reset, as a killed client leaves
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def test_clients_leaving_mid_answer_are_499s(tmp_path: Path, aiohttp_server: Any) -> None:
    upstream = Recording()
    server: TestServer = await aiohttp_server(upstream.app())
    config = tmp_path / "model_backend.yaml"
    config.write_text(f"backend_provider: custom\nurl: {upstream_url(server)}\n")
    port = free_port()
    log = tmp_path / "proxy.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(config), "--port", str(port),
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, proc)
        for batch in range(0, STREAMS, 10):
            await asyncio.gather(*(leave(port, True, i, upstream)
                                   for i in range(batch, batch + 10)))
        for i in range(WHOLE):
            await leave(port, False, i, upstream, STREAMS + i + 1)
        total = STREAMS + WHOLE
        await upstream.until(lambda: upstream.cancelled == total)
        assert (upstream.started, upstream.finished) == (total, 0)
        async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
            metrics = await resp.text()
        statuses = {m[2]: float(m[3]) for m in re.finditer(
            r'model_proxy_requests_total\{endpoint="chat",model="([^"]*)",status="(\d+)"\} (\S+)',
            metrics)}
        assert statuses == {"499": total}, statuses
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    access = [line for line in text.splitlines() if "model_proxy.access" in line]
    chat = [line for line in access if "/v1/chat/completions" in line]
    assert len(chat) == total, access
    assert all(" 499 " in line or '"status":499' in line for line in chat), chat
