"""deploy/compose: valid against the Compose specification's schema, and wired together."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_config
from tests.deploy.dockerfile import parse
from tests.deploy.files import COMPOSE_SCHEMA, DEPLOY, INSTALL_HINT, PROMETHEUS_CONFIG, ROOT

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def bind_mounts(service: dict[str, Any]) -> dict[Path, str]:
    """Host folder or file (resolved) -> path in the container, for relative binds."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[(COMPOSE_DIR / source).resolve()] = target
    return mounts


@pytest.mark.skipif(not COMPOSE_SCHEMA.exists(),
                    reason=f"Compose JSON schema not installed ({INSTALL_HINT})")
def test_valid_against_the_compose_specification() -> None:
    from jsonschema import Draft7Validator

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = sorted(Draft7Validator(schema).iter_errors(compose()), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)
    # the validator does reject a wrong file: a typo'd key
    broken = compose()
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
