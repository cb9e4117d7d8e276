"""Real ``vllm serve`` replicas of the tiny test model, for the benchmarks and the slow suite.

The one place that says how vLLM runs on CPU here: the model (a tiny random Llama built offline
by ``tests/adapters/vllm/build_tiny_model.py``, cached), the engine settings of the proxy's
in-process engine (:func:`engine_section`) and the same settings as ``vllm serve`` flags
(:func:`server_flags`). :func:`replicas` starts N servers, each in its own process group that
is killed whole when the block is left, by an exception or Ctrl-C included.

    python -m bench.replicas 2      # start two, print their URLs, serve until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.targets import ROOT, free_port

#: Quiet, offline and telemetry-free, for this process and every process it starts.
ENVIRONMENT = {
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
BUILDER = ROOT / "tests" / "adapters" / "vllm" / "build_tiny_model.py"
#: float32 on CPU; a GPU's attention kernels want half precision (scripts/gpu-check.sh).
DTYPE = os.environ.get("MODEL_PROXY_TEST_VLLM_DTYPE", "float32")
MAX_MODEL_LEN = 512
#: vLLM's KV cache: unbounded, it would take most of the RAM.
KV_CACHE_BYTES = 64 * 1024 * 1024
MAX_NUM_SEQS = 16
#: A server whose port was taken before it could bind it is started again, this many times.
PORT_TRIES = 3
PORT_TAKEN = "Address already in use"
#: Seconds a replica has to stop on SIGTERM before its group is killed.
STOP_GRACE = 15
#: The frontend settings of the shared engine and of the vLLM server it is compared with.
#: Tool calls in the pythonic format and the granite reasoning parser: both find their
#: markers in text, so they work with the tiny model's made-up vocabulary. Structured
#: outputs apply from the first token (else they would wait for the reasoning to end) and
#: allow no free whitespace (the tiny model would fill max_tokens with it).
FRONTEND: dict[str, Any] = {
    "tool_call_parser": "pythonic",
    "enable_auto_tool_choice": True,
    "reasoning_parser": "granite",
}
FRONTEND_ARGS: dict[str, Any] = {
    "structured_outputs_config": {"backend": "xgrammar", "enable_in_reasoning": True,
                                  "disable_any_whitespace": True}}


def quiet_environment() -> None:
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # It would override kv_cache_memory_bytes (vLLM's legacy CPU setting).
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so that ``finally`` blocks (stopping replicas) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def engine_section(model: Path, frontend: bool = False,
                   max_model_len: int = MAX_MODEL_LEN) -> dict[str, Any]:
    """The proxy's ``engine:`` section for the tiny model."""
    return {
        "model": str(model),
        "dtype": DTYPE,
        "max_model_len": max_model_len,
        "kv_cache_memory_bytes": KV_CACHE_BYTES,
        "seed": 0,
        # No torch.compile: a quick load.
        "args": {"enforce_eager": True, "max_num_seqs": MAX_NUM_SEQS,
                 **(FRONTEND_ARGS if frontend else {})},
        **(FRONTEND if frontend else {}),
    }


def server_flags(model: Path, max_model_len: int = MAX_MODEL_LEN) -> list[str]:
    """``vllm serve`` flags for what ``engine_section(model, frontend=True)`` sets."""
    return [
        "--model", str(model), "--dtype", DTYPE, "--max-model-len", str(max_model_len),
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--enforce-eager",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--seed", "0",
        "--tool-call-parser", FRONTEND["tool_call_parser"], "--enable-auto-tool-choice",
        "--reasoning-parser", FRONTEND["reasoning_parser"],
        "--structured-outputs-config", json.dumps(FRONTEND_ARGS["structured_outputs_config"]),
    ]


def tiny_model(out: Path | None = None) -> Path:
    """The tiny model at ``out`` (default: a directory under the system's temp dir, kept
    between runs), built there first when it is not; a separate process, so torch's and
    transformers' import-time warnings stay out of this one."""
    out = out or Path(tempfile.gettempdir()) / "model-proxy-bench" / "tiny-llama"
    subprocess.run([sys.executable, str(BUILDER), "--out", str(out)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    return out


@dataclass
class Replica:
    """One ``vllm serve`` process, the leader of its own process group."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    #: The process and its children, read once it is up: what must be gone after the stop.
    family: list[psutil.Process] = field(default_factory=list)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def start(model: Path, log: Path, extra: Sequence[str] = (), max_model_len: int = MAX_MODEL_LEN,
          port: int | None = None, cores: str | None = None) -> Replica:
    """``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI looks for a
    distribution named vllm, which vllm-cpu is not) with prefix caching on, in its own
    process group; returns at once (:func:`wait_healthy` waits). ``cores``: the CPUs its
    engine's threads are bound to (``VLLM_CPU_OMP_THREADS_BIND``; vLLM's own choice else)."""
    quiet_environment()
    env = None if cores is None else {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cores}
    port = port or free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               *server_flags(model, max_model_len), "--enable-prefix-caching",
               "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning",
               *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env)
    return Replica(process, f"http://127.0.0.1:{port}", log)


def spread_cores(count: int) -> list[str | None]:
    """A CPU for each of ``count`` replicas' engines, in turn over the CPUs this process may
    use. Left to itself, every replica's engine binds its threads to the same first core
    (vLLM's automatic binding keeps one CPU for the API server and knows nothing of the other
    replicas): on a 2-CPU machine, replicas would take turns on CPU 0 instead of running side
    by side. One replica keeps vLLM's own choice."""
    if count < 2:
        return [None] * count
    cpus = sorted(os.sched_getaffinity(0))
    return [str(cpus[i % len(cpus)]) for i in range(count)]


def wait_answering(server: Replica, path: str, what: str, timeout: float = 300,
                   poll: float = 0.5) -> None:
    """Poll ``path`` until 200, with a deadline; a server that exits fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"{what} exited {server.process.returncode}: {server.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {path} in {timeout} s: {server.tail()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll)


def wait_healthy(replica: Replica, timeout: float = 300, poll: float = 0.5) -> None:
    """Poll ``/health`` until 200 (see :func:`wait_answering`); then note its family."""
    wait_answering(replica, "/health", "vLLM server", timeout, poll)
    leader = psutil.Process(replica.process.pid)
    replica.family = [leader, *leader.children(recursive=True)]


def stop(replica: Replica, grace: float = 60) -> list[psutil.Process]:
    """SIGTERM to the whole process group, SIGKILL after ``grace``; returns the processes of
    its family that outlived it (killed too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(replica.process.pid, signal.SIGTERM)
    try:
        replica.process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replica.process.pid, signal.SIGKILL)
        replica.process.wait(10)
    # what is left of the group (an engine process that lingers) goes too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(replica.process.pid, signal.SIGKILL)
    _gone, alive = psutil.wait_procs(replica.family, timeout=15)
    for straggler in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            straggler.kill()
    return list(alive)


@contextlib.contextmanager
def replicas(model: Path, count: int, work: Path, extra: Sequence[Sequence[str]] = (),
             max_model_len: int = MAX_MODEL_LEN, timeout: float = 300) -> Iterator[list[Replica]]:
    """``count`` servers started together (``extra[i]``: more flags for the i-th), healthy on
    entry, stopped whole on exit whatever ends the block."""
    started: list[Replica] = []
    cores = spread_cores(count)
    try:
        for i in range(count):
            flags = extra[i] if i < len(extra) else ()
            started.append(start(model, work / f"vllm-{i}.log", flags, max_model_len,
                                 cores=cores[i]))
        for i, replica in enumerate(started):
            for _ in range(PORT_TRIES):
                try:
                    wait_healthy(replica, timeout)
                    break
                except RuntimeError:
                    if PORT_TAKEN not in replica.tail():
                        raise
                # its port was taken between free_port() and its bind (the servers starting
                # beside it pick ports of their own): again, on another port
                stop(replica)
                flags = extra[i] if i < len(extra) else ()
                replica = started[i] = start(model, replica.log, flags, max_model_len,
                                             cores=cores[i])
            else:
                raise RuntimeError(f"vLLM server found no free port: {replica.tail()}")
        yield started
    finally:
        # a server still loading does not act on SIGTERM: do not wait a minute for it
        for replica in started:
            stop(replica, grace=STOP_GRACE)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the tiny model from N vLLM replicas.")
    parser.add_argument("count", type=int, nargs="?", default=2)
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    args = parser.parse_args()
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="proxy-replicas-"))
    with replicas(tiny_model(), args.count, work, max_model_len=args.max_model_len) as up:
        print(",".join(r.url for r in up), f"(logs in {work}); Ctrl-C stops them", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
