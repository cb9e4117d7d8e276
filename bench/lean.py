"""The upstream client alone: aiohttp's ClientSession against proxy.adapters.lean, per request.

    python -m bench.lean [--requests 2000] [--concurrency 8]

A client process sends requests to the fast upstream (``bench.servers fast``) the way
``HTTPUpstream`` does (POST, JSON body, credential header, timeouts) and reads each answer whole
(non-streamed) or chunk by chunk (20 chunks). It runs under callgrind twice, with a few and with
many requests; the difference in instructions over the difference in requests is the cost of
one request, start-up excluded. Beside it, the CPU time per request of a plain run. Needs
valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from bench.run import body
from bench.targets import free_port, python, wait_up

HEADERS = {"Content-Type": "application/json", "x-api-key": "upstream-key",
           "Accept-Encoding": "identity"}


async def with_session(port: int, count: int, concurrency: int, stream: bool) -> None:
    import aiohttp

    payload = body("bench:chunks=20" if stream else None)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=900, sock_connect=5, sock_read=120)
    left = count
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with await session.request("POST", url, data=payload, headers=HEADERS,
                                                 timeout=timeout,
                                                 allow_redirects=False) as response:
                    if stream:
                        async for _ in response.content.iter_any():
                            pass
                    else:
                        await response.read()
                    assert response.status == 200

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def with_lean(port: int, count: int, concurrency: int, stream: bool) -> None:
    from proxy.adapters.lean import LeanPool

    payload = body("bench:chunks=20" if stream else None)
    headers = list(HEADERS.items())
    pool = LeanPool("127.0.0.1", port)
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            response = await pool.request("POST", "/v1/chat/completions", payload, headers,
                                          first_byte=120, idle=60)
            if stream:
                async for _ in response.chunks():
                    pass
            else:
                await response.read()
            assert response.status == 200

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await pool.close()


def client(kind: str, port: int, count: int, concurrency: int, stream: bool) -> None:
    run = with_lean if kind == "lean" else with_session
    uvloop.run(run(port, count, concurrency, stream))


def instructions(kind: str, port: int, count: int, concurrency: int, stream: bool,
                 work: Path) -> int:
    out = work / f"callgrind.{kind}.{count}.{int(stream)}"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python(),
                    "-m", "bench.lean", "client", kind, str(port), str(count), str(concurrency),
                    "1" if stream else "0"], check=True, capture_output=True)
    match = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(errors="replace"),
                      re.MULTILINE)
    if match is None:
        raise SystemExit(f"no instruction total in {out}")
    return int(match.group(1))


def cpu_us(kind: str, port: int, count: int, concurrency: int, stream: bool) -> float:
    def children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    cmd = [python(), "-m", "bench.lean", "client", kind, str(port), "%d", str(concurrency),
           "1" if stream else "0"]
    spent = []
    for n in (count // 10, count):
        before = children()
        subprocess.run([c.replace("%d", str(n)) for c in cmd], check=True)
        spent.append(children() - before)
    return (spent[1] - spent[0]) / (count - count // 10) * 1e6


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        kind, port, count, concurrency, stream = sys.argv[2:7]
        client(kind, int(port), int(count), int(concurrency), stream == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    few, many = args.requests // 10, args.requests
    work = Path(tempfile.mkdtemp(prefix="proxy-lean-"))
    port = free_port()
    upstream = subprocess.Popen([python(), "-m", "bench.servers", "fast", str(port)])
    try:
        wait_up(f"http://127.0.0.1:{port}/", upstream)
        print(f"{args.requests} requests, concurrency {args.concurrency}")
        print(f"{'answer':<12}{'client':<16}{'instructions/req':>18}{'CPU µs/req':>12}")
        for stream in (False, True):
            counts = {}
            for kind in ("session", "lean"):
                per = (instructions(kind, port, many, args.concurrency, stream, work)
                       - instructions(kind, port, few, args.concurrency, stream, work)) / (
                    many - few)
                counts[kind] = per
                cpu = cpu_us(kind, port, args.requests, args.concurrency, stream)
                name = "ClientSession" if kind == "session" else "lean"
                print(f"{'streamed' if stream else 'non-stream':<12}{name:<16}{per:>18,.0f}"
                      f"{cpu:>12.1f}", flush=True)
            print(f"{'':<12}{'lean÷session':<16}{counts['lean'] / counts['session']:>18.3f}")
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


if __name__ == "__main__":
    main()
