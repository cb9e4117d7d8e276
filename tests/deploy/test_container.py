"""The Dockerfile and .dockerignore: lint, layer order, user, health check, build context.

Docker cannot run here; ``.ci/deploy-checks`` also rehearses the image's build and start
steps (``tests.deploy.rehearse_container``) as the image's numeric user.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.dockerfile import context_files, parse
from tests.deploy.files import INSTALL_HINT, ROOT

DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "deploy/container/requirements.py"


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason=f"hadolint not installed ({INSTALL_HINT})")
def test_hadolint_is_clean() -> None:
    result = subprocess.run([str(hadolint()), "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_build_context_holds_only_tracked_files() -> None:
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    context = set(context_files(ROOT))
    assert context <= tracked, f"untracked files would enter the image: {context - tracked}"
    copied = {"pyproject.toml", "README.md", "deploy/container/requirements.py"}
    assert copied <= context and any(name.startswith("proxy/") for name in context)
    assert not any(name.startswith(("tests/", ".venv/", ".git/")) for name in context)


def test_every_copy_source_is_in_the_context() -> None:
    context = context_files(ROOT)
    for stage in parse(DOCKERFILE):
        for word, rest in stage.steps:
            if word == "COPY" and not rest.startswith("--from="):
                for source in rest.split()[:-1]:
                    assert any(n == source or n.startswith(source + "/") for n in context), source


def test_dependencies_install_before_the_code_is_copied() -> None:
    build = next(s for s in parse(DOCKERFILE) if s.name == "build")
    steps = [f"{word} {rest}" for word, rest in build.steps]
    install = next(i for i, s in enumerate(steps) if "pip install -r" in s)
    code = steps.index("COPY proxy ./proxy")
    assert steps.index("COPY pyproject.toml ./") < install < code
    assert "$EXTRAS" in steps[install]


def test_runtime_stage() -> None:
    stages = parse(DOCKERFILE)
    final = stages[-1]
    assert stages[0].base == final.base == "python:3.11-slim-bookworm"  # pinned, slim
    uid, _, gid = (final.user or "").partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit()
    assert final.expose == ["8080"]
    assert final.env["MODEL_BACKEND_CONFIG"] == "/etc/model-proxy/model_backend.yaml"
    assert final.cmd == ["model-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert final.healthcheck and final.healthcheck[0] == "python"
    assert "http://127.0.0.1:8080/healthz" in final.healthcheck[-1]
    assert not any(tool in " ".join(final.healthcheck) for tool in ("curl", "wget"))


def requirements(extras: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REQUIREMENTS), str(ROOT / "pyproject.toml"),
                           extras], capture_output=True, text=True, timeout=30)


def test_extras_build_arg_selects_the_vllm_extra() -> None:
    plain, gpu = requirements(""), requirements("vllm")
    assert plain.returncode == gpu.returncode == 0
    assert any(line.startswith("aiohttp") for line in plain.stdout.splitlines())
    assert not any(line.startswith("vllm") for line in plain.stdout.splitlines())
    extra = set(optional_dependencies()["vllm"])
    assert set(gpu.stdout.splitlines()) - set(plain.stdout.splitlines()) == extra


def test_unknown_extra_is_one_clear_line() -> None:
    result = requirements("vllm,gpu")
    assert result.returncode == 1
    known = ", ".join(sorted(optional_dependencies()))
    assert result.stderr.strip() == (
        f"{ROOT / 'pyproject.toml'}: no optional dependency group gpu; known: {known}")


def optional_dependencies() -> dict[str, list[str]]:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return dict(tomllib.load(file)["project"]["optional-dependencies"])
