"""Instructions per request of each proxy process, counted by valgrind's callgrind.

    python -m bench.instructions [--requests 600] [--stream | --slow] [--lean] [--core]
                                 [--only TARGET ...] [--set YAML_LINE ...]

A second figure beside ``bench.overhead``'s CPU time: instruction counts do not move with
the machine's other load, so small differences show. Each proxy (the bare aiohttp
pass-through, then this project's proxy with its features on) runs alone under callgrind;
counting is switched on only around a fixed batch of requests, after a warm-up. Needs
valgrind (Debian package ``valgrind``). Slow: a minute or two per proxy.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.overhead import INBOUND_KEY, config_text, free_port, load, supports_auth, wait_up


def count(cmd: list[str], url: str, health: str, requests: int, stream: bool | str, key: str,
          work: Path, name: str) -> float:
    out = work / f"callgrind.{name}.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):  # start-up under valgrind takes a while
            try:
                wait_up(health, proc)
                break
            except SystemExit:
                if proc.poll() is not None:
                    raise
                time.sleep(0.5)
        load(url, 200, 8, stream, key)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       capture_output=True)
        load(url, requests, 8, stream, key)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       capture_output=True)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    text = out.read_text(errors="replace")
    # with collection toggled on and off, "summary:" stays 0 and "totals:" holds the count
    match = re.search(r"^totals:\s+(\d+)", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no instruction total in {out}")
    return int(match.group(1)) / requests


#: What can be counted: the bare pass-through (on aiohttp's client, and on the proxy's own
#: upstream client), this proxy with every optional feature off (``ours-core``), and this
#: proxy as users run it.
TARGETS = ("bare", "bare-lean", "ours-core", "ours")

#: ``ours-core``: the config lines that turn off what a node may go without (inbound keys, the
#: access log, the model alias, retries), leaving what every request pays for: the request
#: checks, request ids, admission, the upstream client, usage and metrics.
CORE = [
    "auth: {}",
    'logging: {"access_log": false, "format": "json"}',
    "model_name_alias: null",
    "model: {}",
    'retries: {"attempts": 1}',
]


def instruction_counts(
    requests: int, stream: bool | str, extra: list[str],
    targets: tuple[str, ...] = ("bare", "ours"),
) -> tuple[dict[str, float], bool]:
    """Instructions per request of each of ``targets`` (names from :data:`TARGETS`, counted
    in that order), and whether inbound auth was on. ``stream``: streamed answers, or
    ``"slow"``: streams whose chunks arrive one at a time (``bench.load``)."""
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="proxy-instr-"))
    up_port = free_port()
    # the slow shape needs the upstream that reads it; the others keep the aiohttp upstream
    kind = "fast" if stream == "slow" else "upstream"
    upstream_proc = subprocess.Popen([py, "-m", "bench.servers", kind, str(up_port)])
    upstream = f"http://127.0.0.1:{up_port}"
    path = "/v1/chat/completions"
    counts: dict[str, float] = {}
    auth = supports_auth()
    try:
        wait_up(upstream + "/", upstream_proc)
        for name in (n for n in TARGETS if n in targets):
            port = free_port()
            if name.startswith("bare"):
                counts[name] = count([py, "-m", "bench.servers", name, str(port), upstream],
                                     f"http://127.0.0.1:{port}{path}",
                                     f"http://127.0.0.1:{port}/", requests, stream, "", work,
                                     name)
                continue
            core = name == "ours-core"
            config = work / f"{name}.yaml"
            config.write_text(config_text(upstream, port, auth, [*extra, *CORE] if core else extra))
            counts[name] = count([py, "-m", "proxy", "serve", "-c", str(config)],
                                 f"http://127.0.0.1:{port}{path}",
                                 f"http://127.0.0.1:{port}/healthz", requests, stream,
                                 INBOUND_KEY if auth and not core else "", work, name)
    finally:
        upstream_proc.terminate()
        upstream_proc.wait(timeout=10)
    return counts, auth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--stream", action="store_true", help="streamed answers (SSE)")
    parser.add_argument("--slow", action="store_true",
                        help="streamed answers of 20 chunks 5 ms apart, each arriving alone")
    parser.add_argument("--set", action="append", default=[], metavar="YAML_LINE")
    parser.add_argument("--lean", action="store_true",
                        help="also the bare pass-through on the lean upstream client")
    parser.add_argument("--core", action="store_true",
                        help="also this proxy with every optional feature off (ours-core)")
    parser.add_argument("--only", action="append", choices=TARGETS, metavar="TARGET",
                        help=f"count only these ({', '.join(TARGETS)}); repeatable")
    args = parser.parse_args()
    if args.only:
        targets = tuple(args.only)
    else:
        targets = ("bare", *(("bare-lean",) if args.lean else ()),
                   *(("ours-core",) if args.core else ()), "ours")
    stream: bool | str = "slow" if args.slow else args.stream
    counts, auth = instruction_counts(args.requests, stream, args.set, targets)
    kind = "slow stream" if args.slow else "stream" if args.stream else "non-stream"
    print(f"{kind}: {args.requests} requests; inbound auth {'on' if auth else 'off'}")
    lean = "bare-lean" in counts
    print(f"{'proxy':<14}{'instructions/req':>18}{'÷ bare':>9}"
          + (f"{'÷ bare-lean':>13}" if lean else ""))
    for name, value in counts.items():
        ratio = f"{value / counts['bare']:>9.3f}" if "bare" in counts else ""
        if lean:
            ratio += f"{value / counts['bare-lean']:>13.3f}"
        print(f"{name:<14}{value:>18,.0f}{ratio}")


if __name__ == "__main__":
    main()
