"""The dashboard and the alert rules against a real Prometheus scraping real proxy processes.

Two ``model-proxy serve`` processes (like two replicas): one in front of a scripted OpenAI
upstream that misbehaves on cue, one on the built-in ``mock`` backend (which reports tokens).
A real ``prometheus`` scrapes both every second with ``deploy/prometheus/prometheus.yml``'s
job and ``alerts.yml``'s rules. After a scripted mix of traffic (ok, 4xx, 5xx, streams, a
timeout, a client that disconnects, a full queue, a reload, the upstream going away) every
dashboard expression and every alert expression must return data through the HTTP API, and
every alert must be pending or firing: a renamed metric or label breaks this test.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from tests.conftest import free_port, upstream_url, wait_healthy
from tests.deploy.files import (
    ALERTS,
    PROMETHEUS_CONFIG,
    alert_expressions,
    dashboard_expressions,
    tool,
)
from tests.deploy.processes import running
from tests.deploy.scripted_upstream import ScriptedUpstream

#: Metrics the dashboard shows that the proxy does not export yet: their panels may come back
#: empty (they must still parse and run). Once a metric is exported, its name must leave this
#: set, or the test fails.
PENDING_METRICS: frozenset[str] = frozenset()

API_KEY = "deploy-test-key"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(tool("prometheus") is None or tool("promtool") is None,
                       reason="prometheus/promtool not installed (apt-get install prometheus)"),
]


@asynccontextmanager
async def proxy(config: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = free_port()
    async with running(config.with_suffix(".log"), sys.executable, "-m", "proxy", "serve",
                       "-c", str(config), "--port", str(port)) as proc:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, proc)
        yield proc, url


@asynccontextmanager
async def prometheus(tmp: Path, targets: list[str]) -> AsyncIterator[str]:
    """Prometheus on loopback with the shipped scrape job and rules, scraping every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "prometheus.log"
    async with running(
        log, "prometheus", f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ) as proc, aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 30
        while True:
            assert proc.returncode is None, f"prometheus exited: {log.read_text()[-2000:]}"
            try:
                async with session.get(url + "/-/ready") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            await asyncio.sleep(0.2)
        yield url


async def query(session: aiohttp.ClientSession, url: str, expr: str) -> list[Any]:
    async with session.get(url + "/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return list(body["data"]["result"])


async def until_result(session: aiohttp.ClientSession, url: str, expr: str,
                       seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not await query(session, url, expr):
        assert time.monotonic() < deadline, f"no data for {expr!r} after {seconds} s"
        await asyncio.sleep(0.25)


async def until_gauge(session: aiohttp.ClientSession, proxy_url: str, name: str,
                      value: float, seconds: float = 10) -> None:
    """Wait until the proxy's own /metrics shows ``name`` at ``value``."""
    deadline = time.monotonic() + seconds
    while True:
        async with session.get(proxy_url + "/metrics") as resp:
            lines = (await resp.text()).splitlines()
        if f"{name} {float(value)}" in lines:
            return
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.05)


def chat(cue: str, *, stream: bool = False, model: str = "scripted") -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": cue}]}


class Client:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.statuses: list[int] = []

    async def send(self, cue: str, *, stream: bool = False, key: str = API_KEY,
                   **kwargs: Any) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.session.post(self.url + "/v1/chat/completions", headers=headers,
                                     json=kwargs.pop("body", chat(cue, stream=stream)),
                                     **kwargs) as resp:
            await resp.read()
            self.statuses.append(resp.status)
            return resp.status

    async def disconnect_mid_stream(self) -> None:
        resp = await self.session.post(
            self.url + "/v1/chat/completions", json=chat("long_stream", stream=True),
            headers={"Authorization": f"Bearer {API_KEY}"})
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()  # the client goes away with the stream half read


async def traffic(session: aiohttp.ClientSession, faulty: Client, mock: Client,
                  upstream: TestServer, proc: asyncio.subprocess.Process,
                  prom: str) -> None:
    """The scripted mix. Failures go one at a time, each followed by a success, so the
    breaker (3 consecutive failed attempts) opens only at the end, when the upstream goes."""
    assert (await session.get(faulty.url + "/readyz")).status == 200
    for stream in (False, True, False, True):
        assert await mock.send("hello there", stream=stream) == 200
        assert await faulty.send("stream" if stream else "ok", stream=stream) == 200
    await faulty.disconnect_mid_stream()
    assert await faulty.send("ok", body=chat("ok", model="unknown")) == 404
    assert await faulty.send("ok", data=b"{not json", body=None) == 400
    assert await faulty.send("ok", key="wrong-key") == 401
    for cue, status in (("fail", 500), ("busy", 503), ("stall", 504)):
        assert await faulty.send(cue) == status, cue
        assert await faulty.send("ok") == 200
    # every series seen once before it grows, so rate() has an increase to show
    await until_result(session, prom, 'model_proxy_requests_total{status="504"}')

    # two slow first tokens hold both slots (limits.max_concurrency 2); one more waits in the
    # queue (max_queue 1), the rest are refused with 429, some after a scrape saw the queue
    slow = [asyncio.create_task(faulty.send("slow_first_token", stream=True)) for _ in range(2)]
    await until_gauge(session, faulty.url, "model_proxy_in_flight_requests", 2)
    queued = asyncio.create_task(faulty.send("stream", stream=True))
    await until_gauge(session, faulty.url, "model_proxy_queued_requests", 1)
    assert await faulty.send("ok") == 429
    await until_result(session, prom, "model_proxy_queued_requests > 0")
    await until_result(session, prom, 'model_proxy_requests_total{status="429"}')
    assert await faulty.send("ok") == 429
    assert await asyncio.gather(*slow, queued) == [200, 200, 200]

    proc.send_signal(signal.SIGHUP)  # a reload of the unchanged file
    await until_result(session, prom, 'model_proxy_config_reloads_total{result="ok"}')

    # the upstream goes away: readiness fails, then failed attempts open the circuit
    await upstream.close()
    await asyncio.sleep(1.1)  # past the readiness cache
    assert (await session.get(faulty.url + "/readyz")).status == 503
    for _ in range(4):
        assert await faulty.send("ok") in (502, 503)
    assert (await session.get(faulty.url + "/readyz")).status == 503
    await until_result(session, prom, "model_proxy_circuit_state == 2")
    await until_result(session, prom, "model_proxy_upstream_up == 0")


async def test_every_panel_and_alert_has_data(tmp_path: Path, aiohttp_server: Any) -> None:
    upstream = await aiohttp_server(ScriptedUpstream().app())
    faulty_yaml, mock_yaml = tmp_path / "faulty.yaml", tmp_path / "mock.yaml"
    common = {
        "model": {"name": "scripted"},
        "auth": {"api_keys": [API_KEY]},
        "logging": {"level": "warning", "access_log": False},
    }
    faulty_yaml.write_text(yaml.safe_dump({
        "backend_provider": "custom", "url": upstream_url(upstream), **common,
        "timeouts": {"connect": 1, "first_byte": 1.5, "idle": 10, "total": 30},
        "retries": {"attempts": 2, "backoff_initial": 0.05, "backoff_max": 0.1, "total": 20},
        "circuit": {"failures": 3, "cooldown": 60},
        "limits": {"max_concurrency": 2, "max_queue": 1, "queue_timeout": 20},
    }))
    mock_yaml.write_text(yaml.safe_dump({"backend_provider": "mock", **common}))

    async with AsyncExitStack() as stack:
        faulty_proc, faulty_url = await stack.enter_async_context(proxy(faulty_yaml))
        _, mock_url = await stack.enter_async_context(proxy(mock_yaml))
        prom = await stack.enter_async_context(prometheus(
            tmp_path, [faulty_url.removeprefix("http://"), mock_url.removeprefix("http://")]))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        await until_result(session, prom, 'up{job="model-proxy"} == 1')
        await until_result(session, prom, "count(model_proxy_build_info) == 2")
        faulty, mock = Client(session, faulty_url), Client(session, mock_url)
        await traffic(session, faulty, mock, upstream, faulty_proc, prom)

        exported = set()
        for url in (faulty_url, mock_url):
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
            check = subprocess.run(["promtool", "check", "metrics"], input=text,
                                   capture_output=True, text=True, timeout=30)
            assert check.returncode == 0 and not check.stdout.strip(), (
                f"promtool check metrics on {url}/metrics:\n{check.stdout}{check.stderr}")
            exported |= {line.split()[2] for line in text.splitlines()
                         if line.startswith("# TYPE ")}
        now_exported = PENDING_METRICS & exported
        assert not now_exported, f"exported now; take them out of PENDING_METRICS: {now_exported}"

        empty = []
        for expression in [*dashboard_expressions(), *alert_expressions()]:
            result = await query(session, prom, expression.expr)
            if not result and not expression.metrics() & PENDING_METRICS:
                empty.append(expression)
        assert not empty, "no data for:\n" + "\n".join(f"  {e.where}: {e.expr}" for e in empty)

        await all_alerts_active(session, prom)
    for log in (faulty_yaml.with_suffix(".log"), mock_yaml.with_suffix(".log")):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


async def all_alerts_active(session: aiohttp.ClientSession, url: str) -> None:
    """Prometheus itself evaluates every rule cleanly and has each one pending or firing."""
    expected = {e.where.removeprefix("alert ") for e in alert_expressions()}
    deadline = time.monotonic() + 15
    while True:
        async with session.get(url + "/api/v1/rules", params={"type": "alert"}) as resp:
            groups = (await resp.json())["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        assert set(rules) == expected
        bad = {name: rule["lastError"] for name, rule in rules.items()
               if rule["health"] == "err"}
        assert not bad, bad
        inactive = sorted(name for name, rule in rules.items() if rule["state"] == "inactive")
        if not inactive:
            return
        assert time.monotonic() < deadline, f"alerts never became active: {inactive}"
        await asyncio.sleep(0.5)
