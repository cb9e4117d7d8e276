"""deploy/prometheus and deploy/grafana as files: promtool's checks, the dashboard's shape."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.deploy.files import (
    ALERT_TESTS,
    ALERTS,
    DASHBOARDS,
    DEPLOY,
    PROMETHEUS_CONFIG,
    alert_expressions,
    dashboard_expressions,
    tool,
)
from tests.deploy.test_prometheus_live import PENDING_METRICS

needs_promtool = pytest.mark.skipif(
    tool("promtool") is None,
    reason="promtool not installed (apt-get install prometheus; bash .ci/run installs it)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                            cwd=ALERTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@needs_promtool
def test_promtool_check_config() -> None:
    out = promtool("check", "config", str(PROMETHEUS_CONFIG)).stdout
    assert "SUCCESS" in out and "5 rules found" in out


@needs_promtool
def test_promtool_check_rules() -> None:
    assert "SUCCESS: 5 rules found" in promtool("check", "rules", str(ALERTS)).stdout


@needs_promtool
def test_alert_unit_tests_cover_every_alert() -> None:
    """alerts_test.yml makes each alert fire on a bad input and stay quiet on a good one."""
    promtool("test", "rules", str(ALERT_TESTS))
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in cases for c in t["alert_rule_test"] if not c["exp_alerts"]}
    names = {e.where.removeprefix("alert ") for e in alert_expressions()}
    assert fired == names and quiet == names


def test_every_alert_has_severity_and_summary() -> None:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_panels_cover_the_issue() -> None:
    titles = {e.where.split(": panel ")[1].strip("'") for e in dashboard_expressions()}
    assert titles >= {
        "Requests/s by status", "Request latency", "Time to first token", "Tokens/s",
        "Proxy overhead", "In flight", "Queued", "Upstream errors/s by kind", "Upstream up",
        "Circuit state", "Config reloads"}
    latency = [e.expr for e in dashboard_expressions() if "request_duration" in e.expr]
    assert [q for q in ("0.5", "0.95", "0.99") if any(f"({q}," in x for x in latency)] == [
        "0.5", "0.95", "0.99"]


def test_dashboard_uses_the_provisioned_datasource_and_folder() -> None:
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    (provider,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/model-proxy.yml").read_text())["providers"]
    compose = yaml.safe_load((DEPLOY / "compose/docker-compose.yml").read_text())
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in compose["services"]["grafana"]["volumes"]
                  if v.endswith(":ro"))
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    assert datasources[0]["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    for path in DASHBOARDS.glob("*.json"):
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["query"] == datasources[0]["type"]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_pending_metrics_are_on_the_dashboard_only() -> None:
    """PENDING_METRICS excuses dashboard panels only, never an alert or a name nothing uses."""
    used = set().union(*(e.metrics() for e in dashboard_expressions()))
    assert used >= PENDING_METRICS
    assert not any(e.metrics() & PENDING_METRICS for e in alert_expressions())


def test_every_metric_the_dashboards_and_alerts_read_is_documented() -> None:
    root = DEPLOY.parent
    documented = "".join(path.read_text() for path in [root / "README.md",
                                                         *sorted(root.glob("docs/**/*.md"))])
    used = set().union(*(e.metrics() for e in [*dashboard_expressions(), *alert_expressions()]))
    ours = {name.removesuffix("_total") for name in used if name.startswith("model_proxy_")}
    assert ours, "no model_proxy_ metric found: the expressions were not read"
    missing = sorted(name for name in ours if f"`{name}" not in documented)
    assert missing == []
