"""The checks a config passes before it is served: at start-up (``serve``, ``check``) and at
every reload, the same ones, so that a reload cannot open what ``serve`` keeps shut."""

from __future__ import annotations

import os

from proxy.adapters import load_adapter_class
from proxy.auth.inbound import check_exposure
from proxy.config import BaseConfig
from proxy.errors import ConfigError


def check_servable(
    config: BaseConfig, path: str | os.PathLike[str], *, host_from: str | None = None
) -> str | None:
    """Raise ``ConfigError`` (lines ``FILE: KEY: problem``) unless every entry's adapter can be
    imported and a non-loopback address has inbound auth (or ``auth.allow_unauthenticated``);
    return the warning to show loudly when serving without auth, else ``None``.

    ``host_from`` names where ``server.host`` came from when not from the file (``command
    line: --host``)."""
    for i, entry in enumerate(config.entries):
        try:
            load_adapter_class(entry)
        except ConfigError as exc:
            key = f"models[{i}]." if entry is not config else ""
            raise ConfigError([f"{path}: {key}{line}" for line in exc.problems]) from None
    try:
        return check_exposure(config)
    except ConfigError as exc:
        where = host_from or path
        raise ConfigError([f"{where}: {line}" for line in exc.problems]) from None


__all__ = ["check_servable"]
