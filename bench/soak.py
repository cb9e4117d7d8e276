"""Soak: many mixed requests through a real proxy process; its memory sampled along the way.

    python -m bench.soak [--requests 200000] [--warmup 20000] [--every 20000]
                         [--concurrency 32] [--reload-every 100000] [--tracemalloc] [--trim]
                         [--env NAME=VALUE] [--seconds 3600] [--top 12] [--work DIR]

The proxy runs as ``python -m proxy serve`` (configured as ``bench.overhead`` runs it: model
rewrite, upstream key, inbound API keys, metrics, access log to a file, retries, limits) in
front of a fast fake upstream process; this process makes the load, on 127.0.0.1 only. The
requests cycle through a fixed mix (:data:`MIX`): plain and streamed chat, embeddings, streams
the client abandons after the first event, client errors (bad JSON, a missing field, an
unknown model, a missing key, an unknown path), upstream errors (a 500, a connection reset
before the answer, retried and then a 502, a stream broken part-way) and, every
``--reload-every`` requests, a SIGHUP that reloads a changed configuration under load.

The load pauses at every ``--every`` requests (and after ``--warmup``): the proxy's resident
memory is read from ``/proc/PID/status`` (VmRSS, and RssAnon: its heap part, the one a leak
grows; VmRSS also counts file-backed pages that come and go with other processes' needs), and with
``--tracemalloc`` the proxy (``MODEL_PROXY_TRACEMALLOC``, see ``proxy.server.debug``) writes an
allocation snapshot; at the end the allocations that grew most, by traceback, are printed
between the warm-up snapshot and the last one. Tracing slows the proxy several times over,
so its RSS figures include the tracer's own bookkeeping; measure RSS without it.

Every answer is checked against what its kind must get; anything else is counted as
``unexpected`` and the exit status is 1. ``--seconds`` bounds the run: the load stops there
and the report says how many requests were made.

The slow test (``tests/test_soak.py``) runs a short soak. The long, manual run:

    python -m bench.soak --requests 1000000 --warmup 100000 --every 100000
    python -m bench.soak --requests 1000000 --warmup 100000 --every 100000 --tracemalloc
    python -m bench.soak --requests 1000000 --warmup 100000 --every 100000 --trim
    python -m bench.soak --requests 1000000 --env MALLOC_ARENA_MAX=2   # allocator settings

``--trim`` has the proxy call ``malloc_trim(0)`` after each sample (``MODEL_PROXY_MALLOC_TRIM``)
and samples again: memory the C allocator keeps free but resident shows as the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

from bench.overhead import INBOUND_KEY, config_text, free_port, wait_up
from bench.targets import stop_all

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
#: Seconds the load rests before a sample: abandoned streams finish their clean-up.
SETTLE_SECONDS = 0.5
#: Longest wait for the proxy to write one allocation snapshot.
SNAPSHOT_SECONDS = 300.0

ANSWER = (b'{"id":"chatcmpl-soak","object":"chat.completion","created":1,"model":"soak-upstream",'
          b'"choices":[{"index":0,"message":{"role":"assistant","content":"fine"},'
          b'"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,'
          b'"total_tokens":4}}')
EMBEDDING = (b'{"object":"list","model":"soak-upstream",'
             b'"data":[{"object":"embedding","index":0,"embedding":[0.5]}],'
             b'"usage":{"prompt_tokens":1,"total_tokens":1}}')
EVENT = (b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","created":1,'
         b'"model":"soak-upstream","choices":[{"index":0,"delta":{"content":" w"},'
         b'"finish_reason":null}]}\n\n')
DONE = b"data: [DONE]\n\n"
#: What the client gets: the same bytes, naming the model it asked for (the proxy's echo).
ANSWERED, EMBEDDED, RELAYED_EVENT = (
    part.replace(b'"model":"soak-upstream"', b'"model":"bench"')
    for part in (ANSWER, EMBEDDING, EVENT)
)
UPSTREAM_ERROR = b'{"error":{"message":"soak upstream failure","type":"server_error"}}'


# --- the fake upstream (its own process: python -m bench.soak upstream PORT) -------------

def upstream_app() -> web.Application:
    """A fast OpenAI-ish upstream; a marker in the request body picks a failure."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b"soak:" in body:
            if b"soak:500" in body:
                return web.Response(status=500, body=UPSTREAM_ERROR,
                                    content_type="application/json")
            if b"soak:reset" in body:
                _abort(request)
                return web.Response()
        if b'"stream":true' not in body:
            return web.Response(body=ANSWER, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if b"soak:break" in body:
            await response.write(EVENT)
            _abort(request)
            return response
        for _ in range(8):
            await response.write(EVENT)
        await response.write(DONE)
        await response.write_eof()
        return response

    async def embeddings(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=EMBEDDING, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    return app


def _abort(request: web.Request) -> None:
    assert request.transport is not None
    request.transport.abort()


# --- the load ----------------------------------------------------------------------------

@dataclass
class Client:
    session: aiohttp.ClientSession
    base: str
    headers: dict[str, str]


def chat_body(n: int, *, stream: bool = False, marker: str = "", model: str = "bench") -> bytes:
    text = f"q{n} {marker}".strip()
    tail = ',"stream":true' if stream else ""
    return (f'{{"model":"{model}","messages":[{{"role":"user","content":"{text}"}}]{tail}}}'
            .encode())


async def post(client: Client, n: int, body: bytes, path: str = "/v1/chat/completions",
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    sent = {**client.headers, "X-Request-Id": f"soak-{n}"} if headers is None else headers
    async with client.session.post(client.base + path, data=body, headers=sent) as resp:
        return resp.status, await resp.read()


async def chat(client: Client, n: int) -> bool:
    status, body = await post(client, n, chat_body(n))
    return status == 200 and body == ANSWERED


async def stream(client: Client, n: int) -> bool:
    status, body = await post(client, n, chat_body(n, stream=True))
    return status == 200 and body == RELAYED_EVENT * 8 + DONE


async def embeddings(client: Client, n: int) -> bool:
    status, body = await post(client, n, b'{"model":"bench","input":"x"}', "/v1/embeddings")
    return status == 200 and body == EMBEDDED


async def abandon(client: Client, n: int) -> bool:
    """The client goes away after the first event of a stream."""
    resp = await client.session.post(client.base + "/v1/chat/completions",
                                     data=chat_body(n, stream=True), headers=client.headers)
    first = await resp.content.readline()
    resp.close()
    return resp.status == 200 and first.startswith(b"data: ")


async def client_error(client: Client, n: int) -> bool:
    """One of five refusals the proxy makes itself, without asking the upstream."""
    case = (n // len(MIX)) % 5
    if case == 0:
        status, _ = await post(client, n, b'{"model": "bench", "messages": [')
        return status == 400
    if case == 1:
        status, _ = await post(client, n, b'{"model":"bench"}')
        return status == 400
    if case == 2:
        status, _ = await post(client, n, chat_body(n, model=f"other-{n}"))
        return status == 404
    if case == 3:
        status, _ = await post(client, n, chat_body(n), headers={"Content-Type": "text/plain"})
        return status == 401
    async with client.session.get(f"{client.base}/nope/{n}", headers=client.headers) as resp:
        await resp.read()
        return resp.status == 404


async def upstream_500(client: Client, n: int) -> bool:
    status, body = await post(client, n, chat_body(n, marker="soak:500"))
    return status == 500 and body == UPSTREAM_ERROR


async def upstream_reset(client: Client, n: int) -> bool:
    """Reset before the answer: retried, reset again, then the proxy's 502."""
    status, body = await post(client, n, chat_body(n, marker="soak:reset"))
    return status == 502 and b'"error"' in body


async def stream_break(client: Client, n: int) -> bool:
    """A stream the upstream breaks after one event: the proxy ends it with an error event."""
    status, body = await post(client, n, chat_body(n, stream=True, marker="soak:break"))
    return (status == 200 and body.startswith(RELAYED_EVENT) and b'"error"' in body
            and DONE not in body)


Kind = Callable[[Client, int], Awaitable[bool]]
#: One cycle of the load; request ``n`` is of kind ``MIX[n % len(MIX)]``.
MIX: tuple[Kind, ...] = (
    chat, stream, chat, stream, chat, embeddings, chat, stream, chat, abandon,
    chat, stream, client_error, chat, stream, upstream_500, chat, upstream_reset, stream,
    stream_break,
)


# --- the run -----------------------------------------------------------------------------

@dataclass
class Sample:
    requests: int
    seconds: float
    rss: int
    rss_anon: int
    #: VmRSS once the C allocator has handed its free memory back (``--trim``).
    rss_trimmed: int | None = None
    snapshot: Path | None = None


@dataclass
class Report:
    requests: int
    warmup: int
    samples: list[Sample] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    reloads: int = 0
    metrics: str = ""

    @property
    def unexpected(self) -> int:
        return sum(count for name, count in self.outcomes.items() if name.endswith("!"))

    def at(self, requests: int) -> Sample:
        """The first sample at or after ``requests`` (the last one, in a run cut short)."""
        return next((s for s in self.samples if s.requests >= requests), self.samples[-1])

    @property
    def growth(self) -> int:
        """VmRSS growth from the end of the warm-up to the last sample, in bytes."""
        return self.samples[-1].rss - self.at(self.warmup).rss

    @property
    def growth_anon(self) -> int:
        """RssAnon growth over the same span: the heap, without the file-backed pages (code,
        shared libraries) that the kernel drops and reads back when other processes need
        memory, which moves VmRSS by megabytes either way on a busy machine."""
        return self.samples[-1].rss_anon - self.at(self.warmup).rss_anon

    def table(self) -> str:
        base = self.at(self.warmup)
        lines = [f"{'requests':>10}{'seconds':>9}{'VmRSS MiB':>11}{'RssAnon MiB':>13}"
                 f"{'since warm-up (both)':>22}{'trimmed MiB':>13}"]
        for s in self.samples:
            since = (f"{(s.rss - base.rss) / MIB:+.2f} {(s.rss_anon - base.rss_anon) / MIB:+.2f}"
                     if s.requests >= self.warmup else "")
            trimmed = f"{s.rss_trimmed / MIB:.2f}" if s.rss_trimmed is not None else ""
            lines.append(f"{s.requests:>10}{s.seconds:>9.0f}{s.rss / MIB:>11.2f}"
                         f"{s.rss_anon / MIB:>13.2f}{since:>22}{trimmed:>13}")
        return "\n".join(lines)


def memory(pid: int) -> tuple[int, int]:
    """VmRSS and RssAnon of ``pid``, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


def points(requests: int, warmup: int, every: int) -> list[int]:
    """Where the load pauses for a sample: 0, the end of the warm-up, every ``every``, end."""
    return sorted({0, min(warmup, requests), *range(every, requests, every), requests})


@dataclass
class Run:
    """The processes of one soak and what the load needs to know about them."""

    work: Path
    upstream: str
    port: int
    proxy: subprocess.Popen[bytes]
    reload_every: int
    reloads: int = 0

    @property
    def config(self) -> Path:
        return self.work / "model_backend.yaml"

    def reload(self, n: int) -> None:
        """Change the configuration file and have the proxy reload it (SIGHUP)."""
        write_config(self.config, self.upstream, self.port, n // self.reload_every)
        os.kill(self.proxy.pid, signal.SIGHUP)
        self.reloads += 1


def soak(
    requests: int,
    *,
    warmup: int,
    every: int,
    work: Path,
    concurrency: int = 32,
    reload_every: int = 100_000,
    trace: bool = False,
    trim: bool = False,
    env: dict[str, str] | None = None,
    seconds: float = 3600.0,
    progress: Callable[[Sample], None] | None = None,
) -> Report:
    """Start the processes (files in ``work``), run the load, stop them; the report."""
    procs: list[subprocess.Popen[bytes]] = []
    up_port, port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    write_config(work / "model_backend.yaml", upstream, port, 0)
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if trace:
        child_env["MODEL_PROXY_TRACEMALLOC"] = str(work / "snapshots")
    if trim:
        child_env["MODEL_PROXY_MALLOC_TRIM"] = "1"
    try:
        with (work / "upstream.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.soak", "upstream", str(up_port)],
                stdout=log, stderr=log, env=child_env))
        wait_up(upstream + "/v1/models", procs[-1])
        with (work / "proxy.log").open("wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "-c", str(work / "model_backend.yaml")],
                stdout=log, stderr=log, env=child_env, cwd=work))
        wait_up(f"http://127.0.0.1:{port}/healthz", procs[-1])
        run = Run(work, upstream, port, procs[-1], reload_every)
        report = Report(requests, warmup)
        uvloop.run(load(run, report, every=every, concurrency=concurrency, trace=trace,
                        trim=trim, seconds=seconds, progress=progress))
        return report
    finally:
        stop_all(procs, timeout=30)


async def load(run: Run, report: Report, *, every: int, concurrency: int, trace: bool,
               trim: bool, seconds: float, progress: Callable[[Sample], None] | None) -> None:
    """The requests, paused at every sample point; fills in ``report``."""
    base = f"http://127.0.0.1:{run.port}"
    started = time.monotonic()
    deadline = started + seconds
    done = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = Client(session, base, {"Content-Type": "application/json",
                                        "Authorization": f"Bearer {INBOUND_KEY}"})
        for stop in points(report.requests, report.warmup, every):
            if done < stop:
                done = await drive(client, done, stop, concurrency=concurrency,
                                   deadline=deadline, outcomes=report.outcomes,
                                   reload_every=run.reload_every, reload=run.reload)
                await asyncio.sleep(SETTLE_SECONDS)
            rss, anon = memory(run.proxy.pid)
            sample = Sample(done, time.monotonic() - started, rss, anon)
            if trim:
                os.kill(run.proxy.pid, signal.SIGUSR2)
                await asyncio.sleep(SETTLE_SECONDS)
                sample.rss_trimmed = memory(run.proxy.pid)[0]
            if trace:
                sample.snapshot = await snapshot(run.proxy, run.work / "snapshots",
                                                 len(report.samples))
            report.samples.append(sample)
            if progress is not None:
                progress(sample)
            if done < stop:
                break  # out of time
        async with session.get(base + "/metrics") as resp:
            report.metrics = await resp.text()
    report.requests = done
    report.reloads = run.reloads


async def drive(client: Client, start: int, stop: int, *, concurrency: int, deadline: float,
                outcomes: dict[str, int], reload_every: int, reload: Callable[[int], None]) -> int:
    """Requests ``start`` to ``stop`` (fewer past ``deadline``); returns how far it got."""
    numbers = iter(range(start, stop))
    made = start

    async def worker() -> None:
        nonlocal made
        for n in numbers:
            if reload_every and n and n % reload_every == 0:
                reload(n)
            kind = MIX[n % len(MIX)]
            try:
                ok = await kind(client, n)
            except aiohttp.ClientError as exc:
                ok, name = False, f"{kind.__name__} {type(exc).__name__}!"
            else:
                name = kind.__name__ if ok else f"{kind.__name__}!"
            outcomes[name] = outcomes.get(name, 0) + 1
            made += 1
            if time.monotonic() > deadline:
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return made


def write_config(path: Path, upstream: str, port: int, generation: int) -> None:
    """The proxy's configuration; each reload changes ``limits.max_queue`` by one."""
    extra = [
        f"limits: {{max_concurrency: 256, max_queue: {256 + generation % 2}}}",
        # Resets are retried once, quickly; the breaker counts but does not open on the mix.
        "retries: {attempts: 2, backoff_initial: 0.001, backoff_max: 0.002}",
        "circuit: {failures: 50}",
    ]
    path.write_text(config_text(upstream, port, True, extra))


async def snapshot(proxy: subprocess.Popen[bytes], folder: Path, number: int) -> Path:
    """Have the proxy write its allocation snapshot ``number``; wait for the file."""
    path = folder / f"snapshot-{number:04d}.tracemalloc"
    os.kill(proxy.pid, signal.SIGUSR1)
    deadline = time.monotonic() + SNAPSHOT_SECONDS
    while not path.exists():
        if proxy.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the proxy wrote no snapshot {path.name}")
        await asyncio.sleep(0.1)
    return path


#: Allocations that are the tracing itself, not the proxy's.
TRACE_NOISE = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "*/linecache.py"),
    tracemalloc.Filter(False, "*/proxy/server/debug.py"),
)


def growth(before: Path, after: Path, top: int, frames: int = 8) -> list[str]:
    """The ``top`` allocation sites (by traceback) that grew most from ``before`` to ``after``."""
    old = tracemalloc.Snapshot.load(str(before)).filter_traces(TRACE_NOISE)
    new = tracemalloc.Snapshot.load(str(after)).filter_traces(TRACE_NOISE)
    stats = sorted(new.compare_to(old, "traceback"), key=lambda s: s.size_diff, reverse=True)
    total = sum(s.size_diff for s in stats)
    lines = [f"traced memory {sum(s.size for s in stats) / MIB:.2f} MiB, "
             f"{total / 1024:+.1f} KiB net between {before.name} and {after.name}"]
    for stat in stats[:top]:
        if stat.size_diff <= 0:
            break
        lines.append(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks "
                     f"(now {stat.size / 1024:.1f} KiB in {stat.count})")
        lines.extend("      " + line.strip() for line in
                     stat.traceback.format(limit=frames, most_recent_first=True)
                     if line.startswith("  File"))
    return lines


def main() -> int:
    if sys.argv[1:2] == ["upstream"]:
        uvloop.install()
        web.run_app(upstream_app(), host="127.0.0.1", port=int(sys.argv[2]), access_log=None,
                    print=None, handler_cancellation=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=20_000, help="requests between samples")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reload-every", type=int, default=100_000, help="0: never")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="allocation snapshots in the proxy at every sample")
    parser.add_argument("--trim", action="store_true",
                        help="after each sample, malloc_trim(0) in the proxy and sample again")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the proxy, e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--seconds", type=float, default=3600.0, help="stop the load after")
    parser.add_argument("--top", type=int, default=12, help="growth lines to print")
    parser.add_argument("--work", type=Path, help="folder for config, logs, snapshots")
    args = parser.parse_args()
    # A terminated run still stops its proxy and upstream (the ``finally`` in ``soak``).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = dict(item.split("=", 1) for item in args.env)
    work = args.work or Path(tempfile.mkdtemp(prefix="proxy-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.requests} requests, concurrency {args.concurrency}, work in {work}",
          flush=True)

    def progress(s: Sample) -> None:
        trimmed = f"  trimmed {s.rss_trimmed / MIB:7.2f} MiB" if s.rss_trimmed else ""
        print(f"  {s.requests:>9} requests {s.seconds:7.0f} s  VmRSS {s.rss / MIB:7.2f} MiB  "
              f"RssAnon {s.rss_anon / MIB:7.2f} MiB{trimmed}", flush=True)

    report = soak(
        args.requests, warmup=args.warmup, every=args.every, work=work,
        concurrency=args.concurrency, reload_every=args.reload_every, trace=args.tracemalloc,
        trim=args.trim, env=env, seconds=args.seconds, progress=progress,
    )
    seconds = report.samples[-1].seconds
    print(f"\n{report.requests} requests in {seconds:.0f} s ({report.requests / seconds:.0f}/s),"
          f" {report.reloads} reloads; outcomes {dict(sorted(report.outcomes.items()))}")
    print(report.table())
    print(f"growth after the warm-up ({args.warmup} requests): VmRSS "
          f"{report.growth / MIB:+.2f} MiB, RssAnon {report.growth_anon / MIB:+.2f} MiB")
    start, end = report.at(args.warmup).snapshot, report.samples[-1].snapshot
    if start is not None and end is not None and start != end:
        print("\ntop allocation growth by traceback, warm-up to end:")
        print("\n".join(growth(start, end, args.top)))
    return 1 if report.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
