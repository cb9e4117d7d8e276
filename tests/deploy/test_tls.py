"""deploy/tls/nginx.conf: Debian's nginx with that very file terminates TLS for a real proxy.

The file's own lines, with only its paths and addresses moved to this test's (certificate,
the proxy's address, the listening port), in a minimal nginx main config; a self-signed
certificate made with openssl; the proxy a real ``model-proxy serve`` process in front of a
scripted upstream. Over HTTPS: the bearer key is checked, and a stream's first event arrives
while the upstream still holds the rest (``proxy_buffering off``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.conftest import free_port, upstream_url, wait_healthy
from tests.deploy.files import DEPLOY
from tests.deploy.processes import running

NGINX_CONF = DEPLOY / "tls" / "nginx.conf"
API_KEY = "tls-test-key"
#: set by .ci/run after .ci/deploy-checks: a missing nginx fails instead of skipping
REQUIRED = os.environ.get("DEPLOY_TOOLS_REQUIRED") == "1"
#: what the file says, and what this test puts in its place
SUBSTITUTIONS = {
    "/etc/nginx/tls/": "{tls}/",
    "server proxy:8080;": "server {proxy};",
    "listen 8443 ssl;": "listen 127.0.0.1:{port} ssl;",
}

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not REQUIRED and not (shutil.which("nginx") and shutil.which("openssl")),
                       reason="nginx or openssl not installed (apt-get install nginx-light)"),
]


def self_signed(folder: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt"),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)


def nginx_config(tmp: Path, proxy: str, port: int) -> Path:
    server = NGINX_CONF.read_text()
    for shipped, ours in SUBSTITUTIONS.items():
        assert shipped in server, f"{NGINX_CONF}: {shipped!r} not found"
        server = server.replace(shipped, ours.format(tls=tmp, proxy=proxy, port=port))
    (tmp / "server.conf").write_text(server)
    main = tmp / "nginx.conf"
    # a main config of this test's own: pid, logs and temporary files in tmp
    main.write_text(f"""
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    include {tmp}/server.conf;
}}
""")
    return main


class GatedUpstream:
    """Streams one event, then waits for ``release`` before the rest."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completion)
        return app

    async def completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({
                "id": "g", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "fine"}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
        await self.release.wait()
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def until_listening(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    for _ in range(200):
        assert proc.returncode is None, f"nginx exited: {log.read_text()[-2000:]}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nginx never listened: {log.read_text()[-2000:]}")


async def test_https_through_nginx(tmp_path: Path, aiohttp_server: Any) -> None:
    gated = GatedUpstream()
    upstream = await aiohttp_server(gated.app())
    config = tmp_path / "model_backend.yaml"
    config.write_text(yaml.safe_dump({
        "backend_provider": "custom", "url": upstream_url(upstream), "model": {"name": "g"},
        "auth": {"api_keys": [API_KEY]},
        # a buffering nginx holds the stream until the proxy gives up on the gated upstream:
        # then the test fails after this many seconds rather than the default 60
        "timeouts": {"idle": 10}}))
    self_signed(tmp_path)
    proxy_port, tls_port = free_port(), free_port()
    main = nginx_config(tmp_path, f"127.0.0.1:{proxy_port}", tls_port)
    checked = subprocess.run(["nginx", "-t", "-q", "-c", str(main), "-e", str(tmp_path / "e")],
                             capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr
    trust = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))
    url = f"https://localhost:{tls_port}/v1/chat/completions"
    chat = {"model": "g", "messages": [{"role": "user", "content": "hi"}]}
    good = {"Authorization": f"Bearer {API_KEY}"}

    async with running(tmp_path / "proxy.log", sys.executable, "-m", "proxy", "serve",
                       "-c", str(config), "--port", str(proxy_port)) as proxy, \
            running(tmp_path / "nginx.log", "nginx", "-c", str(main),
                    "-e", str(tmp_path / "error.log")) as nginx:
        await wait_healthy(f"http://127.0.0.1:{proxy_port}", proxy)
        await until_listening(tls_port, nginx, tmp_path / "error.log")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
            async with session.post(url, json=chat) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["type"]
            async with session.post(url, json=chat, headers=good) as resp:
                assert resp.status == 200
                assert (await resp.json())["choices"][0]["message"]["content"] == "fine"
            async with session.post(url, json={**chat, "stream": True}, headers=good) as resp:
                assert resp.status == 200
                # the upstream holds the rest until this first event got through nginx
                first = await resp.content.readline()
                assert first.startswith(b"data: ") and b'"a"' in first, first
                gated.release.set()
                rest = await resp.content.read()
            assert b'"b"' in rest and rest.rstrip().endswith(b"data: [DONE]"), rest
        # plain HTTP on the TLS port is refused: nothing is served in clear text
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{tls_port}/v1/models",
                                   headers=good) as resp:
                assert resp.status == 400
