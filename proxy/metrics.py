"""Prometheus metrics (prefix ``model_proxy_``), one registry per application.

Label values come only from configuration and fixed sets, never from a client's raw input:
the ``model`` label is a configured public name, ``endpoint`` and error kinds are fixed sets.

Metrics touched on every request (requests, latencies, time to first token, tokens, upstream
errors) are plain ints and lists updated without locks — the proxy's request path runs on one
event loop thread — and become Prometheus families only when ``/metrics`` is scraped. Rare
events (reloads, retries, auth failures) use prometheus-client's own types.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy import __version__

# ``*_created`` series (one per counter) say nothing an operator reads and look like gauges.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Labels = tuple[str, ...]
#: Invalid usage reports between two log lines about them.
INVALID_LOG_EVERY = 1000
log = logging.getLogger("model_proxy")
#: The ``status`` label of every status the proxy answers with, made once.
_STATUS_LABELS = {status: str(status) for status in range(100, 600)}


class FastCounter:
    """A labelled counter kept as a dict of floats."""

    __slots__ = ("doc", "labelnames", "name", "values")

    def __init__(self, name: str, doc: str, labelnames: Labels) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class FastHistogram:
    """A labelled histogram: per child, one count per bucket (the last is +Inf), then the sum."""

    __slots__ = ("bounds", "children", "doc", "labelnames", "name")

    def __init__(self, name: str, doc: str, labelnames: Labels,
                 bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.labelnames, self.bounds = name, doc, labelnames, bounds
        self.children: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = [0] * (len(self.bounds) + 2)
        child[bisect_left(self.bounds, value)] += 1  # bucket "le" holds values <= bound
        child[-1] += value

    def child(self, labels: Labels) -> list[float]:
        """One child's counts, for a caller that observes many values itself."""
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = [0] * (len(self.bounds) + 2)
        return child


    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        edges = [*(str(float(b)) for b in self.bounds), "+Inf"]
        for labels, child in self.children.items():
            running, buckets = 0.0, []
            for edge, count in zip(edges, child[:-1], strict=True):
                running += count
                buckets.append((edge, running))
            family.add_metric(list(labels), buckets, sum_value=child[-1])
        return family


class Metrics:
    """Every metric the proxy exports, registered on one ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        self.requests = FastCounter(
            "model_proxy_requests", "Requests answered, by endpoint, model and HTTP status.",
            ("endpoint", "model", "status"))
        self.latency = FastHistogram(
            "model_proxy_request_duration_seconds", "Time from request to the end of the answer.",
            ("endpoint",))
        self.upstream_latency = FastHistogram(
            "model_proxy_upstream_duration_seconds", "Time until the upstream's answer began.",
            ("endpoint",))
        self.ttft = FastHistogram(
            "model_proxy_time_to_first_token_seconds", "Time until the first streamed chunk.",
            ("endpoint",))
        self.tokens = FastCounter(
            "model_proxy_tokens", "Tokens reported by the upstream.", ("direction",))
        self.usage_missing = FastCounter(
            "model_proxy_usage_missing",
            "Answers read to their end in which the upstream reported no token usage.",
            ("endpoint",))
        self.usage_invalid = FastCounter(
            "model_proxy_usage_invalid",
            "Answers whose upstream reported a token count that is not one (negative, over "
            "2**31 - 1, not an integer); the count is left out.", ())
        self.upstream_errors = FastCounter(
            "model_proxy_upstream_errors", "Upstream failures by kind.", ("kind",))
        self.upstream_timings = FastHistogram(
            "model_proxy_upstream_timing_seconds",
            "Durations the upstream reports about its own work (e.g. Ollama's load_duration).",
            ("phase",), bounds=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.upstream_tokens_per_second = FastHistogram(
            "model_proxy_upstream_tokens_per_second",
            "Generation speed the upstream reports, per answer.", (),
            bounds=(1, 5, 10, 20, 40, 80, 160, 320, 640, 1280))
        self.overhead = FastHistogram(
            "model_proxy_overhead_seconds",
            "The proxy's own share of a request's time: request time minus upstream time.",
            ("endpoint",), bounds=OVERHEAD_BUCKETS)
        self.chunk_gap = FastHistogram(
            "model_proxy_stream_chunk_gap_seconds",
            "Time between two chunks of a streamed answer, as relayed.", ("endpoint",),
            bounds=GAP_BUCKETS)
        self.upstream_attempts = FastCounter(
            "model_proxy_upstream_attempts",
            "Attempts at each of a model's several upstreams, by outcome (ok or failed).",
            ("model", "upstream", "outcome"))
        r.register(_FastCollector(self))
        self._declare_standard(r)

    def _declare_standard(self, r: CollectorRegistry) -> None:
        """The metrics kept by prometheus-client's own types (events, and gauges read at
        scrape time)."""
        self.retries = Counter(
            "model_proxy_upstream_retries", "Upstream attempts beyond the first.", registry=r)
        # in_flight / queued / circuit_state are read at scrape time (``watch_gauges``), so the
        # request path pays nothing for them. in_flight counts upstream requests holding a
        # concurrency slot (bounded by limits.max_concurrency), not probes or scrapes.
        self.in_flight = Gauge(
            "model_proxy_in_flight_requests",
            "Upstream requests holding a concurrency slot now.", registry=r)
        self.queued = Gauge(
            "model_proxy_queued_requests", "Requests waiting for an upstream slot.", registry=r)
        # upstream_up: the last word on the upstream (an answer, a failure, a readiness probe),
        # and 0 while the circuit is open; kept as a plain flag, read at scrape time.
        self.up = False
        self._circuit_open: Callable[[], bool] = lambda: False
        self.upstream_up = Gauge(
            "model_proxy_upstream_up",
            "1 when the upstream's last answer or readiness probe succeeded and its circuit is "
            "not open.", registry=r)
        self.upstream_up.set_function(lambda: float(self.up and not self._circuit_open()))
        self.circuit_state = Gauge(
            "model_proxy_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r)
        self.reloads = Counter(
            "model_proxy_config_reloads", "Configuration reloads by result.", ["result"],
            registry=r)
        self.auth_failures = Counter(
            "model_proxy_auth_failures", "Rejected inbound requests by reason.", ["reason"],
            registry=r)
        Info("model_proxy_build", "Build information.", registry=r).info({"version": __version__})

    def fast_families(self) -> tuple[FastCounter | FastHistogram, ...]:
        return (self.requests, self.latency, self.upstream_latency, self.ttft, self.tokens,
                self.usage_missing, self.usage_invalid, self.upstream_errors, self.upstream_timings,
                self.upstream_tokens_per_second, self.overhead, self.chunk_gap,
                self.upstream_attempts)

    def watch_gauges(
        self, in_flight: Callable[[], float], queued: Callable[[], float],
        circuit_state: Callable[[], float],
    ) -> None:
        """Read these gauges from the live objects at scrape time."""
        self.in_flight.set_function(in_flight)
        self.queued.set_function(queued)
        self.circuit_state.set_function(circuit_state)
        self._circuit_open = lambda: circuit_state() == 2  # breaker.State.OPEN

    def observe_request(self, endpoint: str, model: str, status: int, seconds: float,
                        upstream: float = -1.0) -> None:
        """One answered request: counted, its duration observed, and (``upstream`` >= 0:
        seconds spent waiting on the upstream) the proxy's own share of it. Written out, not
        through the families' methods: it runs for every request."""
        labels = (endpoint, model, _STATUS_LABELS.get(status) or str(status))
        counts = self.requests.values
        counts[labels] = counts.get(labels, 0) + 1
        key = (endpoint,)
        latency = self.latency
        child = latency.children.get(key) or latency.child(key)
        child[bisect_left(latency.bounds, seconds)] += 1
        child[-1] += seconds
        if upstream >= 0.0:
            overhead = self.overhead
            child = overhead.children.get(key) or overhead.child(key)
            child[bisect_left(overhead.bounds, seconds - upstream)] += 1
            child[-1] += seconds - upstream

    def observe_upstream(self, endpoint: str, seconds: float) -> None:
        family = self.upstream_latency
        key = (endpoint,)
        child = family.children.get(key) or family.child(key)
        child[bisect_left(family.bounds, seconds)] += 1
        child[-1] += seconds

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        family = self.ttft
        key = (endpoint,)
        child = family.children.get(key) or family.child(key)
        child[bisect_left(family.bounds, seconds)] += 1
        child[-1] += seconds

    def chunk_gaps(self, endpoint: str) -> tuple[list[float], tuple[float, ...]]:
        """The chunk-gap child of ``endpoint`` and its bounds, for :func:`observe_into`."""
        family = self.chunk_gap
        key = (endpoint,)
        return family.children.get(key) or family.child(key), family.bounds

    def count_attempt(self, model: str, upstream: str, outcome: str) -> None:
        """One attempt at one of a model's upstreams; all three labels come from the config
        (``upstream`` is the URL's position) or a fixed set (``outcome``)."""
        self.upstream_attempts.inc((model, upstream, outcome))

    def count_retry(self) -> None:
        self.retries.inc()

    def count_reload(self, result: str) -> None:
        """``result``: ``ok`` or ``error``."""
        self.reloads.labels(result).inc()

    def count_auth_failure(self, reason: str) -> None:
        """``reason`` is one of ``proxy.auth.inbound.REASONS``: a fixed set."""
        self.auth_failures.labels(reason).inc()

    def set_upstream_up(self, up: bool) -> None:
        self.up = up

    def count_upstream_error(self, kind: str) -> None:
        """``kind`` is an error code from ``proxy.errors``: a fixed set, never client input."""
        self.upstream_errors.inc((kind,))

    def count_usage(self, prompt_tokens: int | None, completion_tokens: int | None,
                    extra: Mapping[str, float], invalid: bool = False) -> None:
        """Token counts and the upstream's own timings (``Usage`` of one answer); ``invalid``:
        the upstream reported a count that was not one (logged the first time, then once
        every :data:`INVALID_LOG_EVERY`, so a broken upstream cannot flood the log)."""
        if invalid:
            seen = self.usage_invalid.values.get((), 0)
            self.usage_invalid.inc(())
            if seen % INVALID_LOG_EVERY == 0:
                log.warning("the upstream reported token usage that is not a count (%d so "
                            "far); it is not counted", seen + 1)
        if prompt_tokens:
            self.tokens.inc(("in",), prompt_tokens)
        if completion_tokens:
            self.tokens.inc(("out",), completion_tokens)
        if extra:
            for phase, seconds in extra.items():
                if phase == "tokens_per_second":
                    family = self.upstream_tokens_per_second
                    child = family.children.get(()) or family.child(())
                    child[bisect_left(family.bounds, seconds)] += 1
                    child[-1] += seconds
                elif phase.endswith("_duration"):
                    self.upstream_timings.observe((phase.removesuffix("_duration"),), seconds)

    def count_usage_missing(self, endpoint: str) -> None:
        self.usage_missing.inc((endpoint,))

    def watch_stats(self, stats: Callable[[], Mapping[str, float]],
                    families: Callable[[], Iterable[Metric]] = tuple) -> None:
        """Export an adapter's ``stats()`` gauges as ``model_proxy_upstream_<name>``, and its
        ``metric_families()`` (the upstream's own metrics, e.g. vLLM's) as they are."""
        self.registry.register(_StatsCollector(stats, families))

    def watch_upstreams(
        self, rows: Callable[[], Iterable[tuple[str, str, Mapping[str, float]]]]
    ) -> None:
        """Export what each URL of a model reports about itself (``rows()``: ``(model,
        upstream, {name: value})``, read at scrape time) as
        ``model_proxy_upstream_<name>{model,upstream}``; ``upstream`` is the URL's position."""
        self.registry.register(_UpstreamsCollector(rows))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class NodeMetrics:
    """Node mode's metrics (``proxy.node``), registered only when ``node:`` is configured.

    ``reason``, ``type`` and ``outcome`` labels come from fixed sets of the node package.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self._registry_failures = Counter(
            "model_proxy_node_registry_failures",
            "Failed reads of the chain's gateway registry (the last good list stays).",
            ["reason"], registry=r)
        self._registry_skipped = Counter(
            "model_proxy_node_registry_entries_skipped",
            "Gateway registry entries skipped: their id names no signer address.", registry=r)
        self._gateways = Gauge(
            "model_proxy_node_gateways", "Gateways allowed by the last good registry read.",
            registry=r)
        self._registry_age = Gauge(
            "model_proxy_node_registry_age_seconds",
            "Seconds since the last good registry read (-1: none yet).", registry=r)
        self._challenges = Counter(
            "model_proxy_node_challenges", "Scheduler challenges answered, by type and outcome.",
            ["type", "outcome"], registry=r)

    def watch_registry(self, gateways: Callable[[], float], age: Callable[[], float]) -> None:
        """Read the gateway count and the registry's age from the live registry at scrape."""
        self._gateways.set_function(gateways)
        self._registry_age.set_function(age)

    def count_registry_failure(self, reason: str) -> None:
        self._registry_failures.labels(reason).inc()

    def count_registry_skipped(self, entries: int) -> None:
        self._registry_skipped.inc(entries)

    def count_challenge(self, kind: str, outcome: str) -> None:
        self._challenges.labels(kind, outcome).inc()


class _FastCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for fast in self._metrics.fast_families():
            yield fast.family()

    def describe(self) -> list[CounterMetricFamily | HistogramMetricFamily]:
        return []


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, float]],
                 families: Callable[[], Iterable[Metric]]) -> None:
        self._stats = stats
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for name, value in self._stats().items():
            yield GaugeMetricFamily(f"model_proxy_upstream_{name}", f"Upstream gauge {name}.",
                                    value=value)
        yield from self._families()

    def describe(self) -> list[Metric]:
        return []


#: The gauges of :meth:`Metrics.watch_upstreams`, with their help text.
UPSTREAM_GAUGES = {
    "load_readable": "1 when the URL's own load (vLLM /metrics, Ollama /api/ps) was read last "
                     "time; 0: routed by the proxy's own count of requests in flight on it.",
    "requests_waiting": "Requests the URL reports waiting (vllm:num_requests_waiting).",
    "requests_running": "Requests the URL reports running (vllm:num_requests_running).",
    "kv_cache_usage": "KV-cache use the URL reports, 0 to 1 (vllm:kv_cache_usage_perc).",
    "lora_adapters": "LoRA adapters the URL reports running or waiting.",
    "models_loaded": "Models the URL has loaded in memory (Ollama /api/ps).",
    "models_served": "Models and LoRA adapters the URL's /v1/models lists.",
}


class _UpstreamsCollector(Collector):
    def __init__(
        self, rows: Callable[[], Iterable[tuple[str, str, Mapping[str, float]]]]
    ) -> None:
        self._rows = rows

    def collect(self) -> Iterator[Metric]:
        families = {name: GaugeMetricFamily(f"model_proxy_upstream_{name}", doc,
                                            labels=("model", "upstream"))
                    for name, doc in UPSTREAM_GAUGES.items()}
        for model, upstream, values in self._rows():
            for name, value in values.items():
                families[name].add_metric((model, upstream), value)
        yield from (f for f in families.values() if f.samples)

    def describe(self) -> list[Metric]:
        return []
