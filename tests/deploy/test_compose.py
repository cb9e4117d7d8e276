"""deploy/compose: valid against the Compose specification's schema, and wired together."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from proxy.config import load_config
from tests.deploy.dockerfile import parse
from tests.deploy.files import (
    COMPOSE_SCHEMA,
    DEPLOY,
    IMAGE,
    IMAGE_VLLM,
    INSTALL_HINT,
    PROMETHEUS_CONFIG,
    ROOT,
    git_ignored,
    keygen,
    model_proxy,
)

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
#: every compose file shipped: the main one, in-process vLLM on a GPU, TLS in front, a node
COMPOSE_FILES = (COMPOSE, COMPOSE_DIR / "vllm" / "docker-compose.yml",
                 DEPLOY / "tls" / "docker-compose.yml", COMPOSE_DIR / "node" / "docker-compose.yml")


def compose(path: Path = COMPOSE) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def bind_mounts(service: dict[str, Any], folder: Path = COMPOSE_DIR) -> dict[Path, str]:
    """Host folder or file (resolved) -> path in the container, for relative binds."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[(folder / source).resolve()] = target
    return mounts


@pytest.mark.skipif(not COMPOSE_SCHEMA.exists(),
                    reason=f"Compose JSON schema not installed ({INSTALL_HINT})")
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_valid_against_the_compose_specification(path: Path) -> None:
    from jsonschema import Draft7Validator

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = sorted(Draft7Validator(schema).iter_errors(compose(path)),
                    key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)
    # the validator does reject a wrong file: a typo'd key
    broken = compose(path)
    broken["services"]["proxy"]["volume"] = broken["services"]["proxy"].pop("volumes")
    assert list(Draft7Validator(schema).iter_errors(broken))


def test_the_four_services() -> None:
    services = compose()["services"]
    assert set(services) == {"proxy", "ollama", "prometheus", "grafana"}
    for name, service in services.items():
        if "image" in service and name != "proxy":
            repository, _, tag = service["image"].rpartition(":")
            assert repository and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin the tag"


def test_proxy_reads_the_mounted_config_and_reaches_ollama(tmp_path: Path) -> None:
    service = compose()["services"]["proxy"]
    assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    image_config = parse(ROOT / "Dockerfile")[-1].env["MODEL_BACKEND_CONFIG"]
    config_file = COMPOSE_DIR / "model_backend.yaml"
    assert bind_mounts(service)[config_file.resolve()] == image_config
    # the variables the YAML reads are the ones compose passes in
    used = set(re.findall(r"\$\{(\w+)", config_file.read_text()))
    assert used == set(service["environment"]) == {"PROXY_API_KEY"}
    config = load_config(config_file, env={"PROXY_API_KEY": "k"})
    assert [key.get_secret_value() for key in config.auth.api_keys] == ["k"]
    assert config.url == "http://ollama:11434" and config.backend_provider == "ollama"
    grace = float(service["stop_grace_period"].removesuffix("s"))
    assert grace > config.server.shutdown_grace
    assert "/readyz" in service["healthcheck"]["test"][-1]


def test_prometheus_scrapes_the_proxy_and_grafana_reads_prometheus() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    assert bind_mounts(prometheus)[PROMETHEUS_CONFIG.parent.resolve()] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and port in parse(ROOT / "Dockerfile")[-1].expose
    grafana = bind_mounts(services["grafana"])
    assert grafana[(DEPLOY / "grafana/provisioning").resolve()] == "/etc/grafana/provisioning"
    for source in [*grafana, *bind_mounts(prometheus)]:
        assert source.exists(), source


def test_vllm_in_process_has_a_gpu_shared_memory_and_a_model_cache() -> None:
    path = COMPOSE_FILES[1]
    whole = compose(path)
    service = whole["services"]["proxy"]
    assert service["build"]["args"]["EXTRAS"] == "vllm" and service["image"] == IMAGE_VLLM
    assert (path.parent / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert service["shm_size"].endswith("gb") and int(service["shm_size"][:-2]) >= 8
    # the model cache: on a named volume, not under the image's HOME (a tmpfs)
    image = parse(ROOT / "Dockerfile")[-1]
    hf_home = PurePosixPath(service["environment"]["HF_HOME"])
    named = {target: source for source, target, *_ in
             (v.split(":") for v in service["volumes"]) if not source.startswith(".")}
    cache = next(PurePosixPath(t) for t in named if hf_home.is_relative_to(t))
    assert named[str(cache)] in whole["volumes"]
    assert not hf_home.is_relative_to(image.env["HOME"]) and str(cache) not in service["tmpfs"]
    config_file = path.parent / "model_backend.yaml"
    assert bind_mounts(service, path.parent)[config_file.resolve()] == \
        image.env["MODEL_BACKEND_CONFIG"]
    config = load_config(config_file, env={"PROXY_API_KEY": "k"})
    assert config.backend_provider == "vllm" and config.url is None and config.engine
    grace = float(service["stop_grace_period"].removesuffix("s"))
    assert grace > config.server.shutdown_grace
    assert "/readyz" in service["healthcheck"]["test"][-1]


def test_tls_terminator_in_front_of_an_unpublished_proxy() -> None:
    path = COMPOSE_FILES[2]
    services = compose(path)["services"]
    proxy, tls = services["proxy"], services["tls"]
    assert "ports" not in proxy and proxy["image"] == IMAGE  # reachable through TLS only
    repository, _, tag = tls["image"].rpartition(":")
    assert repository == "nginx" and re.fullmatch(r"\d+\.\d+\.\d+-bookworm", tag)
    mounts = bind_mounts(tls, path.parent)
    assert mounts[(path.parent / "nginx.conf").resolve()].startswith("/etc/nginx/conf.d/")
    nginx = (path.parent / "nginx.conf").read_text()
    certs = mounts[(path.parent / "certs").resolve()]
    assert f"ssl_certificate {certs}/tls.crt;" in nginx
    assert f"ssl_certificate_key {certs}/tls.key;" in nginx
    # nginx reaches the proxy by its service name, on the image's port
    port = parse(ROOT / "Dockerfile")[-1].expose[0]
    assert f"server proxy:{port};" in nginx and "proxy_buffering off;" in nginx
    (published,) = tls["ports"]
    assert f"listen {published.split(':')[-1]} ssl;" in nginx
    config = load_config(path.parent / "model_backend.yaml", env={"PROXY_API_KEY": "k"})
    assert config.auth.api_keys and set(proxy["environment"]) == {"PROXY_API_KEY"}


def defaults(text: str) -> dict[str, str]:
    """``${NAME:-default}`` in ``text``: each name's default."""
    return dict(re.findall(r"\$\{(\w+):-([^}]*)\}", text))


def test_a_node_has_its_key_as_a_secret_and_its_journal_on_a_volume(tmp_path: Path) -> None:
    path = COMPOSE_FILES[3]
    whole = compose(path)
    service = whole["services"]["proxy"]
    assert service["image"] == IMAGE
    assert (path.parent / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    image = parse(ROOT / "Dockerfile")[-1]
    config_file = path.parent / "model_backend.yaml"
    assert bind_mounts(service, path.parent)[config_file.resolve()] == \
        image.env["MODEL_BACKEND_CONFIG"]
    assert f"{config_file.name}:{image.env['MODEL_BACKEND_CONFIG']}:ro" in \
        " ".join(service["volumes"])
    # the key: a compose secret from a file beside the compose file, which git ignores
    (secret,) = service["secrets"]
    key_in_container = f"/run/secrets/{secret['target']}"
    key_on_host = whole["secrets"][secret["source"]]["file"]
    assert git_ignored((path.parent / key_on_host).relative_to(ROOT).as_posix())
    text = path.read_text()
    assert f"keygen -o {PurePosixPath(key_on_host).name}" in text
    assert "chown 10001:10001" in text and image.user == "10001:10001"
    # the config reads the key where the secret is mounted, unless told another path
    config_text = config_file.read_text()
    assert defaults(config_text)["NODE_KEY_FILE"] == key_in_container
    # the nonce journal: a named volume at the image's state directory, writable
    named = {target: source for source, target, *_ in
             (v.split(":") for v in service["volumes"]) if not source.startswith(".")}
    state = image.env["MODEL_PROXY_STATE_DIR"]
    assert named[state] in whole["volumes"] and f"{state}:ro" not in service["volumes"]
    # the variables the YAML reads: the ones compose passes in, with the same defaults, and
    # the key's path
    used = set(re.findall(r"\$\{(\w+)", config_text))
    assert used == set(service["environment"]) | {"NODE_KEY_FILE"}
    for name, default in defaults(config_text).items():
        if name in service["environment"]:
            assert defaults(service["environment"][name]) == {name: default}
    # the port the network reaches, the image's
    (published,) = service["ports"]
    assert published.split(":")[-1] in image.expose
    # it passes check as the container reads it, with a key made as the header says
    keygen(tmp_path / "nodekey.json")
    env = {"NODE_KEY_FILE": str(tmp_path / "nodekey.json"), "FXN_ID": "2"}
    checked = model_proxy("check", "-c", str(config_file), cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"# {config_file}: valid")
    assert f"key_file: {tmp_path / 'nodekey.json'}" in checked.stdout  # the file, not the key
    private = json.loads((tmp_path / "nodekey.json").read_text())["private_key"]
    assert private.removeprefix("0x") not in checked.stdout + checked.stderr
    config = load_config(config_file, env={**env, "MODEL_PROXY_STATE_DIR": state})
    assert config.node is not None and config.node.chain is not None
    signatures = config.auth.fxn_signatures  # node mode's, with no section written
    assert signatures is not None and signatures.journaled and signatures.state_dir == state
    assert config.fxn_id == "2" and config.url == "http://host.docker.internal:8000"
    grace = float(service["stop_grace_period"].removesuffix("s"))
    assert grace > config.server.shutdown_grace
    assert "/readyz" in service["healthcheck"]["test"][-1]
    # without the model's id, or without the key, check says what is missing in one line
    refused = model_proxy("check", "-c", str(config_file), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"{config_file}: fxn_id: environment variable FXN_ID is not set (use ${{FXN_ID:-default}}"
        " for a fallback)"]
    refused = model_proxy("check", "-c", str(config_file), cwd=tmp_path, env={"FXN_ID": "2"})
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"{config_file}: node.key_file: cannot read key file {key_in_container}: No such file "
        f"or directory (make one with: model-proxy keygen -o {key_in_container})"]
