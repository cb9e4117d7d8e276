"""Routing over several vLLM replicas: each ``routing`` mode on a workload with shared prefixes
and on one without, as vLLM itself reports it.

    python -m bench.fleet --urls http://127.0.0.1:8001,http://127.0.0.1:8002 --model tiny
    python -m bench.fleet --serve 2 [--requests 40]    # starts 2 real `vllm serve` replicas
    python -m bench.fleet --fake [--replicas 3]        # against fake vLLM servers: a smoke run

For each mode (``single``: the first URL alone, the baseline a cache-aware router aims at;
then ``round_robin``, ``least_busy``, ``prefix``, ``session``) two proxy processes are started
in front of the URLs, the workload goes through the first, and the table gives: the prefix-
cache hit rate vLLM reports (``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``, the
change over the run, all replicas), time to first token p50/p99, generated tokens per second,
the load spread (most requests on one replica ÷ the mean) and the two proxies' agreement on
the replica for the same requests. Prompts are salted per mode and workload so that no run
reuses what an earlier one cached.

Workloads: ``shared``, a few long system prompts times many one-turn questions, and multi-turn
conversations (each turn sends the history and the previous real answer, with its session in
``X-Session-ID``); ``unique``, every prompt its own. ``--fake`` serves them from in-process
fake vLLM servers (``tests/fakes/vllm_server.py``) whose toy prefix cache delays the first token
by the blocks it missed: it checks the script, it measures no GPU. ``--serve N`` starts N
``vllm serve`` replicas of the tiny test model (``bench.replicas``: prefix caching on, the
vLLM suite's flags, a context of ``--max-model-len`` tokens for the long system prompts) and
stops them, process groups whole, when the run ends however it ends.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import replicas
from bench.targets import free_port, stop_all, wait_up

MODES = ("single", "round_robin", "least_busy", "prefix", "session")
WORDS = ("node", "token", "cache", "prefix", "replica", "network", "answer", "model", "batch",
         "queue", "gateway", "stream", "latency", "prompt", "context", "weight")


def text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)


def workload(kind: str, salt: str, requests: int, rng: random.Random
             ) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """One-turn requests and conversations (lists of user turns) making about ``requests``."""
    if kind == "unique":
        return [{"system": f"{salt} {i} " + text(rng, 3000), "user": text(rng, 100),
                 "session": f"{salt}-u{i}"} for i in range(requests)], []
    systems = [f"{salt} system {i}: " + text(rng, 3000) for i in range(4)]
    singles = [{"system": rng.choice(systems), "user": text(rng, 100), "session": f"{salt}-s{i}"}
               for i in range(requests // 2)]
    conversations = [[text(rng, 200) for _ in range(5)] for _ in range(requests // 10)]
    return singles, conversations


class Run:
    """One mode's requests through one proxy, and what they cost."""

    def __init__(self, session: aiohttp.ClientSession, url: str, model: str, tokens: int,
                 concurrency: int) -> None:
        self.session, self.url, self.model, self.tokens = session, url, model, tokens
        self.gate = asyncio.Semaphore(concurrency)
        self.ttft: list[float] = []
        self.generated = 0
        self.failed = 0

    async def ask(self, messages: list[dict[str, str]], session: str) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": self.tokens,
                "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
        async with self.gate:
            start = time.perf_counter()
            first = None
            answer: list[str] = []
            async with self.session.post(self.url + "/v1/chat/completions", json=body,
                                         headers={"X-Session-ID": session}) as resp:
                if resp.status != 200:
                    self.failed += 1
                    await resp.read()
                    return ""
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = orjson.loads(line[6:])
                    for choice in event.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            first = first or time.perf_counter()
                            answer.append(piece)
                    if event.get("usage"):
                        self.generated += event["usage"].get("completion_tokens") or 0
            if first is not None:
                self.ttft.append(first - start)
            return "".join(answer)

    async def conversation(self, system: str, turns: Sequence[str], session: str) -> None:
        messages = [{"role": "system", "content": system}]
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            messages.append({"role": "assistant", "content": await self.ask(messages, session)})


async def counters(session: aiohttp.ClientSession, urls: Sequence[str]) -> tuple[float, float]:
    """``(hits, queries)`` of vLLM's prefix cache, summed over ``urls``."""
    hits = queries = 0.0
    for url in urls:
        async with session.get(url + "/metrics") as resp:
            page = await resp.text()
        for line in page.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0].removesuffix("_total")
            if name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
                value = float(line.rsplit(" ", 1)[1])
                if name.endswith("hits"):
                    hits += value
                else:
                    queries += value
    return hits, queries


async def attempts(session: aiohttp.ClientSession, proxy: str) -> dict[str, float]:
    """Each upstream's successful attempts so far, by its position (the proxy's metrics)."""
    async with session.get(proxy + "/metrics") as resp:
        page = await resp.text()
    out: dict[str, float] = {}
    for line in page.splitlines():
        if line.startswith("model_proxy_upstream_attempts_total{") and 'outcome="ok"' in line:
            position = line.split('upstream="', 1)[1].split('"', 1)[0]
            out[position] = float(line.rsplit(" ", 1)[1])
    return out


async def answered_by(session: aiohttp.ClientSession, proxy: str, model: str,
                      body: dict[str, Any], headers: dict[str, str]) -> str:
    """The upstream position that answered ``body`` (one token, not streamed)."""
    before = await attempts(session, proxy)
    async with session.post(proxy + "/v1/chat/completions", headers=headers, json={
            **body, "model": model, "max_tokens": 1}) as resp:
        await resp.read()
    after = await attempts(session, proxy)
    moved = [k for k, v in after.items() if v > before.get(k, 0)]
    return moved[0] if moved else "?"


def start_proxy(work: Path, name: str, urls: Sequence[str], routing: str
                ) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / f"{name}.yaml"
    listed = urls[0] if len(urls) == 1 else "[" + ", ".join(urls) + "]"
    config.write_text(f"backend_provider: vllm\nurl: {listed}\nrouting: {routing}\n"
                      f"server: {{port: {port}}}\ntimeouts: {{first_byte: 600}}\n"
                      f"limits: {{max_concurrency: 512, max_queue: 4096}}\n")
    with (work / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(config)],
                                stderr=log, stdout=log)
    return proc, f"http://127.0.0.1:{port}"


async def one_mode(args: argparse.Namespace, work: Path, urls: Sequence[str], mode: str,
                   kind: str, session: aiohttp.ClientSession) -> dict[str, float]:
    targets = urls[:1] if mode == "single" else urls
    routing = "round_robin" if mode == "single" else mode
    procs = [start_proxy(work, f"{mode}-{kind}-{side}", targets, routing) for side in "ab"]
    try:
        for proc, url in procs:
            await asyncio.to_thread(wait_up, url + "/healthz", proc)
        (_, a), (_, b) = procs
        rng = random.Random(f"{kind}-{mode}")
        singles, conversations = workload(kind, f"{mode}-{kind}", args.requests, rng)
        hits0, queries0 = await counters(session, urls)
        spread0 = await attempts(session, a)
        run = Run(session, a, args.model, args.max_tokens, args.concurrency)
        start = time.perf_counter()
        systems = sorted({s["system"] for s in singles})
        await asyncio.gather(
            *(run.ask([{"role": "system", "content": s["system"]},
                       {"role": "user", "content": s["user"]}], s["session"]) for s in singles),
            *(run.conversation(systems[i % len(systems)], turns, f"{mode}-{kind}-c{i}")
              for i, turns in enumerate(conversations)))
        wall = time.perf_counter() - start
        hits1, queries1 = await counters(session, urls)
        spread1 = await attempts(session, a)
        per = [spread1.get(k, 0) - spread0.get(k, 0) for k in spread1] or [0.0]
        sample = singles[: args.agreement]
        agree = 0
        # the proxies choose by the loads they last read: let readings of the run's tail pass
        await asyncio.sleep(1.0)
        for s in sample:
            body = {"messages": [{"role": "system", "content": s["system"]},
                                 {"role": "user", "content": s["user"]}]}
            headers = {"X-Session-ID": s["session"]}
            first = await answered_by(session, a, args.model, body, headers)
            second = await answered_by(session, b, args.model, body, headers)
            agree += first == second
        ttft = sorted(run.ttft) or [0.0]
        return {
            "hit_rate": (hits1 - hits0) / max(queries1 - queries0, 1),
            "ttft_p50_ms": statistics.median(ttft) * 1e3,
            "ttft_p99_ms": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] * 1e3,
            "tokens_per_s": run.generated / wall,
            "spread": max(per) / (statistics.mean(per) or 1) if mode != "single" else 1.0,
            "agreement": agree / max(len(sample), 1),
            "failed": run.failed,
        }
    finally:
        stop_all([p for p, _ in procs], timeout=10)


async def fakes(replicas: int) -> tuple[list[str], list[Any]]:
    """Fake vLLM servers on 127.0.0.1 (the test suite's), their prefix cache timed."""
    from aiohttp import web

    from tests.fakes.vllm_server import FakeVllm

    urls, runners = [], []
    for _ in range(replicas):
        fake = FakeVllm(prefill=0.0005, chunks=16, event_delay=0.002)
        runner = web.AppRunner(fake.app(), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        urls.append(f"http://127.0.0.1:{port}")
        runners.append(runner)
    return urls, runners


async def main_async(args: argparse.Namespace, work: Path, urls: list[str]) -> None:
    runners: list[Any] = []
    if args.fake:
        urls, runners = await fakes(args.replicas)
    what = " (fake)" if args.fake else " (started here)" if args.serve else ""
    print(f"{len(urls)} replicas{what}; {args.requests} requests "
          f"per workload, {args.concurrency} at a time, {args.max_tokens} tokens each")
    head = ("workload", "mode", "hit rate", "TTFT p50 ms", "TTFT p99 ms", "tokens/s",
            "max÷mean", "agreement", "failed")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            for kind in ("shared", "unique"):
                for mode in args.modes:
                    r = await one_mode(args, work, urls, mode, kind, session)
                    print(f"| {kind} | {mode} | {r['hit_rate']:.1%} | {r['ttft_p50_ms']:.1f} | "
                          f"{r['ttft_p99_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                          f"{r['spread']:.2f} | {r['agreement']:.1%} | {r['failed']:.0f} |",
                          flush=True)
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", default="", help="the vLLM servers, comma-separated")
    parser.add_argument("--model", default="base", help="the model name they serve")
    parser.add_argument("--fake", action="store_true", help="fake vLLM servers (a smoke run)")
    parser.add_argument("--replicas", type=int, default=3, help="with --fake")
    parser.add_argument("--serve", type=int, default=0, metavar="N",
                        help="start N vllm serve replicas of the tiny model and use them")
    parser.add_argument("--max-model-len", type=int, default=2048, help="with --serve")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--agreement", type=int, default=100,
                        help="requests sent to both proxies to compare their choice")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args()
    if not (args.fake or args.urls or args.serve):
        parser.error("give --urls (the vLLM servers), --serve N or --fake")
    work = Path(tempfile.mkdtemp(prefix="proxy-fleet-"))
    urls = [u.strip().rstrip("/") for u in args.urls.split(",") if u.strip()]
    if not args.serve:
        asyncio.run(main_async(args, work, urls))
        return
    replicas.exit_on_sigterm()
    started = time.perf_counter()
    flags = ["--served-model-name", args.model]
    with replicas.replicas(replicas.tiny_model(), args.serve, work, [flags] * args.serve,
                           max_model_len=args.max_model_len) as up:
        print(f"{args.serve} vllm serve replicas up in {time.perf_counter() - started:.0f} s "
              f"(logs in {work})", flush=True)
        asyncio.run(main_async(args, work, [r.url for r in up]))


if __name__ == "__main__":
    main()
