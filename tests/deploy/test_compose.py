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
)

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
#: every compose file shipped: the main one, in-process vLLM on a GPU, TLS in front
COMPOSE_FILES = (COMPOSE, COMPOSE_DIR / "vllm" / "docker-compose.yml",
                 DEPLOY / "tls" / "docker-compose.yml")


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
