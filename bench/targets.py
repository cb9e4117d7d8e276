"""What every benchmark shares: ports, process start-up, /proc readings, and the configurations.

:func:`proxy_config` is the one place that says how the proxy under test is configured: as a
node operator runs it, every feature on. Settings the installed config model does not know yet
are left out (see :data:`WHEN_KNOWN`), so the benchmarks run on any revision.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CLOCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
#: The inbound API key clients send; LiteLLM wants master keys to start with ``sk-``.
INBOUND_KEY = "sk-bench-inbound-key"
UPSTREAM_KEY = "upstream-key"
PUBLIC_MODEL = "bench"
UPSTREAM_MODEL = "bench-upstream"
PATH = "/v1/chat/completions"
ROOT = Path(__file__).resolve().parent.parent

#: Settings of features that are arriving: (section, key) -> value, used once the installed
#: config model has the key. Extend this as features land.
WHEN_KNOWN: dict[tuple[str, str], Any] = {
    ("logging", "format"): "json",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a server with worker processes counts whole)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            try:
                pids.extend(int(c) for c in task.read_text().split())
            except OSError:
                pass
        i += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def wait_up(url: str, proc: subprocess.Popen[bytes], tries: int = 200) -> None:
    for _ in range(tries):
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)  # loopback only
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status: it is serving
                return
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """Terminate every process, then wait for each; one that will not go is killed."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def supports_auth() -> bool:
    from proxy.config import AuthSection

    if "api_keys" not in AuthSection.model_fields:
        return False
    try:
        import proxy.auth.inbound  # noqa: F401
    except ImportError:
        return False
    return True


def _known(section: str, key: str) -> bool:
    from proxy.config import BaseConfig

    field = BaseConfig.model_fields.get(section)
    if field is None:
        return False
    model = field.annotation
    return hasattr(model, "model_fields") and key in model.model_fields  # type: ignore[union-attr]


def proxy_config(upstream: str, port: int, *, auth: bool = True) -> dict[str, Any]:
    """The proxy as users run it: custom provider, upstream key, model alias, inbound API key,
    metrics, access log, retries, limits, and every setting of :data:`WHEN_KNOWN` it knows."""
    config: dict[str, Any] = {
        "backend_provider": "custom",
        "url": upstream,
        "api_key": UPSTREAM_KEY,
        "model_name_alias": UPSTREAM_MODEL,
        "model": {"name": PUBLIC_MODEL},
        "server": {"port": port},
        "retries": {"attempts": 3},
        "limits": {"max_concurrency": 1024, "max_queue": 1024},
        "metrics": {"enabled": True},
        "logging": {"access_log": True},
    }
    if auth:
        config["auth"] = {"api_keys": [INBOUND_KEY]}
    for (section, key), value in WHEN_KNOWN.items():
        if _known(section, key):
            config.setdefault(section, {})[key] = value
    return config


def config_yaml(config: dict[str, Any], extra: list[str] = ()) -> str:  # type: ignore[assignment]
    """``config`` as YAML, one top-level key a line; each ``extra`` line replaces its key."""
    lines = [f"{key}: {json.dumps(value)}" for key, value in config.items()]
    for line in extra:
        key = line.split(":", 1)[0]
        lines = [old for old in lines if not old.startswith(key + ":")] + [line]
    return "\n".join(lines) + "\n"


def litellm_config(upstream: str) -> dict[str, Any]:
    """LiteLLM's proxy configured like :func:`proxy_config`, as far as LiteLLM goes."""
    return {
        "model_list": [{
            "model_name": PUBLIC_MODEL,
            "litellm_params": {
                "model": f"openai/{UPSTREAM_MODEL}",
                "api_base": upstream + "/v1",
                "api_key": UPSTREAM_KEY,
            },
        }],
        "litellm_settings": {"num_retries": 3, "json_logs": True, "telemetry": False,
                             "request_timeout": 900},
        "general_settings": {"master_key": INBOUND_KEY, "max_parallel_requests": 1024},
    }


def pinned(cpu: int | None, cmd: list[str]) -> list[str]:
    return cmd if cpu is None else ["taskset", "-c", str(cpu), *cmd]


def python() -> str:
    return sys.executable
