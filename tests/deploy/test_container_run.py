"""The image, run with a real container runtime as users run it.

``.ci/container-image`` builds ``model-proxy:VERSION`` with Debian's podman (CI runs it once
per run, before pytest; the test runs whatever image of that tag is there, so rebuild after
a change). Here that image runs as its numeric user with a read-only root, the
config mounted read-only, the inbound keys in a mounted secret and port 8080 published on
loopback; its HEALTHCHECK must pass, a request must reach a scripted upstream on this machine
through it, and ``podman stop`` (SIGTERM) must let a stream in flight finish and exit 0.
The node recipe (``deploy/compose/node``) runs in it as compose runs it: its config as
shipped, the key a read-only secret, the nonce journal on a named volume.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.auth.journal import FILE_NAME
from tests.conftest import free_port
from tests.deploy.dockerfile import parse
from tests.deploy.files import DEPLOY, IMAGE, ROOT, keygen
from tests.deploy.scripted_upstream import ScriptedUpstream
from tests.fakes.fxn_node import gateway_headers

#: runc (crun refuses hybrid cgroups), no systemd here (cgroupfs, events in a file), and
#: limits below this kind of machine's hard ones (above them every start fails in setrlimit).
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
          "--events-backend", "file"]
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
#: slirp4netns lets the container reach this machine's loopback at 10.0.2.2, so the scripted
#: upstream listens on 127.0.0.1 only.
NETWORK = ["--network", "slirp4netns:allow_host_loopback=true"]
HOST_LOOPBACK = "10.0.2.2"
API_KEY = "container-test-key"
#: set by .ci/run after .ci/deploy-checks: a missing image or tool fails instead of skipping
REQUIRED = os.environ.get("DEPLOY_TOOLS_REQUIRED") == "1"


def image_present() -> bool:
    if shutil.which("podman") is None:
        return False
    found = subprocess.run([*PODMAN, "image", "exists", IMAGE], capture_output=True,
                           timeout=60, check=False)
    return found.returncode == 0


pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not REQUIRED and not image_present(),
                       reason=f"no podman image {IMAGE} (as root: .ci/container-image)"),
]


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"model-proxy-test-{uuid.uuid4().hex[:8]}"
    yield name
    podman("rm", "--force", "--time", "0", name)


def write_mounts(tmp: Path, upstream: str) -> tuple[Path, Path]:
    """The config and the secrets folder, readable by the image's user (not root's)."""
    secrets = tmp / "secrets"
    secrets.mkdir()
    (secrets / "api_keys").write_text(f"{API_KEY}\n")
    config = tmp / "model_backend.yaml"
    config.write_text(yaml.safe_dump({
        "backend_provider": "custom", "url": upstream, "model": {"name": "scripted"},
        "auth": {"api_keys_file": "/run/secrets/model-proxy/api_keys"},
        "server": {"shutdown_grace": 20},
    }))
    for path in (secrets, secrets / "api_keys", config):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return config, secrets


@asynccontextmanager
async def stopping(name: str) -> AsyncIterator[asyncio.Task[subprocess.CompletedProcess[str]]]:
    """``podman stop`` running in a thread, so that a stream can be read meanwhile."""
    task = asyncio.create_task(asyncio.to_thread(podman, "stop", "--time", "40", name,
                                                 timeout=60))
    try:
        yield task
    finally:
        await task


async def until_healthy(name: str, start_period: float) -> None:
    """The image's HEALTHCHECK, run by podman (no systemd timer runs it here)."""
    deadline = time.monotonic() + start_period
    while True:
        check = await asyncio.to_thread(podman, "healthcheck", "run", name)
        if check.returncode == 0:
            return
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", f"container {state}: {podman('logs', name).stderr[-2000:]}"
        assert time.monotonic() < deadline, f"HEALTHCHECK kept failing: {check.stderr!r}"
        await asyncio.sleep(0.3)


async def test_the_image_serves_checks_health_and_drains(
        tmp_path: Path, aiohttp_server: Any, container_name: str) -> None:
    assert image_present(), f"no podman image {IMAGE}: run .ci/container-image first"
    # a stream long enough (6 s) that podman stop lands in its middle
    upstream = await aiohttp_server(ScriptedUpstream(chunk_gap=0.3, long_chunks=20).app())
    config, secrets = write_mounts(tmp_path, f"http://{HOST_LOOPBACK}:{upstream.port}")
    final = parse(ROOT / "Dockerfile")[-1]
    port = free_port()
    started = podman(
        "run", "--detach", "--name", container_name, *LIMITS, *NETWORK,
        "--user", str(final.user), "--read-only", "--cap-drop", "ALL",
        "--publish", f"127.0.0.1:{port}:8080",
        "--volume", f"{config}:{final.env['MODEL_BACKEND_CONFIG']}:ro",
        "--volume", f"{secrets}:/run/secrets/model-proxy:ro", IMAGE)
    assert started.returncode == 0, started.stderr
    start_period = float(final.healthcheck_options["start-period"].removesuffix("s"))
    await until_healthy(container_name, start_period)
    health = podman("inspect", "--format", "{{.State.Health.Status}}", container_name)
    assert health.stdout.strip() == "healthy", health

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    good = {"Authorization": f"Bearer {API_KEY}"}
    chat = {"model": "scripted", "messages": [{"role": "user", "content": "ok"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat, headers=good) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        assert body["choices"][0]["message"]["content"] == "fine"
        async with session.post(url, json=chat, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"]

        # SIGTERM while a stream is in flight: the stream ends whole, the process exits 0
        stream = {**chat, "stream": True,
                  "messages": [{"role": "user", "content": "long_stream"}]}
        async with session.post(url, json=stream, headers=good) as resp:
            assert resp.status == 200
            first = await resp.content.readline()
            assert first.startswith(b"data: "), first
            async with stopping(container_name) as stop:
                rest = await resp.content.read()
    stopped = stop.result()
    assert stopped.returncode == 0, stopped.stderr
    events = [json.loads(line[6:]) for line in (first + rest).split(b"\n")
              if line.startswith(b"data: {")]
    assert len(events) == 21 and rest.rstrip().endswith(b"data: [DONE]"), rest[-300:]
    state = podman("inspect", "--format", "{{.State.ExitCode}} {{.State.Status}}",
                   container_name)
    assert state.stdout.split() == ["0", "exited"], state
    logs = podman("logs", container_name).stderr
    assert API_KEY not in logs, logs[-2000:]
    # SIGTERM came while the stream was in flight: its access line (written when a request
    # ends) follows the drain's
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    drain = next(i for i, line in enumerate(lines) if "draining in-flight" in line.get("msg", ""))
    streamed = [i for i, line in enumerate(lines)
                if line.get("path") == "/v1/chat/completions" and line.get("status") == 200]
    assert len(streamed) == 2 and streamed[0] < drain < streamed[1], logs[-2000:]


@pytest.fixture
def volume_name() -> Iterator[str]:
    name = f"model-proxy-test-{uuid.uuid4().hex[:8]}"
    yield name
    podman("volume", "rm", "--force", name)


async def test_the_image_runs_the_node_recipe(
        tmp_path: Path, aiohttp_server: Any, container_name: str, volume_name: str) -> None:
    assert image_present(), f"no podman image {IMAGE}: run .ci/container-image first"
    recipe = DEPLOY / "compose" / "node"
    service = yaml.safe_load((recipe / "docker-compose.yml").read_text())["services"]["proxy"]
    final = parse(ROOT / "Dockerfile")[-1]
    # the key as the recipe has the operator make it: keygen, then owned by the image's user
    key = tmp_path / "nodekey.json"
    keygen(key)
    uid, gid = (int(n) for n in str(final.user).split(":"))
    os.chown(key, uid, gid)
    (secret,) = service["secrets"]
    state = final.env["MODEL_PROXY_STATE_DIR"]
    upstream = await aiohttp_server(ScriptedUpstream().app())
    env = {"FXN_ID": "2", "BACKEND_URL": f"http://{HOST_LOOPBACK}:{upstream.port}",
           "NODE_PUBLIC_IP": "192.0.2.1"}  # not the default URL: nothing outside is reached
    assert set(env) == set(service["environment"])
    port = free_port()
    started = podman(
        "run", "--detach", "--name", container_name, *LIMITS, *NETWORK,
        "--user", str(final.user), "--read-only", "--cap-drop", "ALL",
        "--publish", f"127.0.0.1:{port}:8080",
        *(f"--env={name}={value}" for name, value in env.items()),
        "--volume", f"{recipe / 'model_backend.yaml'}:{final.env['MODEL_BACKEND_CONFIG']}:ro",
        "--volume", f"{key}:/run/secrets/{secret['target']}:ro",
        "--volume", f"{volume_name}:{state}", IMAGE)
    assert started.returncode == 0, started.stderr
    start_period = float(final.healthcheck_options["start-period"].removesuffix("s"))
    await until_healthy(container_name, start_period)

    base = f"http://127.0.0.1:{port}"
    body = json.dumps({"model": "2", "messages": [{"role": "user", "content": "ok"}]}).encode()
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/health") as resp:
            assert (resp.status, await resp.text()) == (200, "OK")  # as function-node answers
        async with session.get(base + "/readyz") as resp:
            assert resp.status == 200, await resp.text()  # the backend behind it answers
        # jobs: signed by the scheduler or a gateway on the chain, nobody else
        async with session.post(base + "/v1/chat/completions", data=body) as resp:
            assert resp.status == 401
        stranger = gateway_headers(bytes.fromhex("11" * 32), body, nonce="n-1")
        async with session.post(base + "/v1/chat/completions", data=body,
                                headers=stranger) as resp:
            assert resp.status == 401, await resp.text()
    stopped = await asyncio.to_thread(podman, "stop", "--time", "40", container_name)
    assert stopped.returncode == 0, stopped.stderr
    state_on_host = podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume_name)
    assert (Path(state_on_host.stdout.strip()) / FILE_NAME).exists()  # the journal, kept
    logs = podman("logs", container_name).stderr
    private = json.loads(key.read_text())["private_key"].removeprefix("0x")
    assert private not in logs
    assert "Traceback" not in logs, logs[-2000:]
