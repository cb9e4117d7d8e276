"""The YAML snippets of the README and of docs/, and the example configs, load as they are
written."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import FxnConfig, load_config, parse_yaml
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
#: the README and the reference beside it, in docs/
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [(page.name, snippet) for page in PAGES
            for snippet in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)]
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))
KEY = "0x" + "5c" * 31 + "01"


def test_there_are_snippets_and_examples() -> None:
    assert len(SNIPPETS) >= 5 and len(EXAMPLES) >= 6
    assert sum(page == "README.md" for page, _ in SNIPPETS) >= 4


@pytest.mark.parametrize(("page", "snippet"), SNIPPETS,
                         ids=[f"{page}: {s.splitlines()[0]}" for page, s in SNIPPETS])
def test_every_readme_yaml_snippet_parses(page: str, snippet: str, tmp_path: Path) -> None:
    data = parse_yaml(snippet, page)
    # a whole config loads too, unless it reads files a snippet cannot ship (keys, an engine)
    whole = "backend_provider" in data and "engine" not in data
    if whole and not re.search(r"^\s*\w+_file:", snippet, re.M):
        path = tmp_path / "model_backend.yaml"
        path.write_text(snippet)
        env = {name: "x" for name in re.findall(r"\$\{(\w+)", snippet)}
        load_config(path, env=env)


def test_the_flow_list_of_variables_is_quoted_in_the_readme(tmp_path: Path) -> None:
    """``[${A}, ${B}]`` is a YAML error; the README quotes them, and the error says how."""
    assert '["${KEY1}", "${KEY2}"]' in (ROOT / "docs" / "security.md").read_text()
    path = tmp_path / "model_backend.yaml"
    path.write_text("backend_provider: mock\nauth:\n  api_keys: [${KEY1}, ${KEY2}]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"KEY1": "a", "KEY2": "b"})
    assert 'must be quoted ("${VAR}")' in caught.value.problems[0]
    path.write_text('backend_provider: mock\nauth:\n  api_keys: ["${KEY1}", "${KEY2}"]\n')
    assert len(load_config(path, env={"KEY1": "a", "KEY2": "b"}).auth.api_keys) == 2


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_loads_with_no_variable_set(example: Path) -> None:
    load_config(example, env={})


SHIPPED = [*EXAMPLES, ROOT / "model_backend.yaml.example"]


@pytest.mark.parametrize("example", SHIPPED, ids=[e.name for e in SHIPPED])
def test_every_example_passes_check_as_shipped(example: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FXN_", "MODEL_"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "proxy", "check", "-c", str(example)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    if example.name == "vllm-inprocess.yaml" and importlib.util.find_spec("vllm") is None:
        # without the engine installed, check says what to install, in one line
        assert done.returncode == 2
        assert done.stderr.strip().endswith("vllm not found (install the vllm extra)")
        return
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# {example}: valid")


def test_the_fxn_example_signs_once_its_key_lines_are_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "config" / "examples" / "fxn.yaml").read_text()
    signing = text.replace("# fxn:\n#   private_key_file:", "fxn:\n  private_key_file:")
    assert signing != text
    (tmp_path / "fxn.key").write_text(KEY)
    path = tmp_path / "fxn.yaml"
    path.write_text(signing)
    config = load_config(path, env={})
    assert isinstance(config, FxnConfig) and config.fxn.private_key is not None


def test_the_fxn_keygen_comment_writes_where_the_config_reads() -> None:
    text = (ROOT / "config" / "examples" / "fxn.yaml").read_text()
    written = re.search(r"keygen -o (\S+)", text)
    read = re.search(r"private_key_file: \$\{FXN_KEY_FILE:-(\S+)\}", text)
    assert written and read
    # relative paths in a config are read beside it
    assert (ROOT / written[1]).resolve() == (ROOT / "config" / "examples" / read[1]).resolve()


def test_check_says_how_to_make_a_missing_signing_key(tmp_path: Path) -> None:
    path = tmp_path / "fxn.yaml"
    path.write_text("backend_provider: fxn\nurl: http://127.0.0.1:8090\nfxn_id: f\n"
                    "fxn:\n  private_key_file: fxn.key\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [
        f"{path}: fxn.private_key_file: cannot read {tmp_path / 'fxn.key'}: No such file or "
        f"directory (make one with: model-proxy keygen -o {tmp_path / 'fxn.key'})"]


def test_what_the_readme_has_an_operator_make_is_ignored_by_git() -> None:
    made = ["model_backend.yaml", "fxn.key", "config/examples/fxn.key", "nodekey.json",
            "inbound.keys", "body.json", "model-proxy-nonces.sqlite3",
            "deploy/kubernetes/secret.yaml", "deploy/kubernetes/node/secret.yaml",
            "deploy/compose/node/nodekey.json"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *made], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert sorted(done.stdout.split()) == sorted(made)
