"""CPU per request of the proxy against a bare aiohttp pass-through proxy, in one run.

    python -m bench.overhead [--requests 4000] [--rounds 5] [--concurrency 16]

Both proxies forward to the same fast fake upstream; a separate process makes the load. The
figure is the proxy process's own CPU time (user + system, from /proc) per request, so other
load on the machine changes it little. Rounds alternate between the two proxies and the
medians are compared. The proxy runs configured as users run it
(``bench.targets.proxy_config``): model rewrite, upstream key injection, inbound API key auth,
metrics, access log (to a file), retries and limits.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.targets import (
    INBOUND_KEY,
    config_yaml,
    cpu_seconds,
    free_port,
    proxy_config,
    stop_all,
    supports_auth,
    wait_up,
)

__all__ = ["INBOUND_KEY", "config_text", "free_port", "load", "supports_auth", "wait_up"]


def config_text(upstream: str, port: int, auth: bool, extra: list[str]) -> str:
    return config_yaml(proxy_config(upstream, port, auth=auth), extra)


def load(url: str, count: int, concurrency: int, stream: bool | str, auth: str) -> None:
    """``count`` requests; ``stream``: streamed, or ``"slow"`` (see ``bench.load``)."""
    mode = stream if isinstance(stream, str) else "1" if stream else "0"
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", url, str(count), str(concurrency), mode, auth],
        check=True, capture_output=True, text=True,
    )
    if out.stdout.strip() != "0":
        raise SystemExit(f"{out.stdout.strip()} requests failed against {url}")


def measure(pid: int, url: str, count: int, concurrency: int, stream: bool, auth: str) -> float:
    before = cpu_seconds(pid)
    load(url, count, concurrency, stream, auth)
    return (cpu_seconds(pid) - before) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="YAML_LINE",
                        help="extra top-level config line for the proxy, e.g. "
                             "'logging: {access_log: false}'")
    args = parser.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    try:
        up_port, bare_port, ours_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        py = sys.executable
        procs.append(subprocess.Popen([py, "-m", "bench.servers", "upstream", str(up_port)]))
        wait_up(upstream + "/", procs[-1])
        procs.append(subprocess.Popen([py, "-m", "bench.servers", "bare", str(bare_port),
                                       upstream]))
        bare = procs[-1]
        auth = supports_auth()
        config = work / "model_backend.yaml"
        config.write_text(config_text(upstream, ours_port, auth, args.set))
        with (work / "proxy.log").open("wb") as log:
            procs.append(subprocess.Popen([py, "-m", "proxy", "serve", "-c", str(config)],
                                          stderr=log))
        ours = procs[-1]
        wait_up(f"http://127.0.0.1:{bare_port}/", bare)
        wait_up(f"http://127.0.0.1:{ours_port}/healthz", ours)
        key = INBOUND_KEY if auth else ""
        path = "/v1/chat/completions"
        print(f"{args.requests} requests x {args.rounds} rounds, concurrency "
              f"{args.concurrency}; inbound auth {'on' if auth else 'not available'}")
        print(f"{'scenario':<12}{'bare µs/req':>14}{'proxy µs/req':>14}{'ratio':>8}")
        for stream in (False, True):
            bare_url, ours_url = (f"http://127.0.0.1:{bare_port}{path}",
                                  f"http://127.0.0.1:{ours_port}{path}")
            load(bare_url, 500, args.concurrency, stream, "")  # warm-up
            load(ours_url, 500, args.concurrency, stream, key)
            bare_cpu, ours_cpu = [], []
            for _ in range(args.rounds):
                bare_cpu.append(measure(bare.pid, bare_url, args.requests, args.concurrency,
                                        stream, ""))
                ours_cpu.append(measure(ours.pid, ours_url, args.requests, args.concurrency,
                                        stream, key))
            b, o = statistics.median(bare_cpu), statistics.median(ours_cpu)
            name = "stream" if stream else "non-stream"
            print(f"{name:<12}{b:>14.1f}{o:>14.1f}{o / b:>8.3f}")
    finally:
        stop_all(procs, timeout=10)


if __name__ == "__main__":
    main()
