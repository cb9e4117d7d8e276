"""Adapters by name: the registry of providers is the config's (``proxy.config.providers``:
built-ins, entry points, ``module:Class`` paths); here its ``module:Class`` strings become
classes, imported only when chosen, so optional heavy dependencies (vLLM) cost nothing unless
a config names them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from proxy.config.providers import BUILTINS, Registered, adapter_path, registry
from proxy.errors import ConfigError

__all__ = ["BUILTINS", "Registered", "adapter_path", "load_adapter_class", "registry"]

if TYPE_CHECKING:
    from proxy.adapters.base import Adapter
    from proxy.config import BaseConfig

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
