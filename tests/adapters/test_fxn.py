"""The fxn provider against a fake Function Network node that checks signatures on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.adapters.base import Job
from proxy.adapters.fxn import FxnAdapter
from proxy.auth.signing import Signer, generate_key_file
from proxy.config import FxnConfig, build_config, load_config
from proxy.errors import ConfigError
from proxy.server.app import create_app
from tests.conftest import StartProxy, upstream_url
from tests.fakes.fxn_node import FAKE_NODE, FakeNode, create_fake_node

KEY = "0x" + "5c" * 31 + "01"
ADDRESS = Signer(KEY).address
FXN_ID = "fxn-llama-3-8b"
CHAT = {"model": FXN_ID, "messages": [{"role": "user", "content": "hi"}]}


async def node(aiohttp_server: Any, **options: Any) -> tuple[TestServer, FakeNode]:
    app: web.Application = create_fake_node(**options)
    server: TestServer = await aiohttp_server(app)
    return server, app[FAKE_NODE]


def fxn(server: TestServer, **extra: Any) -> dict[str, Any]:
    return {
        "backend_provider": "fxn",
        "url": upstream_url(server),
        "fxn_id": FXN_ID,
        "fxn": {"private_key": KEY},
        **extra,
    }


async def test_requests_are_signed_and_model_is_fxn_id(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    server, fake = await node(aiohttp_server, allowed=[ADDRESS])
    client = await start_proxy(fxn(server, api_key="upstream-key", model={"name": "public"}))
    # The client's own signature headers must not travel on; the proxy signs for itself.
    bogus = {"X-Address": "0x" + "11" * 20, "X-Signature": "00" * 65, "X-Nonce": "client",
             "X-Timestamp": "1", "Authorization": "Bearer client-secret"}
    resp = await client.post(
        "/v1/chat/completions", json={**CHAT, "model": "public"}, headers=bogus
    )
    assert resp.status == 200, await resp.text()
    seen = fake.received[-1]
    assert seen.status == 200 and seen.signer == ADDRESS
    assert json.loads(seen.body) == CHAT  # model rewritten to fxn_id
    assert seen.headers["X-Address"] == ADDRESS and seen.headers["X-Nonce"] != "client"
    assert seen.headers["x-api-key"] == "upstream-key"
    assert "Authorization" not in seen.headers


async def test_streaming_completions_and_embeddings(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    server, fake = await node(aiohttp_server, allowed=[ADDRESS])
    client = await start_proxy(fxn(server))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    resp = await client.post("/v1/completions", json={"model": FXN_ID, "prompt": "once"})
    assert resp.status == 200
    resp = await client.post("/v1/embeddings", json={"model": FXN_ID, "input": ["a", "b"]})
    assert [d["index"] for d in (await resp.json())["data"]] == [0, 1]
    assert [r.status for r in fake.received] == [200, 200, 200]
    assert len({r.headers["X-Nonce"] for r in fake.received}) == 3


async def test_models_list_shows_fxn_id(start_proxy: StartProxy, aiohttp_server: Any) -> None:
    server, _ = await node(aiohttp_server, allowed=[ADDRESS])
    client = await start_proxy(fxn(server))
    entry = (await (await client.get("/v1/models")).json())["data"][0]
    assert entry["id"] == "fxn-llama-3-8b"
    assert entry["metadata"]["fxn_id"] == "fxn-llama-3-8b"
    assert entry["metadata"]["backend_provider"] == "fxn"


async def test_each_attempt_is_signed_afresh(aiohttp_server: Any) -> None:
    """What a retry layer does: send the same job again; the node must not see a replay."""
    server, fake = await node(aiohttp_server, allowed=[ADDRESS], fail_first=2)
    config = build_config(fxn(server))
    assert isinstance(config, FxnConfig)
    body = json.dumps(CHAT).encode()
    job = Job(endpoint="chat", method="POST", path="/v1/chat/completions", body=body,
              model=FXN_ID, upstream_model=FXN_ID, headers={}, request_id="req-1")
    async with aiohttp.ClientSession() as session:
        adapter = FxnAdapter(config, session)
        statuses = []
        for _ in range(3):
            response = await adapter.send(job)
            statuses.append(response.status)
            await response.buffer()
    assert statuses == [503, 503, 200]
    assert [r.status for r in fake.received] == [503, 503, 200]  # all three verified
    assert all(r.signer == ADDRESS for r in fake.received)
    assert len({r.headers["X-Nonce"] for r in fake.received}) == 3
    assert all(r.body == body for r in fake.received)


async def test_node_refusing_the_signer_is_the_nodes_fault_not_the_clients(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    server, fake = await node(aiohttp_server, allowed=["0x" + "22" * 20])
    client = await start_proxy(fxn(server))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_auth_failed"
    assert fake.received[-1].signer is None


async def test_without_a_key_requests_go_unsigned(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    server, fake = await node(aiohttp_server, require_signature=False)
    config = fxn(server)
    del config["fxn"]
    client = await start_proxy(config)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert "X-Signature" not in fake.received[-1].headers


async def test_key_file_from_keygen(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    address = generate_key_file(tmp_path / "fxn.key")
    server, fake = await node(aiohttp_server, allowed=[address])
    path = tmp_path / "model_backend.yaml"
    path.write_text(
        f"backendProvider: fxn\nurl: {upstream_url(server)}\nfxnId: fxn-x\n"
        "fxn:\n  privateKeyFile: fxn.key\n"
    )
    client = await aiohttp_client(create_app(load_config(path)))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "fxn-x"})
    assert resp.status == 200
    assert fake.received[-1].signer == address


@pytest.mark.parametrize(
    "key",
    ["0x" + "5c" * 31, "zz" * 32, "00" * 32, '{"address": "0x00"}'],
    ids=["short", "not-hex", "zero", "json-without-key"],
)
def test_unusable_key_is_a_config_error(tmp_path: Path, key: str) -> None:
    (tmp_path / "fxn.key").write_text(key)
    path = tmp_path / "model_backend.yaml"
    path.write_text("backend_provider: fxn\nurl: http://127.0.0.1:9\nfxn_id: x\n"
                    "fxn: {private_key_file: fxn.key}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert "fxn.private_key" in text
    assert key not in text and "5c5c5c" not in text


async def test_readiness_probe_is_signed(start_proxy: StartProxy, aiohttp_server: Any) -> None:
    server, fake = await node(aiohttp_server, allowed=[ADDRESS])
    client = await start_proxy(fxn(server))
    assert (await client.get("/readyz")).status == 200
    assert fake.received[-1].path == "/v1/models" and fake.received[-1].signer == ADDRESS
    fake.allowed = frozenset({"0x" + "44" * 20})
    other = await start_proxy(fxn(server))  # a fresh app: readiness is cached for a second
    resp = await other.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["reason"] == "the upstream rejected this node's credentials"


async def test_model_name_alias_wins_as_on_the_node(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    server, fake = await node(aiohttp_server, allowed=[ADDRESS])
    client = await start_proxy(fxn(server, model_name_alias="org/quantized-8b"))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200, await resp.text()
    assert json.loads(fake.received[-1].body)["model"] == "org/quantized-8b"
    models = (await (await client.get("/v1/models")).json())["data"]
    assert [m["id"] for m in models] == [FXN_ID]  # the network still sees its model id


@pytest.mark.parametrize(
    ("credentials", "sent"),
    [
        ({"api_key": "k1", "bearer_token": "t1"}, {"x-api-key": "k1"}),
        ({"bearer_token": "t1"}, {"Authorization": "Bearer t1"}),
        ({"api_key": "k1"}, {"x-api-key": "k1"}),
    ],
)
async def test_credentials_follow_the_nodes_rule(
    start_proxy: StartProxy, aiohttp_server: Any, credentials: dict[str, str],
    sent: dict[str, str],
) -> None:
    """x-api-key when there is an api key, else Authorization: Bearer; never both."""
    server, fake = await node(aiohttp_server, allowed=[ADDRESS])
    client = await start_proxy(fxn(server, **credentials))
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    headers = fake.received[-1].headers
    seen = {k: headers[k] for k in ("x-api-key", "Authorization") if k in headers}
    assert seen == sent


async def test_custom_still_sends_both_credentials(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: Any
) -> None:
    client = await start_proxy({"backend_provider": "custom", "url": upstream_url(openai_upstream),
                                "api_key": "k1", "bearer_token": "t1"})
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    headers = fake_openai.seen[-1].headers
    assert headers["x-api-key"] == "k1" and headers["Authorization"] == "Bearer t1"


async def test_answers_name_the_public_model_and_tokens_are_counted(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    server, _fake = await node(aiohttp_server, allowed=[ADDRESS])
    client = await start_proxy(fxn(server, model={"name": "public"}))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "public"})
    assert (await resp.json())["model"] == "public"
    resp = await client.post("/v1/chat/completions",
                             json={**CHAT, "model": "public", "stream": True})
    body = await resp.read()
    assert body.count(b'"model":"public"') == body.count(b'"model":') > 0
    assert FXN_ID.encode() not in body
    metrics = await (await client.get("/metrics")).text()
    assert 'model_proxy_tokens_total{direction="out"} 4.0' in metrics
    # the fake node sends no usage event in streams: counted as missing, not guessed
    assert 'model_proxy_usage_missing_total{endpoint="chat"} 1.0' in metrics
