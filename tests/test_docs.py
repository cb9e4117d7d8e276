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


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {anchor(h) for h in re.findall(r"^#{1,4} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_relative_link_leads_somewhere(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if fragment:
            assert fragment in anchors(linked), f"{page.name}: {target}"


def test_the_readme_contents_list_every_section_and_every_docs_page() -> None:
    text = (ROOT / "README.md").read_text()
    contents = text.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"\]\(#([^)]+)\)", contents)
    sections = re.findall(r"^## (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    assert listed == [anchor(s) for s in sections if s != "Contents"]
    for page in PAGES:
        assert f"](docs/{page.name})" in text, f"README.md does not link docs/{page.name}"
