"""Where a proxy's CPU goes per request: py-spy samples of one target under wrk load.

    python -m bench.profile [--target ours|bare] [--stream] [--seconds 10] [--top 25]

Starts the fast upstream and the target as ``python -m bench`` does (same configuration and
pinning), drives it with wrk, and samples the target with py-spy (``pip install py-spy``; it
needs ptrace rights, e.g. root). Prints the functions with the most samples, inclusive (on the
stack) and self (at the top), and the share of samples inside aiohttp's client (ClientSession,
its connector, request, response and protocol), i.e. the upstream side, and the share spent in
this project's own functions (self samples in ``proxy/``).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from bench.run import SLOW, lua_script, start, wrk
from bench.targets import (
    PATH,
    config_yaml,
    free_port,
    pinned,
    proxy_config,
    python,
    stop_all,
    supports_auth,
    wait_up,
)

#: aiohttp's client side: a sample with one of these files on its stack is upstream work.
CLIENT_FILES = ("aiohttp/client.py", "aiohttp/connector.py", "aiohttp/client_reqrep.py",
                "aiohttp/client_proto.py")


def frame_file(frame: str) -> str:
    return frame.rsplit("(", 1)[-1].rstrip(")") if "(" in frame else ""


def short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/proxy/", "/bench/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker in ("/proxy/", "/bench/"):
                where = marker.strip("/") + "/" + where
            break
    return f"{name} ({where})"


def summarize(raw: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = client = own = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_[short(frames[-1])] += n
        for frame in {short(f) for f in frames}:
            inclusive[frame] += n
        if any(frame_file(f).endswith(CLIENT_FILES) for f in frames):
            client += n
        if frame_file(frames[-1]).startswith("proxy/") or "/proxy/" in frame_file(frames[-1]):
            own += n
    if not total:
        return "no samples"
    out = [f"{total} samples; aiohttp client (upstream side, inclusive): {client / total:.1%}; "
           f"this project's own code (self): {own / total:.1%}", "", "inclusive:"]
    out += [f"{n / total:7.1%}  {name}" for name, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"{n / total:7.1%}  {name}" for name, n in self_.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=("ours", "bare"), default="ours")
    parser.add_argument("--stream", action="store_true", help="streamed, 20 chunks")
    parser.add_argument("--slow", action="store_true", help="slow streams (20 ms apart)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(python()).with_name("py-spy"))
    if shutil.which("wrk") is None or not Path(spy).exists():
        raise SystemExit("needs wrk (apt-get install -y wrk) and py-spy (pip install py-spy)")
    cpus = sorted(os.sched_getaffinity(0))
    load_cpu, target_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    work = Path(tempfile.mkdtemp(prefix="proxy-profile-"))
    py = python()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port, port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(start(pinned(load_cpu, [py, "-m", "bench.servers", "fast", str(up_port)]),
                           work / "upstream.log"))
        wait_up(upstream + "/", procs[-1])
        if args.target == "bare":
            cmd, health = [py, "-m", "bench.servers", "bare", str(port), upstream], "/"
        else:
            config = work / "model_backend.yaml"
            config.write_text(config_yaml(proxy_config(upstream, port, auth=supports_auth())))
            cmd, health = [py, "-m", "proxy", "serve", "-c", str(config)], "/healthz"
        procs.append(start(pinned(target_cpu, cmd), work / "target.log"))
        wait_up(f"http://127.0.0.1:{port}{health}", procs[-1])
        shape = SLOW if args.slow else "bench:chunks=20" if args.stream else None
        script = lua_script(work, shape)
        url = f"http://127.0.0.1:{port}{PATH}"
        wrk(url, script, args.connections, 2, load_cpu)  # warm-up
        raw = args.raw or work / "stacks.txt"
        sampler = subprocess.Popen(pinned(load_cpu, [
            spy, "record", "--pid", str(procs[-1].pid), "--duration", str(args.seconds),
            "--rate", str(args.rate), "--format", "raw", "--nolineno", "--output", str(raw)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        load = threading.Thread(target=wrk, args=(url, script, args.connections,
                                                  args.seconds + 1, load_cpu))
        load.start()
        _, err = sampler.communicate(timeout=args.seconds + 60)
        load.join()
        if sampler.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.decode(errors='replace').strip()}")
    finally:
        stop_all(procs)
    kind = "slow streams" if args.slow else "streamed" if args.stream else "non-streamed"
    print(f"{args.target}, {kind}, {args.connections} connections, {args.seconds} s")
    print(summarize(raw, args.top))


if __name__ == "__main__":
    main()
