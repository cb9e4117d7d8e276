"""The node: section, function-node's own config files, and what check says about them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import FxnConfig, build_config, load_config, parse_yaml
from proxy.errors import ConfigError
from proxy.node.compat import go_duration, translate, warnings
from tests.node.conftest import FIXTURES, SCHEDULER

ROUTER = "0x7C8e239F9A26D7fd081Db72A2A23F4E9CA35E16b"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model_backend.yaml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


@pytest.fixture
def home(tmp_path: Path) -> Path:
    shutil.copy(FIXTURES / "key.json", tmp_path / "nodekey.json")
    return tmp_path


def test_node_section_in_both_spellings(home: Path) -> None:
    snake = (
        "backend_provider: mock\nnode:\n  key_file: nodekey.json\n"
        f"  scheduler_address: '{SCHEDULER}'\n  public_ip: 198.51.100.1\n"
        f"  chain: {{rpc_url: 'http://127.0.0.1:8545', router_address: '{ROUTER}', refresh: 5}}\n"
    )
    camel = (
        "backendProvider: mock\nnode:\n  keyFile: nodekey.json\n"
        f"  schedulerAddress: '{SCHEDULER}'\n  publicIp: 198.51.100.1\n"
        f"  chain: {{rpcUrl: 'http://127.0.0.1:8545', routerAddress: '{ROUTER}', refresh: 5}}\n"
    )
    a = load_config(write(home, snake))
    b = load_config(write(home, camel))
    assert a == b and a.node is not None and a.node.chain is not None
    assert a.node.key_file == str(home / "nodekey.json")  # relative to the config file
    assert a.node.chain.refresh == 5
    # node mode checks signatures on /v1/* even with no auth section, no window by default 300
    assert a.auth.fxn_signatures is not None and a.auth.fxn_signatures.allowed_addresses == ()
    assert a.auth.enabled


def test_node_config_errors_are_one_line_with_key_paths(home: Path) -> None:
    unquoted = (
        f"backend_provider: mock\nnode:\n  key_file: nodekey.json\n  scheduler_address: {SCHEDULER}"
        f"\n  chain: {{rpc_url: 'http://h:8545', router_address: {ROUTER}}}\n"
    )
    lines = problems(write(home, unquoted))
    assert len(lines) == 2
    for line, key in zip(
        lines, ("node.scheduler_address", "node.chain.router_address"), strict=True
    ):
        assert line.startswith(f"{home / 'model_backend.yaml'}: {key}: ")
        assert "write the address in quotes" in line and "YAML reads 0x... as a number" in line
    missing_key = (
        f"backend_provider: mock\nnode: {{key_file: nope.json, scheduler_address: '{SCHEDULER}',"
        " public_ip: 'not-an-ip'}\n"
    )
    lines = problems(write(home, missing_key))
    assert any(": node.key_file: " in line and "cannot read key file" in line for line in lines)
    assert any(": node.public_ip: must be an IP address or an http(s)://" in line for line in lines)
    short = (
        "backend_provider: mock\nnode: {key_file: nodekey.json, scheduler_address: '0x456'}\n"
    )
    assert problems(write(home, short)) == [
        f"{home / 'model_backend.yaml'}: node.scheduler_address: "
        "must be 0x followed by 40 hex digits"
    ]


def test_fxn_signatures_need_addresses_unless_node_mode(tmp_path: Path) -> None:
    path = write(tmp_path, "backend_provider: mock\nauth: {fxn_signatures: {window: 0}}\n")
    assert problems(path) == [
        f"{path}: auth.fxn_signatures.allowed_addresses: is required (at least one address) "
        "unless node: is set"
    ]
    path = write(tmp_path, "backend_provider: mock\nauth:\n  fxn_signatures:\n"
                           "    allowed_addresses: [0x0172b2911af6A2491ff76dDEc34aCb7AE2c03BA1]\n")
    [line] = problems(path)
    assert "auth.fxn_signatures.allowed_addresses.0" in line or "allowed_addresses" in line
    assert "write the address in quotes" in line
    config = build_config({"backend_provider": "mock", "auth": {"fxn_signatures": {
        "allowed_addresses": [SCHEDULER], "window": 0}}})
    assert config.auth.fxn_signatures is not None
    assert config.auth.fxn_signatures.window_seconds == float("inf")


def test_the_nodes_model_backend_files_load(tmp_path: Path) -> None:
    template = load_config(FIXTURES / "model_backend.yaml.template")
    assert template.backend_provider == "custom"
    assert template.url == "http://your-backend:8082"
    assert template.fxn_id == "2"
    assert template.api_key is not None and template.api_key.get_secret_value() == "your-api-key"
    assert template.bearer_token is not None
    assert template.model_name_alias == "huggingface-quantized-model-name"
    assert template.upstream_name == "huggingface-quantized-model-name"
    # the node's own fxn fixture has no url; it proxies to nothing, we say so
    assert problems(FIXTURES / "valid_model_backend.yaml") == [
        f"{FIXTURES / 'valid_model_backend.yaml'}: url: url is required for backend_provider fxn"
    ]
    text = (FIXTURES / "valid_model_backend.yaml").read_text() + 'url: "http://127.0.0.1:9"\n'
    fxn = load_config(write(tmp_path, text))
    assert isinstance(fxn, FxnConfig)
    assert fxn.fxn_id == "default" and fxn.upstream_name == "aliased-model"
    assert fxn.public_name == "default"


def test_translate_the_nodes_config_templates(home: Path) -> None:
    theirs = parse_yaml((FIXTURES / "config.yaml.template").read_text(), "config.yaml")
    backend = parse_yaml((FIXTURES / "model_backend.yaml.template").read_text(), "mb.yaml")
    ours, notes = translate(theirs, backend, home=home)
    config = build_config(ours)
    assert config.server.host == "127.0.0.1" and config.server.port == 8080
    assert config.logging.level == "info"
    assert config.node is not None and config.node.chain is not None
    assert config.node.scheduler_address == "0x0a7A1fF52515C24FAa17c13B916679926272ffc4"
    assert config.node.chain.router_address == ROUTER
    assert config.node.chain.rpc_url == "https://base-sepolia-public.nodies.app"
    assert config.node.chain.refresh == 60
    assert config.node.key_file == str(home / "nodekey.json")
    assert config.auth.fxn_signatures is not None and config.auth.fxn_signatures.window == 300
    assert config.model_name_alias == "huggingface-quantized-model-name"
    dropped = " ".join(notes)
    for key in ("nonceCache.cleanupInterval", "proxy.maxIdleConns", "proxy.idleConnTimeout",
                "registry.provider.pollInterval", "registry.bypassAuth", "nonceCache.ttl"):
        assert key in dropped


def test_translate_the_nodes_test_config_and_refuse_its_short_addresses(home: Path) -> None:
    theirs = parse_yaml((FIXTURES / "valid_config.yaml").read_text(), "valid_config.yaml")
    backend = parse_yaml((FIXTURES / "valid_model_backend.yaml").read_text(), "vmb.yaml")
    ours, _ = translate(theirs, {**backend, "url": "http://127.0.0.1:9"}, home=home)
    assert ours["node"]["chain"] == {
        "rpc_url": "http://localhost:8545", "router_address": "0x123", "refresh": 10.0
    }
    path = home / "translated.yaml"
    path.write_text(yaml.safe_dump(ours))
    lines = problems(path)
    assert f"{path}: node.scheduler_address: must be 0x followed by 40 hex digits" in lines
    assert f"{path}: node.chain.router_address: must be 0x followed by 40 hex digits" in lines


def test_go_durations() -> None:
    assert go_duration("1m") == 60 and go_duration("1h30m") == 5400 and go_duration("90s") == 90
    assert go_duration("250ms") == 0.25 and go_duration(7) == 7
    with pytest.raises(ValueError):
        go_duration("soon")


def test_check_warns_about_signatures_behind_an_aliasing_node(tmp_path: Path) -> None:
    config = build_config({"backend_provider": "mock", "auth": {"fxn_signatures": {
        "allowed_addresses": [SCHEDULER]}}})
    [generic] = warnings(config)
    assert "modelNameAlias" in generic and "auth.api_keys" in generic
    [definite] = warnings(config, {"modelNameAlias": "x"})
    assert definite.startswith("auth.fxn_signatures cannot verify behind this function-node")
    assert warnings(config, {"backendProvider": "custom"}) == []
    assert warnings(build_config({"backend_provider": "mock"})) == []
    node_backend = tmp_path / "node_backend.yaml"
    node_backend.write_text("backendProvider: custom\nmodelNameAlias: quantized\n")
    ours = tmp_path / "ours.yaml"
    ours.write_text(yaml.safe_dump({"backend_provider": "mock", "auth": {"fxn_signatures": {
        "allowed_addresses": [SCHEDULER]}}}))
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "-c", str(ours), "--node-backend",
         str(node_backend)], capture_output=True, text=True, timeout=60, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "warning: auth.fxn_signatures cannot verify behind this function-node" in run.stderr


def test_migrate_command_prints_a_config_that_loads(home: Path) -> None:
    shutil.copy(FIXTURES / "config.yaml.template", home / "config.yaml")
    shutil.copy(FIXTURES / "model_backend.yaml.template", home / "model_backend.yaml")
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "migrate", "--home", str(home)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "note: proxy.maxIdleConns has no counterpart" in run.stderr
    path = home / "ours.yaml"
    path.write_text(run.stdout)
    config = load_config(path)
    assert config.node is not None and config.node.scheduler_address.startswith("0x0a7A")
