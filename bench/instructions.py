"""Instructions per request of each proxy process, counted by valgrind's callgrind.

    python -m bench.instructions [--requests 600]

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


def count(cmd: list[str], url: str, health: str, requests: int, stream: bool, key: str,
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


def per_request(requests: int, stream: bool,
                extra: list[str] = ()) -> tuple[float, float, bool]:  # type: ignore[assignment]
    """Instructions per request of the bare pass-through and of the proxy, and whether inbound
    auth was on."""
    bare, ours, auth, _ = instruction_counts(requests, stream, list(extra), lean=False)
    return bare, ours, auth


def instruction_counts(requests: int, stream: bool, extra: list[str],
            lean: bool) -> tuple[float, float, bool, float | None]:
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="proxy-instr-"))
    up_port = free_port()
    upstream_proc = subprocess.Popen([py, "-m", "bench.servers", "upstream", str(up_port)])
    upstream = f"http://127.0.0.1:{up_port}"
    try:
        wait_up(upstream + "/", upstream_proc)
        path = "/v1/chat/completions"
        bare_port, ours_port = free_port(), free_port()
        bare = count([py, "-m", "bench.servers", "bare", str(bare_port), upstream],
                     f"http://127.0.0.1:{bare_port}{path}", f"http://127.0.0.1:{bare_port}/",
                     requests, stream, "", work, "bare")
        lean_count = None
        if lean:
            lean_port = free_port()
            lean_count = count([py, "-m", "bench.servers", "bare-lean", str(lean_port), upstream],
                               f"http://127.0.0.1:{lean_port}{path}",
                               f"http://127.0.0.1:{lean_port}/", requests, stream, "", work,
                               "bare-lean")
        auth = supports_auth()
        config = work / "model_backend.yaml"
        config.write_text(config_text(upstream, ours_port, auth, extra))
        ours = count([py, "-m", "proxy", "serve", "-c", str(config)],
                     f"http://127.0.0.1:{ours_port}{path}",
                     f"http://127.0.0.1:{ours_port}/healthz", requests, stream,
                     INBOUND_KEY if auth else "", work, "proxy")
    finally:
        upstream_proc.terminate()
        upstream_proc.wait(timeout=10)
    return bare, ours, auth, lean_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--stream", action="store_true", help="streamed answers (SSE)")
    parser.add_argument("--set", action="append", default=[], metavar="YAML_LINE")
    parser.add_argument("--lean", action="store_true",
                        help="also the bare pass-through on the lean upstream client prototype")
    args = parser.parse_args()
    bare, ours, auth, lean = instruction_counts(args.requests, args.stream, args.set, args.lean)
    kind = "stream" if args.stream else "non-stream"
    print(f"{kind}: {args.requests} requests; inbound auth {'on' if auth else 'off'}")
    print(f"{'proxy':<8}{'instructions/req':>18}")
    print(f"{'bare':<8}{bare:>18,.0f}")
    print(f"{'ours':<8}{ours:>18,.0f}")
    print(f"ratio   {ours / bare:>18.3f}")
    if lean is not None:
        print(f"{'bare-lean':<10}{lean:>16,.0f}")
        print(f"bare-lean / bare {lean / bare:>9.3f}")


if __name__ == "__main__":
    main()
