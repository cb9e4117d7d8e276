"""The example plugin, found through its installed entry point, behind a real proxy."""

from __future__ import annotations

import json
from typing import Any

from proxy.cli import main
from proxy.config import adapter_entry_points, build_config
from proxy.server.app import create_app

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello plugin world"}]}


def test_the_entry_point_is_installed() -> None:
    assert adapter_entry_points().get("echo") == "model_proxy_echo:EchoAdapter", (
        "install the example first: pip install -e examples/plugin"
    )


async def test_the_proxy_serves_it_by_its_entry_point_name(aiohttp_client: Any) -> None:
    config = build_config({"backend_provider": "echo", "options": {"prefix": "> "}})
    client = await aiohttp_client(create_app(config))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "> hello plugin world"
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [json.loads(line[6:]) for line in (await resp.text()).splitlines()
              if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "> hello plugin world"


def test_backends_list_shows_it_as_an_entry_point(capsys: Any, tmp_path: Any) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text("backend_provider: echo\n")
    assert main(["backends", "list", "-c", str(path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("echo"))
    assert "entry point" in row and "model_proxy_echo:EchoAdapter" in row
    assert row.rstrip().endswith("available")
