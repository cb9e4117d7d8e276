"""The Dockerfile and .dockerignore: lint, layer order, user, health check, build context.

The image itself is built by ``.ci/container-image`` (Debian's podman) and run by
``tests/deploy/test_container_run.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.dockerfile import context_files, parse
from tests.deploy.files import INSTALL_HINT, ROOT

DOCKERFILE = ROOT / "Dockerfile"


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
    copied = {"pyproject.toml", "README.md", "requirements/proxy.txt",
              "requirements/proxy-vllm.txt"}
    assert copied <= context and any(name.startswith("proxy/") for name in context)
    assert not any(name.startswith(("tests/", ".venv/", ".git/")) for name in context)


def test_every_copy_source_is_in_the_context() -> None:
    context = context_files(ROOT)
    for stage in parse(DOCKERFILE):
        for word, rest in stage.steps:
            if word == "COPY" and not rest.startswith("--from="):
                for source in rest.split()[:-1]:
                    assert any(n == source or n.startswith(source + "/") for n in context), source


def test_the_lock_installs_before_the_code_is_copied() -> None:
    stages = {s.name: s for s in parse(DOCKERFILE)}
    deps = [f"{word} {rest}" for word, rest in stages["deps"].steps]
    install = next(i for i, s in enumerate(deps) if "pip install" in s)
    assert deps.index("COPY requirements/proxy.txt requirements/proxy-vllm.txt requirements/") \
        < install
    # nothing resolved at build time: exact versions with hashes, the lock EXTRAS names
    assert "--no-deps --require-hashes -r" in deps[install]
    assert '"requirements/proxy${EXTRAS:+-$EXTRAS}.txt"' in deps[install]
    build = [f"{word} {rest}" for word, rest in stages["build"].steps]
    assert build.index("COPY proxy ./proxy") < next(
        i for i, s in enumerate(build) if "pip install --no-deps --no-build-isolation ." in s)


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
