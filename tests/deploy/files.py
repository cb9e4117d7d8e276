"""The deploy/ files as data: PromQL expressions of the dashboard and the alert rules."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"

#: Grafana variables a panel expression may use, and what a test query puts in their place.
#: A variable missing here fails the test: every panel must be runnable as written.
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}

METRIC_NAME = re.compile(r"\bmodel_proxy_[a-z_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


@dataclass(frozen=True)
class Expression:
    where: str  # "dashboard FILE: panel TITLE" or "alert NAME"
    expr: str

    def metrics(self) -> set[str]:
        """The metric families the expression reads (histogram suffixes taken off)."""
        return {HISTOGRAM_SUFFIX.sub("", name) for name in METRIC_NAME.findall(self.expr)}


def dashboard_expressions() -> list[Expression]:
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                found.append(Expression(f"dashboard {path.name}: panel {panel['title']!r}",
                                        substitute(target["expr"])))
    return found


def alert_expressions() -> list[Expression]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [Expression(f"alert {rule['alert']}", rule["expr"])
            for group in groups for rule in group["rules"]]


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    if "$" in expr:
        raise AssertionError(f"unknown Grafana variable in {expr!r}: add it to VARIABLES")
    return expr


def _panels(container: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in container.get("panels", []):
        panels.append(panel)
        panels.extend(_panels(panel))  # rows hold panels of their own
    return panels


def tool(name: str) -> str | None:
    return shutil.which(name)


#: Where ``.ci/deploy-checks`` installs the Compose specification's JSON schema (from the
#: npm package dclint, which ships it): inside the environment the tests run in.
COMPOSE_SCHEMA = Path(sys.prefix) / "share" / "model-proxy-deploy" / "compose.schema.json"
INSTALL_HINT = "run .ci/deploy-checks, which installs it"

#: The image's one tag, everywhere (README, compose, Kubernetes, .ci/container-image):
#: model-proxy:VERSION, pyproject.toml's version; the GPU image adds -vllm.
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"model-proxy:{VERSION}"
IMAGE_VLLM = f"{IMAGE}-vllm"


def model_proxy(*args: str, cwd: Path, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """``model-proxy ARGS`` as an operator runs it, in ``cwd``, with ``env`` added to an
    environment that has none of the caller's ``FXN_*`` / ``MODEL_*`` / ``NODE_*``."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("FXN_", "MODEL_", "NODE_"))}
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def keygen(path: Path) -> str:
    """A new node key at ``path`` (``model-proxy keygen``); its address."""
    made = model_proxy("keygen", "-o", path.name, cwd=path.parent)
    assert made.returncode == 0, made.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    return made.stdout.strip()


def git_ignored(*paths: str) -> list[str]:
    """Which of ``paths`` (relative to the repository) git would leave out of a commit."""
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    return sorted(done.stdout.split())
