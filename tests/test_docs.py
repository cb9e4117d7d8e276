"""The pages under docs/ as a reader follows them: their YAML snippets load, and the node
operator's walkthrough works step by step (keygen, check, sign) in a fresh directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import parse_yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
WALKTHROUGH = ROOT / "docs" / "node-operator.md"


def snippets(page: Path, kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", page.read_text(), re.S)


def model_proxy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_there_are_pages() -> None:
    assert WALKTHROUGH in PAGES


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_yaml_snippet_parses(page: Path) -> None:
    for snippet in snippets(page, "yaml"):
        assert isinstance(parse_yaml(snippet, page.name), dict)


def test_the_node_walkthrough_works_from_a_fresh_directory(tmp_path: Path) -> None:
    """Step 2 makes the key, step 4's config passes check beside it, step 5 signs a body."""
    made = model_proxy("keygen", "-o", "nodekey.json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "nodekey.json").stat().st_mode & 0o777 == 0o600
    [config] = [s for s in snippets(WALKTHROUGH, "yaml") if "node:" in s]
    (tmp_path / "model_backend.yaml").write_text(config)
    checked = model_proxy("check", "-c", "model_backend.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "key_file" in checked.stdout
    assert model_proxy("keygen", "-o", "operator.key", cwd=tmp_path).returncode == 0
    (tmp_path / "body.json").write_text('{"model":"2","messages":[]}')
    signed = model_proxy("sign", "-k", "operator.key", "-f", "body.json", "--format", "curl",
                         "--url", "http://127.0.0.1:8080/v1/chat/completions", cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith("curl") and "X-Signature" in signed.stdout
    shell = "\n".join(snippets(WALKTHROUGH, "sh"))
    for command in ("keygen -o nodekey.json", "check -c model_backend.yaml",
                    "serve -c model_backend.yaml", "test -c model_backend.yaml",
                    "sign -k operator.key -f body.json --format curl"):
        assert command in shell  # the page says what this test ran
