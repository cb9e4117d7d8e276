"""Planted secrets: after every error path has run, no log line, error body, header, metric,
``check`` output or exception text holds any of them."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.auth.signing import Signer
from proxy.cli import main
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.server.app import create_app
from tests.conftest import upstream_url
from tests.fakes.fxn_node import FAKE_NODE, create_fake_node, gateway_headers

PRIVATE_KEY = "7e57ab1e" * 8
UPSTREAM_KEY = "PLANTED-upstream-key-7f3a91"
BEARER = "PLANTED-bearer-token-19c2e4"
INBOUND_KEY = "PLANTED-inbound-key-55aa03"
URL_PASSWORD = "PLANTEDurlpass0d9e"
GATEWAY_KEY = bytes(31) + b"\x0d"
SECRETS = [PRIVATE_KEY, PRIVATE_KEY.upper(), UPSTREAM_KEY, BEARER, INBOUND_KEY, URL_PASSWORD]
CHAT = b'{"model":"fxn-planted","messages":[{"role":"user","content":"hi"}]}'


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, url: str, *, name: str = "model_backend.yaml",
                 first_byte: float = 5.0) -> Path:
    (tmp_path / "fxn.key").write_text(f'{{"private_key": "{PRIVATE_KEY}"}}\n')
    (tmp_path / "inbound.keys").write_text(f"# rotated monthly\n{INBOUND_KEY}\n")
    path = tmp_path / name
    gateway = Signer(GATEWAY_KEY).address
    path.write_text(
        "backend_provider: fxn\n"
        f"url: {url}\n"
        "fxn_id: fxn-planted\n"
        "api_key: ${UPSTREAM_KEY}\n"
        f"bearer_token: {BEARER}\n"
        f"timeouts: {{first_byte: {first_byte}}}\n"
        "fxn: {private_key_file: fxn.key}\n"
        "limits: {max_body_bytes: 4096, max_header_bytes: 2048}\n"
        "auth:\n"
        "  api_keys_file: inbound.keys\n"
        f"  fxn_signatures: {{allowed_addresses: ['{gateway}']}}\n"
    )
    return path


class Transcript:
    """Everything the proxy said to anyone, as one text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    async def call(self, client: TestClient[Any, Any], method: str, path: str,
                   body: bytes = b"", headers: dict[str, str] | None = None) -> int:
        resp = await client.request(method, path, data=body, headers=headers or {})
        self.parts.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")
        return resp.status


async def exercise(client: TestClient[Any, Any], out: Transcript) -> list[int]:
    key = {"x-api-key": INBOUND_KEY}
    statuses = [
        await out.call(client, "POST", "/v1/chat/completions", CHAT),
        await out.call(client, "POST", "/v1/chat/completions", CHAT, {"x-api-key": "wrong"}),
        await out.call(client, "POST", "/v1/chat/completions", CHAT,
                       {"Authorization": f"Bearer {INBOUND_KEY}x"}),
        await out.call(client, "POST", "/v1/chat/completions", CHAT,
                       {**gateway_headers(GATEWAY_KEY, CHAT), "X-Nonce": "other"}),
        await out.call(client, "POST", "/v1/chat/completions", CHAT,
                       gateway_headers(bytes(31) + b"\x0e", CHAT)),
        await out.call(client, "POST", "/v1/chat/completions", CHAT,
                       gateway_headers(GATEWAY_KEY, CHAT, timestamp="1")),
        await out.call(client, "POST", "/v1/chat/completions", b"{", key),
        await out.call(client, "POST", "/v1/chat/completions",
                       b'{"model":"fxn-planted","messages":"x"}', key),
        await out.call(client, "POST", "/v1/chat/completions",
                       CHAT.replace(b"fxn-planted", b"other-model"), key),
        await out.call(client, "POST", "/v1/chat/completions", b"x" * 5000, key),
        await out.call(client, "POST", "/v1/chat/completions", CHAT,
                       {**key, "X-Pad": "p" * 1500, "X-Pad-2": "q" * 600}),
        await out.call(client, "GET", "/v1/chat/completions", b"", key),
        await out.call(client, "GET", "/v1/nope", b"", key),
        await out.call(client, "POST", "/v1/chat/completions", CHAT, key),
        await out.call(client, "POST", "/v1/chat/completions",
                       CHAT.replace(b"}]}", b'}],"stream":true}'), key),
        await out.call(client, "GET", "/v1/models", b"", key),
        await out.call(client, "GET", "/readyz"),
        await out.call(client, "GET", "/healthz"),
    ]
    signed = gateway_headers(GATEWAY_KEY, CHAT, nonce="planted-once")
    statuses.append(await out.call(client, "POST", "/v1/chat/completions", CHAT, signed))
    statuses.append(await out.call(client, "POST", "/v1/chat/completions", CHAT, signed))
    statuses.append(await out.call(client, "GET", "/metrics"))
    return statuses


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"planted secret {secret[:12]}... leaked"


async def test_no_secret_reaches_any_output(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    env = {"UPSTREAM_KEY": UPSTREAM_KEY}
    node_app: web.Application = create_fake_node(allowed=[Signer(PRIVATE_KEY).address])
    node: TestServer = await aiohttp_server(node_app)
    out = Transcript()
    # 1. a working upstream that fails, refuses and stalls by turns
    client = await aiohttp_client(create_app(load_config(write_config(tmp_path, upstream_url(node)),
                                                         env=env)))
    statuses = await exercise(client, out)
    assert {400, 401, 404, 405, 413, 431, 200} <= set(statuses)
    fake = node_app[FAKE_NODE]
    fake.fail_first = 3  # every attempt of the default retry policy fails
    assert await out.call(client, "POST", "/v1/chat/completions", CHAT,
                          {"x-api-key": INBOUND_KEY}) == 503
    fake.allowed = frozenset({"0x" + "33" * 20})
    assert await out.call(client, "POST", "/v1/chat/completions", CHAT,
                          {"x-api-key": INBOUND_KEY}) == 502  # upstream_auth_failed
    fake.allowed, fake.delay = None, 2.0
    slow_config = write_config(tmp_path, upstream_url(node), name="slow.yaml", first_byte=0.2)
    slow = await aiohttp_client(create_app(load_config(slow_config, env=env)))
    assert await out.call(slow, "POST", "/v1/chat/completions", CHAT,
                          {"x-api-key": INBOUND_KEY}) == 504
    # 2. an upstream that is down; and one with a password in its URL, which is refused
    down_url = f"http://127.0.0.1:{closed_port()}"
    down = await aiohttp_client(create_app(load_config(
        write_config(tmp_path, down_url, name="down.yaml"), env=env)))
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, f"http://user:{URL_PASSWORD}@127.0.0.1:9",
                                 name="userinfo.yaml"), env=env)
    assert "must not carry credentials" in str(refused.value)
    texts = [str(refused.value)]
    statuses = await exercise(down, out)
    assert 502 in statuses and 503 in statuses, str(statuses)  # the request; /readyz says why
    # The private key never travels; the upstream credentials go only to the upstream.
    for seen in fake.received:
        assert PRIVATE_KEY not in str(seen.headers) and INBOUND_KEY not in str(seen.headers)
    # 3. exception text and reprs of what holds secrets
    texts += [repr(load_config(slow_config, env=env)), repr(Signer(PRIVATE_KEY))]
    try:
        Signer(PRIVATE_KEY[:-1])
    except ValueError as exc:
        texts.append(f"{exc!r} {exc.__cause__!r} {exc.__context__!r}")
    # 4. `model-proxy check` on the same files, and on broken variants of them
    path = tmp_path / "model_backend.yaml"
    assert main(["check", "-c", str(path)]) == 2  # ${UPSTREAM_KEY} is not set here
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPSTREAM_KEY", UPSTREAM_KEY)
        assert main(["check", "-c", str(path)]) == 0
        (tmp_path / "fxn.key").write_text(PRIVATE_KEY[:-2] + "zz")
        assert main(["check", "-c", str(path)]) == 2
        path.write_text(path.read_text().replace("bearer_token:", "bearer_tokn:"))
        assert main(["check", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert "********" in captured.out
    logged = caplog.text + "".join(
        f"{r.getMessage()} {r.args} {r.exc_text}" for r in caplog.records
    )
    assert caplog.records  # the run did log; an empty log would prove nothing
    assert_clean("\n".join([*out.parts, logged, captured.out, captured.err, *texts]))
    assert (PRIVATE_KEY[:-2] + "zz") not in captured.err
