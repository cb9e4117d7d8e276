"""``model-proxy backends list|add`` and ``model-proxy test``: real imports, real entry points
(a distribution's metadata on ``sys.path``), real config files; one line per problem."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from proxy.adapters import registry
from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.cli import main
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.server.app import create_app
from tests.conftest import free_port


class Greeter(Adapter):
    name = "greeter"

    async def send(self, job: Job) -> UpstreamResponse:
        return UpstreamResponse.from_json({"greeting": "hi"})


class Broken(Adapter):
    name = "broken"

    def __init__(self, config: Any, session: Any) -> None:
        raise RuntimeError("needs options.token")

    async def send(self, job: Job) -> UpstreamResponse:  # pragma: no cover - never built
        raise AssertionError


NOT_AN_ADAPTER = object()
SEED = "# the node's config\nbackend_provider: mock  # for now\nmodel: {name: m}\n"


def config_file(tmp_path: Path, text: str = SEED) -> Path:
    path = tmp_path / "model_backend.yaml"
    path.write_text(text)
    return path


def dist(tmp_path: Path, name: str, target: str) -> Path:
    """A distribution's metadata with one adapter entry point, as pip installs it."""
    info = tmp_path / "site" / f"example_{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: example-{name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[model_backend_proxy.adapters]\n{name} = {target}\n")
    return tmp_path / "site"


def test_list_shows_every_source_with_its_availability(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(dist(tmp_path, "greeter-ep", f"{__name__}:Greeter")))
    path = config_file(tmp_path, "backend_provider: tests.adapters.test_plugin:HeaderEcho\n"
                                 "plugins: {broken-one: no_such_module_xyz:Adapter}\n")
    assert main(["backends", "list", "-c", str(path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "built-in" in rows["ollama"] and rows["ollama"].endswith("available")
    assert "entry point" in rows["greeter-ep"] and rows["greeter-ep"].endswith("available")
    assert "yaml" in rows["broken-one"]
    assert "not importable: No module named 'no_such_module_xyz'" in rows["broken-one"]
    row = rows["-"]  # the module:Class the config names directly, marked as configured
    assert "path" in row and "tests.adapters.test_plugin:HeaderEcho" in row
    assert row.endswith("available")
    vllm = rows["vllm-engine"]
    assert vllm.endswith("available") or "vllm is not installed" in vllm


def test_a_name_registered_twice_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="plugins: entry 'mock'"):
        registry({"mock": f"{__name__}:Greeter"})
    monkeypatch.syspath_prepend(str(dist(tmp_path, "ollama", f"{__name__}:Greeter")))
    with pytest.raises(ConfigError) as info:
        registry()
    assert info.value.problems == [
        f"backend_provider: entry point 'ollama' ({__name__}:Greeter) clashes with the "
        "built-in of that name (proxy.adapters.ollama.adapter:OllamaAdapter); rename one"]


async def test_add_checks_the_class_then_writes_it_keeping_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], aiohttp_client: Any
) -> None:
    path = config_file(tmp_path)
    # the command runs its own event loop (it builds the adapter once): not inside this one
    assert await asyncio.to_thread(main, ["backends", "add", f"{__name__}:Greeter", "-c",
                                          str(path)]) == 0
    assert "added greeter" in capsys.readouterr().out
    text = path.read_text()
    assert text.startswith(SEED)  # comments and layout kept
    assert f"plugins:\n  greeter: {__name__}:Greeter\n" in text
    assert await asyncio.to_thread(main, ["backends", "add", f"{__name__}:Greeter", "-c",
                                          str(path), "--name", "g2"]) == 0
    text = path.read_text().replace("backend_provider: mock  # for now", "backend_provider: g2")
    path.write_text(text)
    client = await aiohttp_client(create_app(load_config(path)))
    resp = await client.post("/v1/chat/completions",
                             json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert (await resp.json()) == {"greeting": "hi"}


@pytest.mark.parametrize(("target", "expected"), [
    ("no_such_module_xyz:Adapter",
     "no_such_module_xyz:Adapter: cannot import no_such_module_xyz: No module named"),
    (f"{__name__}:Missing", f"{__name__}:Missing: {__name__} has no attribute Missing"),
    (f"{__name__}:NOT_AN_ADAPTER", "NOT_AN_ADAPTER is not an Adapter class"),
    (f"{__name__}:Broken", "cannot be instantiated: runtime error: needs options.token"),
    ("just_a_module", "just_a_module: expected module:Class"),
    ("proxy.adapters.mock:MockAdapter",
     "plugins: entry 'mock' (proxy.adapters.mock:MockAdapter) clashes with the built-in"),
])
def test_add_refuses_a_bad_path_in_one_line_and_writes_nothing(
    target: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path)
    assert main(["backends", "add", target, "-c", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in lines[0]
    assert path.read_text() == SEED


@pytest.mark.parametrize("stream", [False, True])
def test_the_test_command_runs_one_job_through_the_mock(
    stream: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path)
    argv = ["test", "-c", str(path), "--prompt", "hello there"] + (["--stream"] if stream else [])
    assert main(argv) == 0
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert len(out["answer"].split()) == 16  # the mock's answer, as a client would read it
    assert out["latency"].endswith(" ms") and out["time to first token"].endswith(" ms")
    assert re.fullmatch(r"prompt [1-9]\d*, completion 16", out["tokens"])


def test_the_test_command_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path, f"backend_provider: custom\nurl: http://127.0.0.1:{free_port()}\n"
                                 "retries: {attempts: 1}\n")
    assert main(["test", "-c", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("model-proxy test: FAILED: ")
    assert "unreachable" in err[0]
    path = config_file(tmp_path, "models:\n  - {backend_provider: mock, model: {name: a}}\n")
    assert main(["test", "-c", str(path), "--model", "b"]) == 1
    assert "this node serves 'a'" in capsys.readouterr().err
