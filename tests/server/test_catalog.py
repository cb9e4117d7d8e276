"""The catalog (``/v1/models``, ``/v1/models/{id}``): OpenRouter's fields, facts from the
upstreams (Ollama's ``/api/show``, a vLLM server's ``max_model_len``) under the YAML's,
gathered in the background, live ``warm``/``can_accept``, hidden upstream ids, deprecation."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestClient

from proxy.config import load_config
from proxy.server.app import create_app
from proxy.server.reload import RELOADER
from proxy.server.runtime import RUNTIME
from tests.conftest import StartProxy, free_port, upstream_url
from tests.fakes.faulty_upstream import Faulty
from tests.fakes.ollama import FakeModel, FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI

FIELDS = {"id", "object", "created", "owned_by", "name", "context_length", "max_output_length",
          "supported_sampling_parameters", "supported_features", "input_modalities",
          "output_modalities", "metadata"}
METADATA = {"backend_provider", "fxn_id", "model_type", "warm", "can_accept",
            "deprecation_date"}


async def catalogued(client: TestClient) -> None:
    """Wait (bounded) until the background task has gathered every backend's facts."""
    runtime = client.app[RUNTIME]
    for _ in range(100):
        if all(id(b) in runtime.catalog.cache for b in runtime.served.backends):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the catalog never gathered the upstreams' facts")


async def listing(client: TestClient) -> dict[str, dict[str, Any]]:
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    return {m["id"]: m for m in body["data"]}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_fields_and_facts_from_each_upstream_under_the_yaml(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    ollama = FakeOllama()
    ollama.models["qwen3:8b"] = FakeModel("qwen3:8b", family="qwen3", context_length=40960,
                                          capabilities=("completion", "tools", "thinking",
                                                        "vision"))
    vllm = FakeOpenAI(model_fields={"max_model_len": 32768})
    ollama_up, vllm_up = await aiohttp_server(ollama.app()), await aiohttp_server(vllm.app())
    client = await start_proxy({"models": [
        {"backend_provider": "ollama", "url": upstream_url(ollama_up),
         "model_name_alias": "qwen3:8b", "model": {"name": "qwen", "aliases": ["q"]}},
        {"backend_provider": "vllm", "url": upstream_url(vllm_up),
         "model_name_alias": "upstream-build-7b-q4",
         "model": {"name": "llama", "max_output_length": 4096,
                   "pricing": {"prompt": 0.0000002, "completion": "0.0000004"}}},
        {"backend_provider": "fxn", "url": upstream_url(vllm_up), "fxn_id": "fxn-llama-3",
         "model": {"name": "fx", "context_length": 1000, "supported_features": ["tools"]}},
    ]})
    await catalogued(client)
    models = await listing(client)
    assert list(models) == ["qwen", "llama", "fx"]
    for entry in models.values():
        assert FIELDS <= set(entry), entry
        assert set(entry["metadata"]) == METADATA
        assert entry["object"] == "model" and entry["name"] == entry["id"]
    qwen, llama, fx = models["qwen"], models["llama"], models["fx"]
    assert qwen["context_length"] == 40960  # /api/show's model_info
    assert qwen["supported_features"] == ["json_mode", "logprobs", "reasoning",
                                          "structured_outputs", "tools"]
    assert qwen["input_modalities"] == ["text", "image"]
    assert "top_k" in qwen["supported_sampling_parameters"]
    assert qwen["aliases"] == ["q"]
    assert qwen["metadata"]["backend_provider"] == "ollama"
    assert llama["context_length"] == 32768  # the vLLM server's max_model_len
    assert llama["max_output_length"] == 4096
    assert llama["pricing"] == {"prompt": "0.0000002", "completion": "0.0000004"}
    assert "pricing" not in qwen
    assert fx["context_length"] == 1000 and fx["supported_features"] == ["tools"]  # YAML wins
    assert fx["metadata"]["fxn_id"] == "fxn-llama-3"
    assert all(m["metadata"]["warm"] and m["metadata"]["can_accept"] for m in models.values())

    # /v1/models/{id}, by name and by alias; the alias is the id it answers with
    one = await (await client.get("/v1/models/q")).json()
    assert one["id"] == "q" and one["context_length"] == 40960 and "qwen" in one["aliases"]
    assert (await client.get("/v1/models/llama")).status == 200
    missing = await client.get("/v1/models/upstream-build-7b-q4")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "model_not_found"


async def test_concrete_upstream_ids_never_show_when_a_name_is_set(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    vllm = FakeOpenAI(model_fields={"max_model_len": 2048})
    up = await aiohttp_server(vllm.app())
    named = await start_proxy({"backend_provider": "vllm", "url": upstream_url(up),
                               "model": {"name": "public"}})
    await catalogued(named)
    raw = await (await named.get("/v1/models")).text()
    assert "upstream-build-7b-q4" not in raw
    assert (await listing(named))["public"]["context_length"] == 2048
    # without a public name any name is passed on, so the upstream's own list is the catalog
    unnamed = await start_proxy({"backend_provider": "vllm", "url": upstream_url(up)})
    await catalogued(unnamed)
    entry = (await listing(unnamed))["upstream-build-7b-q4"]
    assert entry["context_length"] == 2048 and entry["metadata"]["backend_provider"] == "vllm"


async def test_facts_are_gathered_in_the_background_not_per_request(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    ollama = FakeOllama()
    up = await aiohttp_server(ollama.app())
    client = await start_proxy({"backend_provider": "ollama", "url": upstream_url(up),
                                "model_name_alias": "llama3.2", "model": {"name": "l"},
                                "ollama": {"options": {"num_ctx": 2048}}})
    await catalogued(client)
    for _ in range(5):
        entry = (await listing(client))["l"]
    assert entry["context_length"] == 2048  # the context it is served with: num_ctx
    assert [r.path for r in ollama.requests].count("/api/show") == 1


async def test_a_deprecated_model_leaves_the_list_and_is_still_served(
    start_proxy: StartProxy,
) -> None:
    yesterday = (datetime.date.today() - datetime.timedelta(days=1)).isoformat()
    later = (datetime.date.today() + datetime.timedelta(days=30)).isoformat()
    client = await start_proxy({"models": [
        {"backend_provider": "mock", "model": {"name": "old", "deprecation_date": yesterday}},
        {"backend_provider": "mock", "model": {"name": "new", "deprecation_date": later}},
    ]})
    models = await listing(client)
    assert list(models) == ["new"]
    assert models["new"]["metadata"]["deprecation_date"] == later
    entry = await (await client.get("/v1/models/old")).json()
    assert entry["metadata"]["deprecation_date"] == yesterday
    assert (await client.post("/v1/chat/completions", json=chat("old"))).status == 200


async def test_warm_and_can_accept_are_live(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    slow = Faulty(events=20, event_delay=0.05)
    up = await aiohttp_server(slow.app())
    client = await start_proxy({
        "limits": {"max_concurrency": 1, "max_queue": 0},
        "circuit": {"failures": 1, "cooldown": 60},
        "retries": {"attempts": 1},
        "models": [
            {"backend_provider": "custom", "url": down, "model": {"name": "gone"}},
            {"backend_provider": "custom", "url": upstream_url(up), "model": {"name": "busy"}},
        ],
    })
    models = await listing(client)
    assert models["gone"]["metadata"]["warm"] is False
    assert models["gone"]["metadata"]["can_accept"] is False
    assert models["busy"]["metadata"]["warm"] and models["busy"]["metadata"]["can_accept"]
    stream = await client.post("/v1/chat/completions",
                               json={**chat("busy"), "stream": True})
    await stream.content.readline()  # it holds the only slot, and the queue has no place
    busy = (await listing(client))["busy"]["metadata"]
    assert busy["warm"] is True and busy["can_accept"] is False
    await stream.read()
    assert (await listing(client))["busy"]["metadata"]["can_accept"] is True
    # an open circuit: not warm, though the upstream may answer its readiness check
    client.app[RUNTIME].served.routes["busy"].breaker.failure()
    busy = (await listing(client))["busy"]["metadata"]
    assert busy["warm"] is False and busy["can_accept"] is False


async def test_a_reload_gathers_the_new_sets_facts(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    small, large = (FakeOpenAI(model_fields={"max_model_len": n}) for n in (1024, 8192))
    small_up, large_up = await aiohttp_server(small.app()), await aiohttp_server(large.app())
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({"backend_provider": "vllm", "url": upstream_url(small_up),
                                    "model": {"name": "m"}}))
    client = await aiohttp_client(create_app(load_config(path), config_path=str(path)))
    await catalogued(client)
    assert (await listing(client))["m"]["context_length"] == 1024
    path.write_text(yaml.safe_dump({"backend_provider": "vllm", "url": upstream_url(large_up),
                                    "model": {"name": "m"}}))
    assert await client.app[RELOADER].reload()
    await catalogued(client)
    assert (await listing(client))["m"]["context_length"] == 8192
