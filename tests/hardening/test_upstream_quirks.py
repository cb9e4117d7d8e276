"""Upstreams that misbehave on the wire, and clients that flood the log with bad requests."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from pathlib import Path

from tests.conftest import free_port, wait_healthy
from tests.fakes.raw_upstream import COMPLETION, RawRequest, RawUpstream, response
from tests.hardening.wire import CHAT, exchange, request, rss, write_config
from tests.server.test_run import serving

SECRET = "upstream-credential-7f3k"


def config_for(tmp_path: Path, upstream: RawUpstream, extra: str = "", provider: str = "custom"
               ) -> Path:
    return write_config(tmp_path / "c.yaml",
                        f"backend_provider: {provider}\nurl: {upstream.url}\n{extra}")


async def test_compressed_answer_is_relayed_decodable(tmp_path: Path) -> None:
    async def gzipped(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(200, gzip.compress(COMPLETION),
                              {"Content-Type": "application/json", "Content-Encoding": "gzip"}))
        return True

    upstream = await RawUpstream(gzipped).start()
    try:
        async with serving(config_for(tmp_path, upstream)) as (_, url):
            status, headers, body = await exchange(url, request("POST", "/v1/chat/completions",
                                                                CHAT))
        assert status == 200
        assert headers.get("content-encoding") == "gzip"
        assert gzip.decompress(body) == COMPLETION
        assert upstream.seen[0].headers["accept-encoding"] == "identity"
    finally:
        await upstream.close()


async def test_credentials_quoted_by_an_upstream_error_are_redacted(tmp_path: Path) -> None:
    async def quoting(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        sent = req.headers.get("authorization") or req.headers.get("x-api-key", "")
        body = (b'{"error": {"message": "bad key: ' + sent.encode() + b'", "token": "'
                + SECRET.encode() + b'"}}')
        writer.write(response(400, body, {"Content-Type": "application/json",
                                          "X-Debug": f"got {sent}"}))
        return True

    upstream = await RawUpstream(quoting).start()
    try:
        for provider in ("custom", "ollama"):
            extra = f"api_key: {SECRET}\nretries: {{attempts: 1}}\n"
            async with serving(config_for(tmp_path, upstream, extra, provider)) as (_, url):
                status, headers, body = await exchange(
                    url, request("POST", "/v1/chat/completions", CHAT))
            assert status >= 400, body
            assert SECRET.encode() not in body, (provider, body)
            assert all(SECRET not in value for value in headers.values()), provider
            assert b"[redacted]" in body, (provider, body)
        assert all(any(SECRET in v for v in r.headers.values()) for r in upstream.seen)
    finally:
        await upstream.close()


async def test_stale_keepalive_connection_is_retried_fresh_and_not_a_failure(
    tmp_path: Path,
) -> None:
    served: dict[object, int] = {}

    async def one_per_connection(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        count = served.get(writer, 0)
        served[writer] = count + 1
        if count:  # the upstream had closed this connection: the request is never answered
            return False
        writer.write(response(200, COMPLETION))  # and no "Connection: close": it looks reusable
        return True

    upstream = await RawUpstream(one_per_connection).start()
    extra = "retries: {attempts: 1}\ncircuit: {failures: 1, cooldown: 60}\n"
    try:
        async with serving(config_for(tmp_path, upstream, extra)) as (_, url):
            statuses = []
            for _ in range(15):
                status, _, _ = await exchange(url, request("POST", "/v1/chat/completions", CHAT))
                statuses.append(status)
            status, _, metrics = await exchange(url, request("GET", "/metrics"))
        assert statuses == [200] * 15
        assert b"\nmodel_proxy_circuit_state 0.0\n" in metrics
    finally:
        await upstream.close()


async def test_switching_protocols_from_upstream_is_a_502(tmp_path: Path) -> None:
    async def upgrade(req: RawRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x05hello")
        await asyncio.sleep(30)
        return False

    upstream = await RawUpstream(upgrade).start()
    try:
        extra = "retries: {attempts: 1}\n"
        async with serving(config_for(tmp_path, upstream, extra)) as (_, url):
            for target in ("/v1/chat/completions", "/v1/realtime"):
                status, _, body = await exchange(url, request("POST", target, CHAT), timeout=5)
                assert status == 502, body
                assert b"upstream_upgrade" in body
    finally:
        await upstream.close()


MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n\r\nabcde",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
]


async def test_malformed_requests_log_one_rate_limited_line_each(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.yaml",
                          f"backend_provider: mock\nserver: {{port: {port}}}\n")
    log = tmp_path / "stderr"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        statuses = []
        for i in range(200):
            try:
                status, _, _ = await exchange(url, MALFORMED[i % len(MALFORMED)], timeout=5)
            except (ConnectionError, asyncio.IncompleteReadError):
                status = 0
            statuses.append(status)
        assert 500 not in statuses
        assert statuses[3] == 400  # a body that cannot be decoded is the client's error
    finally:
        proc.terminate()
        await proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text[:3000]
    lines = [line for line in text.splitlines() if "aiohttp.server" in line or "ERROR" in line]
    assert 1 <= len(lines) <= 20, text[:3000]


async def test_compressed_request_body_is_limited_by_its_decompressed_size(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.yaml",
                          f"backend_provider: mock\nserver: {{port: {port}}}\n")
    padded = {**CHAT, "model": "mock-model", "user": "x" * (64 * 1024 * 1024)}
    bomb = gzip.compress(json.dumps(padded).encode(), compresslevel=9)
    assert len(bomb) < 1024 * 1024  # far under limits.max_body_bytes on the wire
    async with serving(config) as (proc, url):
        before = rss(proc.pid)
        status, _, body = await exchange(url, request(
            "POST", "/v1/chat/completions", bomb, {"Content-Encoding": "gzip"}), timeout=30)
        assert status == 413, body[:300]
        assert rss(proc.pid) - before < 24 * 1024 * 1024
