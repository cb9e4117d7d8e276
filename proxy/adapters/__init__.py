"""Adapter registry: built-ins by name, third parties by entry point or ``module:Class``.

Names map to ``"module:Class"`` strings imported only when chosen, so optional heavy
dependencies (vLLM) cost nothing unless a config names them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from proxy.config import ENTRY_POINT_GROUP
from proxy.errors import ConfigError

if TYPE_CHECKING:
    from proxy.adapters.base import Adapter
    from proxy.config import BaseConfig

BUILTINS: dict[str, str] = {
    "mock": "proxy.adapters.mock:MockAdapter",
    "custom": "proxy.adapters.openai:OpenAIAdapter",
    "vllm": "proxy.adapters.openai:VllmServerAdapter",
    "vllm-engine": "proxy.adapters.vllm.engine:VllmEngineAdapter",
    "ollama": "proxy.adapters.ollama.adapter:OllamaAdapter",
    "fxn": "proxy.adapters.fxn:FxnAdapter",
}


_SOURCES = {"built-in": "built-in", "entry point": "entry point", "yaml": "plugins: entry"}


@dataclass(frozen=True, slots=True)
class Registered:
    """One provider name the registry knows, and where it came from."""

    name: str
    path: str
    source: Literal["built-in", "entry point", "yaml"]


def registry(plugins: Mapping[str, str] | None = None) -> dict[str, Registered]:
    """Every provider name: built-ins, then entry points, then the YAML's ``plugins:``.

    A name registered twice is an error (``ConfigError``), never a silent override.
    """
    known = {name: Registered(name, path, "built-in") for name, path in BUILTINS.items()}
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    later = [(ep.name, ep.value, "entry point") for ep in found]
    later += [(name, path, "yaml") for name, path in (plugins or {}).items()]
    for name, path, source in later:
        if name in known:
            first = known[name]
            raise ConfigError([
                f"backend_provider: {_SOURCES[source]} {name!r} ({path}) clashes with the "
                f"{_SOURCES[first.source]} of that name ({first.path}); rename one"
            ])
        known[name] = Registered(name, path, source)  # type: ignore[arg-type]
    return known


def adapter_path(config: BaseConfig) -> str:
    """The ``module:Class`` that serves ``config``."""
    provider = config.backend_provider
    if provider == "vllm" and config.url is None:
        return BUILTINS["vllm-engine"]
    if provider in BUILTINS and not config.plugins:
        return BUILTINS[provider]  # the usual case: no entry points need reading
    known = registry(config.plugins)
    return known[provider].path if provider in known else provider


def load_adapter_class(config: BaseConfig) -> type[Adapter]:
    """Import the adapter class for ``config``; ``ConfigError`` if it cannot be had."""
    from proxy.adapters.base import Adapter

    path = adapter_path(config)
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr) if attr else None
    except ImportError as exc:
        extra = " (install the vllm extra)" if "vllm" in (exc.name or "") else ""
        raise ConfigError(
            [f"backend_provider: cannot import adapter {path}: {exc.name or exc} not found{extra}"]
        ) from None
    except AttributeError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ConfigError(
            [f"backend_provider: {path} is not an Adapter class (expected module:Class)"]
        )
    return cls
