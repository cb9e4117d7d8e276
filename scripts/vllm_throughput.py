"""Tokens per second through the proxy with an in-process vLLM engine (scripts/gpu-check.sh).

Starts ``python -m proxy serve`` on 127.0.0.1 with the model given (the tests' tiny model by
default), waits for ``/readyz``, then streams completions: one at a time, and CONCURRENCY at
once, each of TOKENS tokens (``ignore_eos``, so every answer has exactly that many). Prints
the figures and exits non-zero if anything failed. Nothing leaves 127.0.0.1.

Usage: python scripts/vllm_throughput.py --model DIR [--dtype bfloat16] [--concurrency 64] [--eager]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def one(session: aiohttp.ClientSession, url: str, tokens: int, i: int) -> int:
    body = {"model": "bench", "prompt": f"Request {i}: once upon a time", "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {(await r.text())[:500]}")
        text = await r.text()
    if '"completion_tokens":' + str(tokens) not in text:
        raise RuntimeError(f"answer without {tokens} completion tokens: {text[-500:]}")
    return tokens


async def bench(url: str, tokens: int, concurrency: int) -> None:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await one(session, url, 8, -1)  # warm-up
        started = time.perf_counter()
        await one(session, url, tokens, 0)
        solo = time.perf_counter() - started
        started = time.perf_counter()
        done = await asyncio.gather(*(one(session, url, tokens, i) for i in range(concurrency)))
        many = time.perf_counter() - started
    print(f"1 stream x {tokens} tokens: {tokens / solo:.0f} tok/s ({solo:.2f} s)")
    print(f"{concurrency} streams x {tokens} tokens: {sum(done) / many:.0f} tok/s "
          f"aggregate ({many:.2f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--eager", action="store_true",
                        help="no torch.compile / CUDA graphs: a quick load, slower decoding")
    parser.add_argument("--kv-cache-bytes", type=int, help="a fixed KV cache (needed on CPU)")
    args = parser.parse_args()
    extra: dict[str, object] = {"enforce_eager": True} if args.eager else {}
    port = free_port()
    config = {"backend_provider": "vllm", "model": {"name": "bench"},
              "server": {"port": port}, "logging": {"access_log": False},
              "limits": {"max_concurrency": max(64, args.concurrency)},
              "engine": {"model": str(args.model), "dtype": args.dtype,
                         "max_model_len": args.max_model_len,
                         "kv_cache_memory_bytes": args.kv_cache_bytes,
                         "args": {"max_num_seqs": max(64, args.concurrency), **extra}}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_backend.yaml"
        path.write_text(yaml.safe_dump(config))
        log = open(Path(tmp) / "proxy.log", "wb")  # closed in finally
        started = time.perf_counter()
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(path)],  # noqa: S603
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(wait_ready(url, proxy))
            print(f"engine ready in {time.perf_counter() - started:.1f} s")
            asyncio.run(bench(url, args.tokens, args.concurrency))
            return 0
        except Exception as exc:
            log.flush()
            print(f"failed: {exc}\n{(Path(tmp) / 'proxy.log').read_text()[-3000:]}",
                  file=sys.stderr)
            return 1
        finally:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proxy.pid, signal.SIGKILL)
                proxy.wait(10)
            log.close()


async def wait_ready(url: str, proxy: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proxy.poll() is not None:
                raise RuntimeError(f"the proxy exited {proxy.returncode}")
            try:
                async with session.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("not ready within 300 s")


if __name__ == "__main__":
    sys.exit(main())
