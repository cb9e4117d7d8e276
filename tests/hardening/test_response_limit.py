"""A huge non-streamed upstream answer is cut off at ``limits.max_response_bytes``: 502, the
connection dropped, and the proxy's memory back where it was."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.fakes.raw_upstream import RawRequest, RawUpstream
from tests.hardening.wire import CHAT, exchange, request, rss, write_config
from tests.server.test_run import serving

HUGE = 96 * 1024 * 1024
PIECE = b"x" * (1024 * 1024)


async def huge(request: RawRequest, writer: asyncio.StreamWriter, *, chunked: bool) -> bool:
    if request.target in ("/v1/models", "/api/version", "/api/tags"):  # probes
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        return True
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {HUGE}"
    writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode())
    try:
        for _ in range(HUGE // len(PIECE)):
            writer.write(b"%x\r\n%s\r\n" % (len(PIECE), PIECE) if chunked else PIECE)
            await writer.drain()
    except ConnectionError:
        return False  # the proxy hung up: what it should do
    writer.write(b"0\r\n\r\n" if chunked else b"")
    return False


@pytest.mark.parametrize(("provider", "path", "chunked"), [
    ("custom", "/v1/chat/completions", False),
    ("custom", "/v1/chat/completions", True),
    ("custom", "/v1/files/big", True),
    ("ollama", "/v1/chat/completions", True),
])
async def test_oversized_answer_is_a_502_and_memory_returns(
    tmp_path: Path, provider: str, path: str, chunked: bool
) -> None:
    async def answer(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        return await huge(req, writer, chunked=chunked)

    upstream = await RawUpstream(answer).start()
    config = write_config(
        tmp_path / "c.yaml",
        f"backend_provider: {provider}\nurl: {upstream.url}\n"
        "limits: {max_response_bytes: 2097152}\nretries: {attempts: 1}\n",
    )
    try:
        async with serving(config) as (proc, url):
            before = rss(proc.pid)
            for _ in range(3):
                raw = request("POST", path, CHAT) if "chat" in path else request("GET", path)
                status, _, body = await exchange(url, raw, timeout=30)
                assert status == 502, body[:200]
                assert b"upstream_response_too_large" in body
            after = rss(proc.pid)
            assert after - before < 24 * 1024 * 1024, (before, after)
    finally:
        await upstream.close()
