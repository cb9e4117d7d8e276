"""The benchmark users would run: this proxy against a bare pass-through, direct, and LiteLLM.

    python -m bench [--repeats 3] [--duration 10] [--litellm] [--lean]
                    [--instructions] [--markdown FILE] [--smoke]

Starts a fast fake OpenAI upstream (``bench.servers fast``), the bare aiohttp pass-through
(``bench.servers bare``), this proxy configured as users run it (``bench.targets.proxy_config``)
and, with ``--litellm``, LiteLLM's proxy with one worker configured the same way (installed into
``.bench/litellm`` on first use). ``wrk`` drives them on loopback. With two or more CPUs, the load
generator, the upstream and this runner share CPU 0 and the target under test has CPU 1. Each
test point runs every target in turn, ``--repeats`` times; each cell of the table is the median
with the spread (min-max) across repeats, and ratios are of medians from the same run.

Test points: non-streamed answers; streamed answers of 20 chunks sent at once; 500 concurrent
slow streams (20 chunks 20 ms apart), with resident memory per stream; and the time to first
byte of a slow stream, one request at a time, as added time over going direct. ``--instructions``
adds ``bench.instructions``'s callgrind counts (needs valgrind). ``--smoke`` is a seconds-long
run that checks the machinery, not the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httptools

from bench.targets import (
    INBOUND_KEY,
    PATH,
    PUBLIC_MODEL,
    ROOT,
    config_yaml,
    cpu_seconds,
    free_port,
    litellm_config,
    pinned,
    proxy_config,
    python,
    rss_bytes,
    stop_all,
    supports_auth,
    wait_up,
)

LITELLM_VENV = ROOT / ".bench" / "litellm"
#: litellm[proxy] at exact versions with hashes (scripts/lock), so that its figures stay comparable
LITELLM_LOCK = ROOT / "requirements" / "litellm.txt"
WRK_HELP = "wrk not found: install it, e.g. `apt-get update && apt-get install -y wrk` (Debian)"
SLOW = "bench:chunks=20:delay=20"


@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Point:
    name: str
    connections: int
    shape: str | None  # the request's stop sequence (bench.servers), None for non-streamed
    memory: bool = False


@dataclass
class Results:
    #: (point, metric) -> target -> one value per repeat
    values: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, point: str, metric: str, target: str, value: float) -> None:
        self.values.setdefault((point, metric), {}).setdefault(target, []).append(value)


def body(shape: str | None) -> bytes:
    payload: dict[str, object] = {
        "model": PUBLIC_MODEL, "max_tokens": 64, "temperature": 0.2,
        "messages": [{"role": "user", "content": "Tell me something short."}],
    }
    if shape is not None:
        payload["stream"] = True
        payload["stop"] = [shape]
    return json.dumps(payload, separators=(",", ":")).encode()


def lua_script(work: Path, shape: str | None) -> Path:
    path = work / f"wrk-{'plain' if shape is None else shape.replace(':', '-')}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body(shape).decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {INBOUND_KEY}"\n'
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("BENCH %d %d %d %d %d %d %d %d %d\\n",\n'
        "    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,\n"
        "    summary.errors.write, summary.errors.status, summary.errors.timeout,\n"
        "    latency:percentile(50), latency:percentile(99)))\n"
        "end\n"
    )
    return path


@dataclass
class WrkRun:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float


def wrk(url: str, script: Path, connections: int, seconds: int, cpu: int | None) -> WrkRun:
    cmd = pinned(cpu, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                       "-s", str(script), url])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed against {url}: {out.stderr.strip() or out.stdout.strip()}")
    n, duration, *errors, p50, p99 = (int(x) for x in line.split()[1:])
    return WrkRun(n, duration / 1e6, sum(errors), p50 / 1000, p99 / 1000)


class PeakRss:
    """The highest resident memory of a process tree while the block runs (sampled 20/s)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_point(point: Point, targets: list[Target], script: Path, seconds: int,
              wrk_cpu: int | None, results: Results, baseline_rss: dict[str, int]) -> None:
    for target in targets:
        before = cpu_seconds(target.pid)
        with PeakRss(target.pid) as rss:
            run = wrk(target.url, script, point.connections, seconds, wrk_cpu)
        cpu = cpu_seconds(target.pid) - before
        if run.requests == 0:
            results.notes.append(f"{point.name}: no request to {target.name} completed in "
                                 f"{seconds} s ({run.errors} errors)")
            continue
        if run.errors:
            results.notes.append(f"{point.name}: {target.name} had {run.errors} errors "
                                 f"in {run.requests} requests")
        results.add(point.name, "req/s", target.name, run.requests / run.seconds)
        results.add(point.name, "p50 ms", target.name, run.p50_ms)
        results.add(point.name, "p99 ms", target.name, run.p99_ms)
        results.add(point.name, "CPU µs/req", target.name, cpu / run.requests * 1e6)
        if point.memory:
            results.add(point.name, "peak RSS MB", target.name, rss.peak / 2**20)
            results.add(point.name, "RSS KB/stream", target.name,
                        (rss.peak - baseline_rss[target.name]) / point.connections / 1024)


class _FirstByte(asyncio.Protocol):
    """A keep-alive client connection that times each request's first body byte."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.first = 0.0
        self.done: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, chunk: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def ttfb(self, request: bytes) -> float:
        assert self.transport is not None
        self.first, self.done = 0.0, asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        self.transport.write(request)
        status = await asyncio.wait_for(self.done, 30)
        if status != 200:
            raise SystemExit(f"time to first byte: status {status}")
        return self.first - start


async def _ttfb_round(targets: list[Target], count: int) -> dict[str, float]:
    """Median time to first byte of a slow stream per target, requests interleaved."""
    loop = asyncio.get_running_loop()
    conns: dict[str, _FirstByte] = {}
    payload = body(SLOW)
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for target in targets:
            port = int(target.url.split(":")[2].split("/")[0])
            _, conns[target.name] = await loop.create_connection(_FirstByte, "127.0.0.1", port)
        for _ in range(count):
            for target in targets:
                request = (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           f"Authorization: Bearer {INBOUND_KEY}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(payload)}"
                           "\r\n\r\n").encode() + payload
                times[target.name].append(await conns[target.name].ttfb(request))
    finally:
        for conn in conns.values():
            if conn.transport is not None:
                conn.transport.close()
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def ensure_litellm() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing {LITELLM_LOCK.relative_to(ROOT)} into {LITELLM_VENV} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "--no-deps",
                    "--require-hashes", "-r", str(LITELLM_LOCK)], check=True)
    return exe


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


def fmt(value: float) -> str:
    if value >= 999.5:
        return f"{value:,.0f}"
    if value >= 99.95:
        return f"{value:.0f}"
    if value >= 9.995:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(values: list[float] | None) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def ratio(top: list[float] | None, bottom: list[float] | None) -> str:
    if not top or not bottom or statistics.median(bottom) == 0:
        return ""
    return f"{statistics.median(top) / statistics.median(bottom):.2f}x"


def table(results: Results, names: list[str]) -> list[list[str]]:
    litellm, lean = "litellm" in names, "bare-lean" in names
    head = ["test", "metric", *names, "ours÷bare", "ours÷direct", "bare÷direct"]
    if lean:
        head += ["bare-lean÷bare", "ours÷bare-lean"]
    if litellm:
        head.append("litellm÷ours")
    rows = [head]
    for (point, metric), by_target in results.values.items():
        row = [point, metric, *(cell(by_target.get(n)) for n in names),
               ratio(by_target.get("ours"), by_target.get("bare")),
               ratio(by_target.get("ours"), by_target.get("direct")),
               ratio(by_target.get("bare"), by_target.get("direct"))]
        if lean:
            row.append(ratio(by_target.get("bare-lean"), by_target.get("bare")))
            row.append(ratio(by_target.get("ours"), by_target.get("bare-lean")))
        if litellm:
            row.append(ratio(by_target.get("litellm"), by_target.get("ours")))
        rows.append(row)
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def render_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each target per point")
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per run")
    parser.add_argument("--connections", type=int, default=32,
                        help="wrk connections for the non-streamed and streamed points")
    parser.add_argument("--streams", type=int, default=500, help="concurrent slow streams")
    parser.add_argument("--ttfb-requests", type=int, default=20,
                        help="slow streams per target per repeat for time to first byte")
    parser.add_argument("--litellm", action="store_true",
                        help="also LiteLLM's proxy (requirements/litellm.txt, into .bench/)")
    parser.add_argument("--lean", action="store_true",
                        help="also the bare pass-through on the lean upstream client")
    parser.add_argument("--instructions", action="store_true",
                        help="add bench.instructions's callgrind counts (needs valgrind)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table here")
    parser.add_argument("--set", action="append", default=[], metavar="YAML_LINE",
                        help="extra top-level config line for this proxy")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run: 1 repeat, 1 s per run, few streams")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.duration, args.streams, args.ttfb_requests = 1, 1, 50, 3
    if shutil.which("wrk") is None:
        raise SystemExit(WRK_HELP)
    if args.instructions and shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind: `apt-get install -y valgrind` (Debian)")
    cpus = os.sched_getaffinity(0)
    pin = len(cpus) >= 2 and shutil.which("taskset") is not None
    load_cpu, target_cpu = (sorted(cpus)[0], sorted(cpus)[1]) if pin else (None, None)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})  # this runner (TTFB client) beside the load
    litellm_exe = ensure_litellm() if args.litellm else None

    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    py = python()
    try:
        up_port = free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(start(pinned(load_cpu, [py, "-m", "bench.servers", "fast", str(up_port)]),
                           work / "upstream.log"))
        wait_up(upstream + "/", procs[-1])
        targets = [Target("direct", upstream + PATH, procs[-1])]

        bare_port = free_port()
        procs.append(start(pinned(target_cpu, [py, "-m", "bench.servers", "bare",
                                               str(bare_port), upstream]), work / "bare.log"))
        wait_up(f"http://127.0.0.1:{bare_port}/", procs[-1])
        targets.append(Target("bare", f"http://127.0.0.1:{bare_port}{PATH}", procs[-1]))

        if args.lean:
            lean_port = free_port()
            procs.append(start(pinned(target_cpu, [py, "-m", "bench.servers", "bare-lean",
                                                   str(lean_port), upstream]),
                               work / "bare-lean.log"))
            wait_up(f"http://127.0.0.1:{lean_port}/", procs[-1])
            targets.append(Target("bare-lean", f"http://127.0.0.1:{lean_port}{PATH}",
                                  procs[-1]))

        auth = supports_auth()
        ours = [("ours", args.set)]
        for name, lines in ours:
            ours_port = free_port()
            config = work / f"{name}.yaml"
            config.write_text(config_yaml(proxy_config(upstream, ours_port, auth=auth), lines))
            procs.append(start(pinned(target_cpu, [py, "-m", "proxy", "serve", "-c",
                                                   str(config)]), work / f"{name}.log"))
            wait_up(f"http://127.0.0.1:{ours_port}/healthz", procs[-1])
            targets.append(Target(name, f"http://127.0.0.1:{ours_port}{PATH}", procs[-1]))

        if litellm_exe is not None:
            lite_port = free_port()
            lite_config = work / "litellm.yaml"
            lite_config.write_text(json.dumps(litellm_config(upstream), indent=1))
            env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                   "LITELLM_TELEMETRY": "False"}
            procs.append(start(pinned(target_cpu, [
                str(litellm_exe), "--config", str(lite_config), "--host", "127.0.0.1",
                "--port", str(lite_port), "--num_workers", "1"]), work / "litellm.log", env))
            wait_up(f"http://127.0.0.1:{lite_port}/health/liveliness", procs[-1], tries=2400)
            targets.append(Target("litellm", f"http://127.0.0.1:{lite_port}{PATH}", procs[-1]))
        names = [t.name for t in targets]

        points = [Point("non-streamed", args.connections, None),
                  Point("streamed, 20 chunks", args.connections, "bench:chunks=20"),
                  Point(f"{args.streams} slow streams", args.streams, SLOW, memory=True)]
        scripts = {p.name: lua_script(work, p.shape) for p in points}
        results = Results()
        started = datetime.datetime.now(datetime.UTC)
        pinning = f"load+upstream CPU {load_cpu}, target CPU {target_cpu}" if pin else "none"
        print(f"{machine()}; pinning: {pinning}; inbound auth {'on' if auth else 'off'}",
              flush=True)
        for point in points:  # warm-up: every target, every shape
            for target in targets:
                wrk(target.url, scripts[point.name], min(point.connections, 32), 1, load_cpu)
        baseline_rss = {t.name: rss_bytes(t.pid) for t in targets}
        for repeat in range(args.repeats):
            for point in points:
                print(f"repeat {repeat + 1}/{args.repeats}: {point.name}", flush=True)
                run_point(point, targets, scripts[point.name], args.duration, load_cpu,
                          results, baseline_rss)
            ttfb = asyncio.run(_ttfb_round(targets, args.ttfb_requests))
            for name, ms in ttfb.items():
                results.add("slow stream, 1 at a time", "TTFB ms", name, ms)
                if name != "direct":
                    results.add("slow stream, 1 at a time", "added TTFB ms", name,
                                ms - ttfb["direct"])
        if args.instructions:
            from bench.instructions import TARGETS, instruction_counts

            requests = 100 if args.smoke else 600
            counted = tuple(name for name in names if name in TARGETS)
            for point, stream in (("non-streamed", False), ("streamed, 20 chunks", True)):
                print(f"instructions: {point} (callgrind, {requests} requests)", flush=True)
                counts, _ = instruction_counts(requests, stream, args.set, counted)
                for name, value in counts.items():
                    results.add(point, "instructions/req", name, value)
            results.notes.append("instructions/req: `python -m bench.instructions` (callgrind, "
                                 "aiohttp upstream; its streams are 16 events)")
    finally:
        stop_all(procs)

    rows = table(results, names)
    header = (f"{started:%Y-%m-%d %H:%M} UTC; {machine()}; `python -m bench "
              f"{' '.join(sys.argv[1:])}`; {args.repeats} repeats x {args.duration} s; "
              "cells: median (min-max)")
    print()
    print(header)
    print(render_text(rows))
    for note in results.notes:
        print("note:", note)
    if args.markdown is not None:
        notes = "".join(f"\n- {n}" for n in results.notes)
        args.markdown.write_text(f"{header}\n\n{render_markdown(rows)}\n{notes}\n")


if __name__ == "__main__":
    main()
