"""Function-node compatibility: its config files as ours, and setups that cannot work.

:func:`translate` maps a function-node home (``config.yaml`` + ``model_backend.yaml``, read as
plain mappings) onto this proxy's config, key by key (docs/node.md's migration table), and
says what it dropped. :func:`warnings` lists what ``model-proxy check`` should say about
combinations that pass validation but fail in the network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.config import BaseConfig

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "warning": "warning",
           "error": "error", "dpanic": "error", "panic": "error", "fatal": "error"}
#: function-node keys with no counterpart here, and why.
DROPPED = {
    "nonceCache.cleanupInterval": "nonces are forgotten as their timestamps leave the window",
    "proxy.maxIdleConns": "the upstream pool keeps idle connections without a fixed cap",
    "proxy.idleConnTimeout": "idle upstream connections close after 30 s",
    "registry.provider.pollInterval": "the provider registry is not read (nor is it by the node)",
    "registry.scheduler.pollInterval": "the scheduler is the configured address",
    "registry.bypassAuth": "node mode always checks signatures; without node: and auth, "
                           "the proxy serves 127.0.0.1 only",
}


def go_duration(value: Any) -> float:
    """Seconds in a Go duration (``"1m"``, ``"1h30m"``, ``"90s"``); a number is seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def translate(
    node_config: Mapping[str, Any], model_backend: Mapping[str, Any], *, home: str | Path
) -> tuple[dict[str, Any], list[str]]:
    """Our config (a plain mapping for ``build_config``) and notes on what did not carry."""
    notes: list[str] = []
    out: dict[str, Any] = {}
    for theirs, ours in (("backendProvider", "backend_provider"), ("url", "url"),
                         ("fxnId", "fxn_id"), ("apiKey", "api_key"),
                         ("bearerToken", "bearer_token"), ("modelNameAlias", "model_name_alias")):
        value = model_backend.get(theirs)
        if value not in (None, ""):
            out[ours] = value
    node = _section(node_config, "node")
    server: dict[str, Any] = {}
    if "listenAddress" in node:
        server["host"] = node["listenAddress"]
    if "listenPort" in node:
        server["port"] = node["listenPort"]
    if server:
        out["server"] = server
    verbosity = _section(node_config, "logger").get("verbosity")
    if verbosity:
        out["logging"] = {"level": _LEVELS.get(str(verbosity).lower(), "info")}
    registry = _section(node_config, "registry")
    section: dict[str, Any] = {"key_file": str(Path(home) / "nodekey.json")}
    if "schedulerAddress" in node_config:
        section["scheduler_address"] = node_config["schedulerAddress"]
    chain: dict[str, Any] = {}
    if "rpcProvider" in node_config:
        chain["rpc_url"] = node_config["rpcProvider"]
    if "routerSmartContractAddress" in registry:
        chain["router_address"] = registry["routerSmartContractAddress"]
    poll = _section(registry, "gateway").get("pollInterval")
    if poll is not None:
        chain["refresh"] = go_duration(poll)
    if chain:
        section["chain"] = chain
    out["node"] = section
    ttl = _section(node_config, "nonceCache").get("ttl")
    if ttl is not None:
        out["auth"] = {"fxn_signatures": {"window": go_duration(ttl)}}
        notes.append(
            "nonceCache.ttl became auth.fxn_signatures.window: timestamps older than that are "
            "refused (the node checks none and forgets nonces after ttl); window: 0 is the "
            "node's behaviour"
        )
    for dotted, why in DROPPED.items():
        if _has(node_config, dotted):
            notes.append(f"{dotted} has no counterpart: {why}")
    return out, notes


def warnings(config: BaseConfig, node_backend: Mapping[str, Any] | None = None) -> list[str]:
    """What ``check`` warns about; ``node_backend`` is the model_backend.yaml of a function-node
    in front of this proxy, when the operator names one."""
    found = []
    signatures = config.auth.fxn_signatures is not None
    if signatures and config.node is None:
        alias = (node_backend or {}).get("modelNameAlias")
        if alias:
            found.append(
                "auth.fxn_signatures cannot verify behind this function-node: its "
                "modelNameAlias rewrites the body after the gateway signed it; use auth.api_keys "
                "with the node's apiKey (which it sends as x-api-key) instead"
            )
        elif node_backend is None:
            found.append(
                "auth.fxn_signatures: if a function-node forwards to this proxy and its "
                "model_backend.yaml sets modelNameAlias, the node rewrites the body after the "
                "gateway signed it and every signature fails; there, use auth.api_keys (the "
                "node's apiKey, sent as x-api-key)"
            )
    return found


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def _has(data: Mapping[str, Any], dotted: str) -> bool:
    current: Any = data
    for part in dotted.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return False
        current = current[part]
    return True
