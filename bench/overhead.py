"""CPU per request of the proxy against a bare aiohttp pass-through proxy, in one run.

    python -m bench.overhead [--requests 4000] [--rounds 5] [--concurrency 16]

Both proxies forward to the same fast fake upstream; a separate process makes the load. The
figure is the proxy process's own CPU time (user + system, from /proc) per request, so other
load on the machine changes it little. Rounds alternate between the two proxies and the
medians are compared. The proxy runs with its features on: model rewrite, upstream key
injection, inbound API key auth, metrics, access log (to a file), retries and limits.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLOCK = os.sysconf("SC_CLK_TCK")
INBOUND_KEY = "bench-inbound-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)  # loopback only
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status: it is serving
                return
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def config_text(upstream: str, port: int, auth: bool, extra: list[str]) -> str:
    lines = [
        "backend_provider: custom",
        f"url: {upstream}",
        "api_key: upstream-key",
        "model_name_alias: bench-upstream",
        "model: {name: bench}",
        f"server: {{port: {port}}}",
        "retries: {attempts: 3}",
        "limits: {max_concurrency: 256, max_queue: 256}",
        # text, as on a terminal: format auto would pick JSON (stderr is not one here)
        "logging: {access_log: true, format: text}",
    ]
    if auth:
        lines.append(f"auth: {{api_keys: [{INBOUND_KEY}]}}")
    for line in extra:
        key = line.split(":", 1)[0]
        lines = [old for old in lines if not old.startswith(key + ":")] + [line]
    return "\n".join(lines) + "\n"


def supports_auth() -> bool:
    from proxy.config import AuthSection

    return "api_keys" in AuthSection.model_fields and _auth_enforced()


def _auth_enforced() -> bool:
    try:
        import proxy.auth.inbound  # noqa: F401
    except ImportError:
        return False
    return True


def load(url: str, count: int, concurrency: int, stream: bool, auth: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", url, str(count), str(concurrency),
         "1" if stream else "0", auth],
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
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
