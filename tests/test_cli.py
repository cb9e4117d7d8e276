"""The command line as a user meets it: ``model-proxy`` run as a process, its output read as
a shell would. One line and an exit status for each failure, never a traceback; the same
status for the same kind of failure in every command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "node" / "fixtures"


def model_proxy(*args: str, cwd: Path = ROOT, stdout: int | None = subprocess.PIPE,
                prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``model-proxy ARGS`` in a process of its own; ``prelude`` runs first in it."""
    code = f"import sys\n{prelude}\nfrom proxy.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FXN_PRIVATE_KEY", None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, text=True,
                          stdout=stdout, stderr=subprocess.PIPE, timeout=120, check=False)


def test_check_into_a_closed_pipe_ends_without_a_traceback() -> None:
    # `model-proxy check | head -1`, made certain: the reading end is closed before it writes
    read, write = os.pipe()
    os.close(read)
    try:
        done = model_proxy("check", "-c", "model_backend.yaml.example", stdout=write)
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stderr == ""
    assert done.returncode == 1


def test_vllm_worker_without_vllm_says_so_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({
        "backend_provider": "vllm", "model": {"name": "m"},
        "engine": {"model": "/models/m", "args": {
            "nnodes": 2, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": 29500}}}))
    # whether or not vLLM is installed here, the worker finds none to import
    done = model_proxy("vllm-worker", "-c", str(path), "--node-rank", "1",
                       prelude="sys.modules['vllm'] = None")
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"{path}: engine: vllm-worker runs vLLM, which cannot be imported")
    assert "install the vllm extra" in line
    assert done.returncode == 2


@pytest.mark.parametrize("command", [
    ["keygen", "-o", "no/such/directory/fxn.key"],  # a file it cannot make
    ["sign", "-k", "no-such.key", "-d", "{}"],      # a file it cannot read
    ["check", "-c", "no-such.yaml"],
])
def test_a_file_that_cannot_be_used_is_status_2_in_every_command(
    command: list[str], tmp_path: Path
) -> None:
    done = model_proxy(*command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_keygen_refusing_to_overwrite_is_status_2_as_well(tmp_path: Path) -> None:
    assert model_proxy("keygen", "-o", "fxn.key", cwd=tmp_path).returncode == 0
    done = model_proxy("keygen", "-o", "fxn.key", cwd=tmp_path)
    assert done.returncode == 2 and "refusing to overwrite" in done.stderr


@pytest.mark.parametrize("command", [[], ["keygen"], ["sign"], ["check"]])
def test_help_says_what_the_exit_statuses_mean(command: list[str]) -> None:
    done = model_proxy(*command, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "exit status: 0 done; 2 what was given cannot be used" in text
    assert "; 1 it could not be done as things are" in text


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A function-node home: config.yaml, model_backend.yaml and nodekey.json."""
    home = tmp_path / "fxn-home"
    home.mkdir()
    shutil.copy(FIXTURES / "config.yaml.template", home / "config.yaml")
    shutil.copy(FIXTURES / "model_backend.yaml.template", home / "model_backend.yaml")
    shutil.copy(FIXTURES / "key.json", home / "nodekey.json")
    return home


def test_migrate_prints_nothing_check_would_refuse(home: Path) -> None:
    (home / "nodekey.json").unlink()
    done = model_proxy("migrate", "--home", str(home))
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("migrate: the config it would print is refused by check: "
                           f"node.key_file: cannot read key file {home / 'nodekey.json'}")


def test_migrate_prints_what_check_accepts_wherever_it_is_saved(
    home: Path, tmp_path: Path
) -> None:
    backend = (home / "model_backend.yaml").read_text()
    (home / "model_backend.yaml").write_text(
        backend.replace('apiKey: "your-api-key"', 'apiKey: "k$${HOME}$x"'))
    done = model_proxy("migrate", "--home", "fxn-home", cwd=tmp_path)  # a relative home
    assert done.returncode == 0, done.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model_backend.yaml").write_text(done.stdout)
    check = model_proxy("check", "-c", "model_backend.yaml", cwd=elsewhere)
    assert check.returncode == 0, check.stderr
    config = load_config(elsewhere / "model_backend.yaml")
    assert config.api_key is not None
    assert config.api_key.get_secret_value() == "k$${HOME}$x"  # as the node had it
