"""Prometheus metrics (prefix ``model_proxy_``), one registry per application.

Label values come only from configuration and fixed sets, never from a client's raw input:
the ``model`` label is a configured public name or ``other``. Children are cached so the hot
path pays a dict lookup, not prometheus-client's label resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """Every metric the proxy exports, registered on one ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "model_proxy_requests",
            "Requests answered, by endpoint, model and HTTP status.",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "model_proxy_request_duration_seconds",
            "Time from request to the end of the answer.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "model_proxy_upstream_duration_seconds",
            "Time until the upstream's answer began.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "model_proxy_time_to_first_token_seconds",
            "Time until the first streamed chunk.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "model_proxy_tokens",
            "Tokens reported by the upstream.",
            ["direction"],
            registry=r,
        )
        self.retries = Counter(
            "model_proxy_upstream_retries",
            "Upstream attempts beyond the first.",
            registry=r,
        )
        self.upstream_errors = Counter(
            "model_proxy_upstream_errors",
            "Upstream failures by kind.",
            ["kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "model_proxy_in_flight_requests",
            "Requests being answered now.",
            registry=r,
        )
        self.queued = Gauge(
            "model_proxy_queued_requests",
            "Requests waiting for an upstream slot.",
            registry=r,
        )
        self.upstream_up = Gauge(
            "model_proxy_upstream_up",
            "1 when the last readiness probe succeeded.",
            registry=r,
        )
        self.circuit_state = Gauge(
            "model_proxy_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self.reloads = Counter(
            "model_proxy_config_reloads",
            "Configuration reloads by result.",
            ["result"],
            registry=r,
        )
        self.auth_failures = Counter(
            "model_proxy_auth_failures",
            "Rejected inbound requests by reason.",
            ["reason"],
            registry=r,
        )
        Info("model_proxy_build", "Build information.", registry=r).info({"version": __version__})
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}

    def observe_request(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        key = (endpoint, model, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(endpoint, model, str(status))
        child.inc()
        hist = self._latency_children.get(endpoint)
        if hist is None:
            hist = self._latency_children[endpoint] = self.latency.labels(endpoint)
        hist.observe(seconds)

    def watch_stats(self, stats: Callable[[], Mapping[str, float]]) -> None:
        """Export an adapter's ``stats()`` gauges as ``model_proxy_upstream_<name>``."""
        self.registry.register(_StatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in self._stats().items():
            yield GaugeMetricFamily(
                f"model_proxy_upstream_{name}", f"Upstream gauge {name}.", value=value
            )

    def describe(self) -> list[GaugeMetricFamily]:
        return []
