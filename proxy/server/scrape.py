"""The background reader of what each URL of a model says about itself, off the request path.

For a model served by several URLs, every ``balance.interval`` seconds (the clock's): a vLLM
server's ``/metrics`` (queue, running requests, KV-cache use, LoRA adapters) and, every
``balance.models_interval``, its ``/v1/models`` (the models and LoRA adapters it serves); an
Ollama's ``/api/ps`` (the models it has loaded). Each read is bounded in time
(``balance.timeout``) and bytes (``balance.max_bytes``). What is read lands on the
upstream's :class:`~proxy.upstream.signals.Signals`, where the router reads it; a URL that
cannot be read is logged once (and once again when it can be), and the router counts the
proxy's own requests in flight on it meanwhile. The set read follows reloads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import aiohttp
from aiohttp import web

from proxy.adapters.http import credential_headers
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.upstream.clock import Clock
from proxy.upstream.pipeline import Backend, Upstream
from proxy.upstream.routing import Served
from proxy.upstream.signals import model_ids, ollama_loaded, read_vllm_metrics
from proxy.wire.models import parse

log = logging.getLogger("model_proxy")

#: Providers whose URLs say something worth reading: vLLM's ``/metrics``, Ollama's ``/api/ps``.
SCRAPED = frozenset({"vllm", "ollama"})


class Unreadable(Exception):
    """A read that gave nothing to believe; the message says why, in words."""


class Scraper:
    """Reads the served set's URLs (``served()``: the set in force) on ``clock``."""

    def __init__(self, served: Callable[[], Served], session: aiohttp.ClientSession,
                 clock: Clock) -> None:
        self.served = served
        self.session = session
        self.clock = clock
        #: Rounds completed; ``done`` is set at the end of each (tests wait on it).
        self.rounds = 0
        self.done = asyncio.Event()
        #: Set when the served set changes (a reload), so an idle scraper looks again.
        self._wake = asyncio.Event()
        #: When each upstream's ``/v1/models`` was read last (by ``id``, with the upstream).
        self._models_at: dict[int, tuple[Upstream, float]] = {}

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Read every interval while something is to be read; wait for a reload otherwise."""
        while True:
            backends = list(scraped(self.served()))
            if not backends:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self.clock.sleep(min(b.config.balance.interval for b in backends))
            try:
                await self.round()
            except Exception:  # a bug must not end the reading for good
                log.exception("reading the upstreams' load failed")

    async def round(self) -> None:
        """Read each scraped URL once (all at the same time)."""
        backends = list(scraped(self.served()))
        now = self.clock.now()
        known = {id(u) for b in backends for u in b.upstreams}
        self._models_at = {k: v for k, v in self._models_at.items() if k in known}
        await asyncio.gather(*(self._read(b, u, now) for b in backends for u in b.upstreams))
        self.rounds += 1
        self.done.set()
        self.done.clear()

    async def _read(self, backend: Backend, upstream: Upstream, now: float) -> None:
        options = backend.config.balance
        vllm = backend.config.backend_provider == "vllm"
        try:
            if vllm:
                await self._read_load(backend, upstream)
            else:
                await self._read_loaded(backend, upstream)
        except Unreadable as exc:
            if upstream.signals.readable is not False:
                log.warning("model %s, url %s (%s): %s cannot be read (%s); it is routed by "
                            "the proxy's own count of requests in flight until it can",
                            backend.model_label, upstream.label, upstream.url,
                            "/metrics" if vllm else "/api/ps", exc)
            upstream.signals.readable = False
        else:
            if upstream.signals.readable is False:
                log.info("model %s, url %s (%s): its load can be read again",
                         backend.model_label, upstream.label, upstream.url)
            upstream.signals.readable = True
        last = self._models_at.get(id(upstream))
        if vllm and (last is None or now - last[1] >= options.models_interval):
            self._models_at[id(upstream)] = (upstream, now)
            await self._read_models(backend, upstream, options.timeout)

    async def _read_load(self, backend: Backend, upstream: Upstream) -> None:
        text = await self._fetch(backend, upstream, "/metrics")
        try:
            reading = read_vllm_metrics(text)
        except ValueError as exc:
            raise Unreadable(f"not vLLM's metrics: {exc}") from None
        signals = upstream.signals
        signals.waiting, signals.running = reading.waiting, reading.running
        signals.kv_cache, signals.adapters = reading.kv_cache, reading.adapters

    async def _read_loaded(self, backend: Backend, upstream: Upstream) -> None:
        body = await self._fetch(backend, upstream, "/api/ps")
        try:
            upstream.signals.loaded = ollama_loaded(await parse(body))
        except ValueError as exc:
            raise Unreadable(f"not an Ollama's answer: {exc}") from None

    async def _read_models(self, backend: Backend, upstream: Upstream, seconds: float) -> None:
        # through the adapter: its credentials and its bounds; a failure keeps the last list
        try:
            async with asyncio.timeout(seconds):
                upstream.signals.models = model_ids(await upstream.adapter.models())
        except (ProxyError, TimeoutError) as exc:
            log.debug("url %s: /v1/models cannot be read: %s", upstream.label,
                      exc.message if isinstance(exc, ProxyError) else "timed out")
        backend.partial = partial(backend.upstreams)

    async def _fetch(self, backend: Backend, upstream: Upstream, path: str) -> bytes:
        """The body of ``GET <url><path>``, within the section's time and bytes."""
        options = backend.config.balance
        limit = options.max_bytes
        headers = {**credential_headers(backend.config), "Accept-Encoding": "identity"}
        try:
            async with asyncio.timeout(options.timeout), self.session.get(
                upstream.url + path, headers=headers, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise Unreadable(f"it answered {response.status}")
                if (response.content_length or 0) > limit:
                    raise Unreadable(f"its answer is over {limit} bytes")
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise Unreadable(f"its answer is over {limit} bytes")
                return bytes(body)
        except TimeoutError:
            raise Unreadable(f"no answer within {options.timeout:g} s") from None
        except aiohttp.ClientError:
            raise Unreadable("the connection failed") from None


def partial(upstreams: tuple[Upstream, ...]) -> dict[str, tuple[Upstream, ...]]:
    """The models that some of ``upstreams`` list and others do not, each with the ones that
    list it (what ``Backend.partial`` holds for the router)."""
    listed: dict[str, list[Upstream]] = {}
    for upstream in upstreams:
        for model in upstream.signals.models or ():
            listed.setdefault(model, []).append(upstream)
    return {m: tuple(us) for m, us in listed.items() if len(us) < len(upstreams)}


def scraped(served: Served) -> Iterator[Backend]:
    """The backends whose URLs are read: several URLs of a provider that tells its load."""
    return (b for b in served.backends
            if b.spread and b.config.backend_provider in SCRAPED)


def gauges(served: Served) -> Iterator[tuple[str, str, dict[str, float]]]:
    """``(model, upstream, {gauge: value})`` of every scraped URL, for ``/metrics``."""
    for backend in scraped(served):
        for upstream in backend.upstreams:
            signals = upstream.signals
            values = {"load_readable": float(bool(signals.readable))}
            if signals.readable and backend.config.backend_provider == "vllm":
                values["requests_waiting"] = signals.waiting
                values["requests_running"] = signals.running
                values["lora_adapters"] = float(len(signals.adapters))
                if signals.kv_cache >= 0:
                    values["kv_cache_usage"] = signals.kv_cache
            if signals.loaded is not None:
                values["models_loaded"] = float(len(signals.loaded))
            if signals.models is not None:
                values["models_served"] = float(len(signals.models))
            yield backend.model_label, upstream.label, values


def watch(metrics: Metrics, served: Callable[[], Served]) -> None:
    """Export :func:`gauges` as ``model_proxy_upstream_<gauge>{model,upstream}``."""
    metrics.watch_upstreams(lambda: gauges(served()))


SCRAPER = web.AppKey("scraper", Scraper)

__all__ = ["SCRAPED", "SCRAPER", "Scraper", "gauges", "scraped", "watch"]
