"""An upstream's own model list, as read for the catalog: parsed off the event loop when it
is large, each entry checked, the list bounded.

An entry that is not what its format says (not an object, an ``id`` or ``name`` that is not
a short string, a ``metadata`` that is not an object, nesting deeper than :data:`MAX_DEPTH`)
is skipped and counted; at most :data:`MAX_MODELS` entries are kept. The catalog serves what
is kept on every ``/v1/models``, so both bounds are what a request costs, whatever the
upstream sent (its bytes are bounded by ``limits.max_response_bytes``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

#: Most entries kept from one upstream's list.
MAX_MODELS = 1000
#: Deepest nesting kept in an entry (an OpenAI model object is 3 deep with its permissions).
MAX_DEPTH = 8
#: Longest model id or name kept.
MAX_NAME = 512
#: Answers larger than this are parsed in a worker thread.
LARGE = 256 * 1024


async def parse(raw: bytes) -> Any:
    """``raw`` as JSON (``orjson.JSONDecodeError`` if it is not); a large answer is parsed in
    a worker thread, so a catalog refresh never holds up the requests being served."""
    if len(raw) > LARGE:
        return await asyncio.to_thread(orjson.loads, raw)
    return orjson.loads(raw)


@dataclass
class Models:
    """The entries kept, and how many were skipped (malformed, or over :data:`MAX_MODELS`)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def openai_models(answer: Any) -> Models:
    """The entries of an OpenAI ``/v1/models`` answer (``{"data": [...]}``) with a string
    ``id``; ``metadata``, when present, an object."""
    items = answer.get("data") if isinstance(answer, dict) else None
    return _kept(items, _openai_entry)


def ollama_models(answer: Any) -> Models:
    """The entries of an Ollama ``/api/tags`` answer (``{"models": [...]}``) with a string
    ``name`` or ``model``."""
    items = answer.get("models") if isinstance(answer, dict) else None
    return _kept(items, _ollama_entry)


def _kept(items: Any, fit: Any) -> Models:
    models = Models()
    if not isinstance(items, list):
        models.skipped = 0 if items is None else 1
        return models
    for item in items:
        if len(models.entries) < MAX_MODELS and fit(item):
            models.entries.append(item)
        else:
            models.skipped += 1
    return models


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def _openai_entry(item: Any) -> bool:
    return (isinstance(item, dict) and _name(item.get("id"))
            and isinstance(item.get("metadata", {}), dict) and _shallow(item))


def _ollama_entry(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    name, model = item.get("name"), item.get("model")
    named = _name(name) or _name(model)
    return (named and (name is None or _name(name)) and (model is None or _name(model))
            and _shallow(item))


def _shallow(item: Any) -> bool:
    """Whether ``item`` nests no deeper than :data:`MAX_DEPTH` (looked at breadth first, so a
    deep entry costs only as much as its first :data:`MAX_DEPTH` levels)."""
    level: Iterable[Any] = (item,)
    for _ in range(MAX_DEPTH):
        inner: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                inner.extend(v for v in value.values() if isinstance(v, dict | list))
            elif isinstance(value, list):
                inner.extend(v for v in value if isinstance(v, dict | list))
        if not inner:
            return True
        level = inner
    return False
