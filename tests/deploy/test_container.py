"""The Dockerfile and .dockerignore: lint, layer order, user, health check, build context.

The image itself is built by ``.ci/container-image`` (Debian's podman) and run by
``tests/deploy/test_container_run.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.dockerfile import context_files, parse
from tests.deploy.files import IMAGE, IMAGE_VLLM, INSTALL_HINT, ROOT

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


#: ``model-proxy:TAG`` as an image reference (not a path such as /var/lib/model-proxy:...)
IMAGE_REFERENCE = re.compile(r"(?<![/\w.-])model-proxy:([\w.$-]+)")
#: a command line naming the image without a tag
UNTAGGED = re.compile(r"(docker|podman) (build|run|tag|push)\b.*(?<![/\w.-])model-proxy(?![:\w-])"
                      r"|docker-image model-proxy(?![:\w-])|\" model-proxy\s*$")


def test_one_image_tag_everywhere() -> None:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), DOCKERFILE,
             ROOT / ".ci" / "container-image",
             *sorted((ROOT / "deploy").rglob("*.y*ml")),
             *sorted((ROOT / "deploy").rglob("*.yaml.example"))]
    allowed = {IMAGE, IMAGE_VLLM, "model-proxy:VERSION", "model-proxy:VERSION-vllm",
               "model-proxy:$version"}
    seen = set()
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in IMAGE_REFERENCE.finditer(line):
                assert match.group(0) in allowed, f"{path.name}:{number}: {match.group(0)}"
                seen.add(match.group(0))
            assert not UNTAGGED.search(line), f"{path.name}:{number}: untagged: {line}"
    assert {IMAGE, IMAGE_VLLM} <= seen
    images = set()
    for path in sorted((ROOT / "deploy").rglob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            images.update(_images(document))
    assert images - {IMAGE, IMAGE_VLLM} == {i for i in images if "model-proxy" not in i}
    assert {IMAGE, IMAGE_VLLM} <= images


def _images(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {str(v) for k, v in node.items() if k == "image"}
        return found.union(*(_images(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_images(v) for v in node))
    return set()
