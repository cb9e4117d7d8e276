"""IDENTITY's parts: the node key file, GPU stats, the public IP source; the wire signing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.auth.signing import Signer
from proxy.errors import ProxyError
from proxy.node.identity import NVIDIA_SMI_QUERY, Identity, gpu_stats, parse_nvidia_smi
from tests.conftest import free_port
from tests.fakes.fxn_network import send_request_headers
from tests.node.conftest import FIXTURES, SCHEDULER_KEY

NVIDIA_ROW = {
    "name": "GeForce RTX 3080",
    "driver_version": "470.57.02",
    "vram_total_mb": 10240,
    "vram_used_mb": 1024,
    "vram_free_mb": 9216,
    "utilization_gpu_pct": 90.0,
    "utilization_mem_pct": 50.0,
}


def test_the_nodes_key_fixture_loads_as_the_node_identity() -> None:
    document = json.loads((FIXTURES / "key.json").read_text())
    signer = Signer.from_file(FIXTURES / "key.json")
    assert signer.address == document["address"]
    assert signer.public_key.hex() == document["public_key"]


def test_parse_the_nodes_nvidia_smi_fixture() -> None:
    text = (FIXTURES / "nvidia_smi.txt").read_text()
    assert parse_nvidia_smi(text) == [NVIDIA_ROW]
    assert parse_nvidia_smi(text + "garbage line\n" + text) == [NVIDIA_ROW, NVIDIA_ROW]
    assert parse_nvidia_smi("H200, 570.1, [N/A], 1, 2, 3, 4\n")[0]["vram_total_mb"] == 0
    assert parse_nvidia_smi("") == []


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_gpu_stats_run_nvidia_smi_with_the_nodes_query(tmp_path: Path) -> None:
    args = tmp_path / "args"
    fixture = FIXTURES / "nvidia_smi.txt"
    smi = _script(tmp_path, f'echo "$@" > {args}\ncat {fixture}\n')
    assert await gpu_stats(smi) == [NVIDIA_ROW]
    assert args.read_text().split() == [NVIDIA_SMI_QUERY, "--format=csv,noheader,nounits"]


async def test_gpu_stats_empty_without_nvidia_smi_or_when_it_fails(tmp_path: Path) -> None:
    assert await gpu_stats(str(tmp_path / "absent")) == []
    assert await gpu_stats(_script(tmp_path, "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")) == []


async def test_public_ip_from_a_url_and_its_failures(aiohttp_server: Any) -> None:
    answers = {"/ip": "198.51.100.4\n", "/html": "<html>blocked</html>"}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=answers[request.path])

    app = web.Application()
    app.router.add_get("/{any}", handler)
    server = await aiohttp_server(app)
    signer = Signer.from_file(FIXTURES / "key.json")
    async with aiohttp.ClientSession() as session:
        identity = Identity(signer, str(server.make_url("/ip")))
        assert await identity.ip(session) == "198.51.100.4"
        for url in (str(server.make_url("/html")), f"http://127.0.0.1:{free_port()}/"):
            with pytest.raises(ProxyError) as info:
                await Identity(signer, url).ip(session)
            assert info.value.status == 500
            assert info.value.message.startswith("failed to get the public IP address")
        assert info.value.message.endswith(": Connection refused")  # words, not a class name
        assert await Identity(signer, "2001:db8::1").ip(session) == "2001:db8::1"


def test_our_signer_matches_send_request_byte_for_byte() -> None:
    signer = Signer(SCHEDULER_KEY)
    for body in (b"", b'{"type": "IDENTITY", "payload": {}}', os.urandom(300)):
        ours = signer.headers(body, timestamp="1750000000", nonce="1f2e3d4c5b6a7988")
        theirs = send_request_headers(SCHEDULER_KEY, body, "1750000000", "1f2e3d4c5b6a7988")
        theirs.pop("Content-Type")
        assert ours == theirs
