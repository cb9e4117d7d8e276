"""What each URL of a model says about itself: its load, its KV cache, the models it serves.

The scraper (``proxy.server.scrape``) fills a :class:`Signals` per upstream from the bytes it
read; the router (``proxy.upstream.balance``) reads them. Parsing here is pure and bounded:
it looks only at the few vLLM series it needs, line by line, and ignores what it cannot read
(a non-finite or negative value, a line without a value) rather than believing it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

#: vLLM's gauges the router reads (``gpu_cache_usage_perc``: vLLM before 0.10 named it so).
WAITING = b"vllm:num_requests_waiting"
RUNNING = b"vllm:num_requests_running"
KV_CACHE = (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
LORA = b"vllm:lora_requests_info"
_WANTED = (WAITING, RUNNING, *KV_CACHE, LORA)
#: A count above this is not one a server could hold; it is capped, not believed.
MAX_COUNT = 1e9
#: LoRA adapter names kept per URL, and model ids per ``/v1/models`` answer.
MAX_NAMES = 1024
_LABEL = re.compile(rb'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(slots=True, eq=False)
class Signals:
    """The last reading of one URL (``readable`` ``None``: not read yet)."""

    #: Whether the last read of its load succeeded; when not, the proxy's own count is used.
    readable: bool | None = None
    waiting: float = 0.0
    running: float = 0.0
    #: KV-cache use from 0 to 1 (vLLM); ``-1``: not reported.
    kv_cache: float = -1.0
    #: LoRA adapters running or waiting on it (vLLM's ``lora_requests_info``).
    adapters: frozenset[str] = frozenset()
    #: Model ids its ``/v1/models`` lists (LoRA adapters included); ``None``: not known.
    models: frozenset[str] | None = None
    #: Models loaded in memory (Ollama's ``/api/ps``); ``None``: not an Ollama or not read.
    loaded: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class VllmLoad:
    """What one ``/metrics`` page of a vLLM server says (summed over its engines)."""

    waiting: float
    running: float
    kv_cache: float
    adapters: frozenset[str]


def read_vllm_metrics(text: bytes) -> VllmLoad:
    """The load in a vLLM ``/metrics`` page; ``ValueError`` when it has neither queue gauge
    (not a vLLM, or a page cut short)."""
    found: dict[bytes, float] = {}
    kv = -1.0
    adapters: frozenset[str] = frozenset()
    newest = -math.inf
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        name, labels, value = _series(line)
        if name is None or not math.isfinite(value) or value < 0:
            continue
        if name in KV_CACHE:
            kv = max(kv, min(value, 1.0))
        elif name == LORA:
            if value >= newest:  # the info series is stamped with its time: keep the last
                newest = value
                adapters = _adapters(labels)
        else:
            found[name] = min(found.get(name, 0.0) + value, MAX_COUNT)
    if WAITING not in found and RUNNING not in found:
        raise ValueError("no vllm:num_requests_waiting or vllm:num_requests_running in it")
    return VllmLoad(found.get(WAITING, 0.0), found.get(RUNNING, 0.0), kv, adapters)


def _series(line: bytes) -> tuple[bytes | None, bytes, float]:
    """A sample line's name, its label text and its value (``None`` name: not a sample)."""
    brace = line.find(b"{")
    space = line.find(b" ")
    if brace != -1 and (space == -1 or brace < space):
        end = line.rfind(b"}")
        if end == -1:
            return None, b"", 0.0
        name, labels, rest = line[:brace], line[brace + 1:end], line[end + 1:]
    elif space != -1:
        name, labels, rest = line[:space], b"", line[space:]
    else:
        return None, b"", 0.0
    if name not in _WANTED:  # a longer name that starts like one of them
        return None, b"", 0.0
    fields = rest.split()
    try:
        return name, labels, float(fields[0])
    except (IndexError, ValueError):
        return None, b"", 0.0


def _adapters(labels: bytes) -> frozenset[str]:
    names: set[str] = set()
    for key, value in _LABEL.findall(labels):
        if key in (b"running_lora_adapters", b"waiting_lora_adapters"):
            names.update(n for n in value.decode("utf-8", "replace").split(",") if n)
    return frozenset(sorted(names)[:MAX_NAMES])


def model_ids(items: list[dict[str, Any]]) -> frozenset[str]:
    """The ids of an OpenAI ``/v1/models`` list (at most :data:`MAX_NAMES`)."""
    ids = [item["id"] for item in items if isinstance(item.get("id"), str)]
    return frozenset(ids[:MAX_NAMES])


def ollama_loaded(answer: Any) -> frozenset[str]:
    """The models an Ollama ``/api/ps`` answer says are loaded; ``ValueError`` if it is not
    one."""
    models = answer.get("models") if isinstance(answer, dict) else None
    if not isinstance(models, list):
        raise ValueError("not an /api/ps answer: no models list")
    names: set[str] = set()
    for entry in models[:MAX_NAMES]:
        if isinstance(entry, dict):
            names.update(v for k in ("name", "model") if isinstance(v := entry.get(k), str))
    return frozenset(names)
