"""Adapter registry: built-ins by name, third parties by entry point or ``module:Class``.

Names map to ``"module:Class"`` strings imported only when chosen, so optional heavy
dependencies (vLLM) cost nothing unless a config names them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from proxy.config import BUILTIN_PROVIDERS, adapter_entry_points
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


def adapter_path(config: BaseConfig) -> str:
    """The ``module:Class`` that serves ``config``."""
    provider = config.backend_provider
    if provider == "vllm" and config.url is None:
        return BUILTINS["vllm-engine"]
    if provider in BUILTINS:
        return BUILTINS[provider]
    plugins = adapter_entry_points()
    clash = sorted(set(plugins) & set(BUILTIN_PROVIDERS))
    if clash:
        raise ConfigError([f"adapter entry point {clash[0]!r} clashes with a built-in provider"])
    return plugins.get(provider, provider)


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
