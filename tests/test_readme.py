"""The README's YAML snippets and the example configs load as they are written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.config import load_config, parse_yaml
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
EXAMPLES = sorted((ROOT / "config" / "examples").glob("*.yaml"))
KEY = "0x" + "5c" * 31 + "01"


def test_there_are_snippets_and_examples() -> None:
    assert len(SNIPPETS) >= 5 and len(EXAMPLES) >= 6


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.split("\n")[0] for s in SNIPPETS])
def test_every_readme_yaml_snippet_parses(snippet: str, tmp_path: Path) -> None:
    data = parse_yaml(snippet, "README.md")
    # a whole config loads too, unless it reads files a snippet cannot ship (keys, an engine)
    whole = "backend_provider" in data and "engine" not in data
    if whole and not re.search(r"^\s*\w+_file:", snippet, re.M):
        path = tmp_path / "model_backend.yaml"
        path.write_text(snippet)
        env = {name: "x" for name in re.findall(r"\$\{(\w+)", snippet)}
        load_config(path, env=env)


def test_the_flow_list_of_variables_is_quoted_in_the_readme(tmp_path: Path) -> None:
    """``[${A}, ${B}]`` is a YAML error; the README quotes them, and the error says how."""
    assert '["${KEY1}", "${KEY2}"]' in (ROOT / "README.md").read_text()
    path = tmp_path / "model_backend.yaml"
    path.write_text("backend_provider: mock\nauth:\n  api_keys: [${KEY1}, ${KEY2}]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"KEY1": "a", "KEY2": "b"})
    assert 'must be quoted ("${VAR}")' in caught.value.problems[0]
    path.write_text('backend_provider: mock\nauth:\n  api_keys: ["${KEY1}", "${KEY2}"]\n')
    assert len(load_config(path, env={"KEY1": "a", "KEY2": "b"}).auth.api_keys) == 2


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_loads_with_no_variable_set(example: Path, tmp_path: Path) -> None:
    env = {}
    if example.name == "fxn.yaml":  # the one file an example cannot ship: a signing key
        key = tmp_path / "fxn.key"
        key.write_text(KEY)
        env["FXN_KEY_FILE"] = str(key)
    load_config(example, env=env)


def test_the_fxn_keygen_comment_writes_where_the_config_reads() -> None:
    text = (ROOT / "config" / "examples" / "fxn.yaml").read_text()
    written = re.search(r"keygen -o (\S+)", text)
    read = re.search(r"private_key_file: \$\{FXN_KEY_FILE:-(\S+)\}", text)
    assert written and read
    # relative paths in a config are read beside it
    assert (ROOT / written[1]).resolve() == (ROOT / "config" / "examples" / read[1]).resolve()
