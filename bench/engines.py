"""The proxy's in-process vLLM engine against ``vllm serve``, on the same model and flags.

    python -m bench.engines [--streams 1 8 32] [--max-tokens 64]

Three targets, one after the other (never two engines at once: they would share the CPUs):
``vllm serve`` direct, ``vllm serve`` behind the proxy (``backend_provider: vllm`` with its
``url``), and the proxy's in-process engine (``backend_provider: vllm`` without a url, the
``engine:`` section of :func:`bench.replicas.engine_section`, the settings
:func:`bench.replicas.server_flags` gives ``vllm serve``). At each concurrency, ``--rounds``
times as many streamed chat completions as streams go out, that many at a time; the table gives
generated tokens per second (usage's completion tokens over the wall time) and the time to first
token, p50 and p99, each the median of ``--repeats`` runs (tokens/s with its range: on a
shared machine they move by a factor of several). One request warms each target first.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from bench import replicas
from bench.fleet import Run, text
from bench.targets import free_port

MODEL = "tiny"


def start_proxy(work: Path, name: str, section: dict[str, object]) -> replicas.Replica:
    """``python -m proxy serve`` in its own process group (its engine processes with it)."""
    port = free_port()
    config = {"backend_provider": "vllm", "model": {"name": MODEL}, "server": {"port": port},
              "timeouts": {"first_byte": 600},
              "limits": {"max_concurrency": 512, "max_queue": 4096}, **section}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = work / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(path)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return replicas.Replica(process, f"http://127.0.0.1:{port}", log)


def wait_ready(server: replicas.Replica, timeout: float = 300) -> None:
    """Poll the proxy's ``/readyz`` until 200 (its engine loaded), with a deadline."""
    replicas.wait_answering(server, "/readyz", "proxy", timeout)


async def measure(url: str, streams: int, rounds: int, tokens: int, seed: str
                  ) -> dict[str, float]:
    rng = random.Random(seed)
    prompts = [text(rng, 200) for _ in range(streams * rounds)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await Run(session, url, MODEL, tokens, 1).ask(
            [{"role": "user", "content": "warm up"}], "warm")
        run = Run(session, url, MODEL, tokens, streams)
        start = time.perf_counter()
        await asyncio.gather(*(run.ask([{"role": "user", "content": p}], f"s{i}")
                               for i, p in enumerate(prompts)))
        wall = time.perf_counter() - start
    ttft = sorted(run.ttft) or [0.0]
    return {"tokens_per_s": run.generated / wall,
            "ttft_p50_ms": statistics.median(ttft) * 1e3,
            "ttft_p99_ms": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] * 1e3,
            "failed": run.failed}


def row(target: str, streams: int, runs: list[dict[str, float]]) -> None:
    """Medians over the repeats; tokens/s with its range."""
    def mid(key: str) -> float:
        return statistics.median(r[key] for r in runs)
    rates = [r["tokens_per_s"] for r in runs]
    print(f"| {target} | {streams} | {mid('tokens_per_s'):,.0f} ({min(rates):,.0f}-"
          f"{max(rates):,.0f}) | {mid('ttft_p50_ms'):.0f} | {mid('ttft_p99_ms'):.0f} | "
          f"{sum(r['failed'] for r in runs):.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per stream at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each point; the table gives medians")
    parser.add_argument("--engine-first", action="store_true",
                        help="the in-process engine before vllm serve (the order is a bias "
                             "on a shared machine)")
    args = parser.parse_args()
    replicas.exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="proxy-engines-"))
    model = replicas.tiny_model()
    print(f"tiny model, {args.rounds} requests per stream, {args.max_tokens} tokens each, "
          f"medians of {args.repeats} runs (logs in {work})")
    print("| target | streams | tokens/s (range) | TTFT p50 ms | TTFT p99 ms | failed |\n"
          "|---|---|---|---|---|---|", flush=True)

    def each(target: str, url: str) -> None:
        for streams in args.streams:
            runs = [asyncio.run(measure(url, streams, args.rounds, args.max_tokens,
                                        f"{target}-{streams}-{i}"))
                    for i in range(args.repeats)]
            row(target, streams, runs)

    def served() -> None:
        with replicas.replicas(model, 1, work, [["--served-model-name", MODEL]]) as (server,):
            behind = start_proxy(work, "proxy-url", {"url": server.url})
            try:
                wait_ready(behind)
                each("vllm serve, direct", server.url)
                each("vllm serve, behind the proxy", behind.url)
            finally:
                replicas.stop(behind)

    def in_process() -> None:
        engine = start_proxy(work, "proxy-engine",
                             {"engine": replicas.engine_section(model, frontend=True)})
        try:
            wait_ready(engine)
            each("in-process engine", engine.url)
        finally:
            replicas.stop(engine)

    for phase in (in_process, served) if args.engine_first else (served, in_process):
        phase()

if __name__ == "__main__":
    main()
