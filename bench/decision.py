"""What the routing decision over several URLs costs, per request, in each ``routing`` mode.

    python -m bench.decision [--urls 3] [--number 20000]

Times the pipeline's ordering of a model's URLs (``proxy.upstream.pipeline._order``) for a
typical chat request (a system prompt of about 1 KiB and a short user turn), with every URL
ready and its load read. No network: this is the decision alone, which the request path pays
once per attempt; a single-URL model never makes it.
"""

from __future__ import annotations

import argparse
import asyncio
import timeit

import aiohttp

from proxy.adapters.base import Job
from proxy.config import build_config
from proxy.metrics import Metrics
from proxy.upstream.limiter import Limiter
from proxy.upstream.pipeline import Pipeline, _order
from proxy.upstream.signals import Signals

MODES = ("round_robin", "least_busy", "prefix", "session")


def job() -> Job:
    system = "You answer questions about the network's nodes. " * 20
    payload = {"model": "m", "messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": "How many nodes?"}],
               "user": "alice", "max_tokens": 64}
    return Job(endpoint="chat", method="POST", path="/v1/chat/completions", body=b"{}",
               payload=payload, model="m", upstream_model="m", headers={}, request_id="r",
               session="conversation-1")


async def measure(urls: int, number: int) -> dict[str, float]:
    """Nanoseconds per decision, by mode (best of 5 runs of ``number``)."""
    limiter = Limiter(build_config({"backend_provider": "mock"}).limits)
    pipeline = Pipeline(Metrics(), limiter)
    results = {}
    async with aiohttp.ClientSession() as session:
        for mode in MODES:
            config = build_config({"backend_provider": "vllm", "routing": mode,
                                   "url": [f"http://10.0.0.{i}:8000" for i in range(urls)]})
            backend = pipeline.build(config, session)
            for i, upstream in enumerate(backend.upstreams):
                upstream.signals = Signals(readable=True, waiting=0, running=i % 3,
                                           models=frozenset({"m"}))
            request = job()
            best = min(timeit.repeat(lambda: _order(backend, 0.0, request),  # noqa: B023
                                     number=number, repeat=5))
            results[mode] = best / number * 1e9
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=3)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    results = asyncio.run(measure(args.urls, args.number))
    print(f"routing decision over {args.urls} URLs (ns per request, best of 5)")
    for mode, ns in results.items():
        print(f"{mode:<12}{ns:>10,.0f}")


if __name__ == "__main__":
    main()
