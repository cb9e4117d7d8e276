"""``model-proxy backends list`` and ``model-proxy backends add module:Class``.

``list`` shows every provider name the registry knows (``proxy.adapters.registry``: built-ins,
then entry points, then the config file's ``plugins:``), where each comes from and whether it
can be used here: its module imports (and, for the in-process engine, vLLM is installed);
with ``--probe``, whether the configured upstream is ready. ``add`` imports the class and
builds one instance before it writes the class into the file's ``plugins:``, so a bad path
never reaches the config. Problems are one line each; nothing is written on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import aiohttp

from proxy.adapters import BUILTINS, registry
from proxy.adapters.base import Adapter
from proxy.config import build_config, default_path, load_config, parse_yaml
from proxy.errors import ConfigError, reason

_BLOCK_KEY = re.compile(r"^plugins:[ \t]*(#.*)?$", re.M)
_EMPTY_FLOW = re.compile(r"^plugins:[ \t]*\{\}[ \t]*(#.*)?$", re.M)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backends = commands.add_parser("backends", help="list the backend adapters, or add one")
    sub = backends.add_subparsers(dest="backends_command", required=True)
    listing = sub.add_parser("list", help="built-in, entry-point and configured adapters")
    _config_arg(listing)
    listing.add_argument("--probe", action="store_true",
                         help="also ask the configured upstreams whether they are ready")
    add = sub.add_parser("add", help="check a module:Class adapter and add it to plugins:")
    add.add_argument("path", metavar="module:Class")
    add.add_argument("--name", help="provider name to register it under (default: its name)")
    _config_arg(add)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="PATH",
                        help="config file (default: $MODEL_BACKEND_CONFIG, else "
                        "./model_backend.yaml)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.config) if args.config else default_path()
    try:
        if args.backends_command == "add":
            return _add(args.path, args.name, path)
        return _list(path, probe=args.probe, explicit=args.config is not None)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2


def _list(path: Path, *, probe: bool, explicit: bool) -> int:
    config = None
    if path.exists() or explicit:
        config = load_config(path)
    plugins = config.plugins if config is not None else {}
    known = registry(plugins)
    configured = {e.backend_provider for e in config.entries} if config is not None else set()
    names = list(known)
    for provider in sorted(configured - set(known)):  # module:Class given as backend_provider
        names.append(provider)
    print(f"{'NAME':<28} {'SOURCE':<12} {'MODULE:CLASS':<46} AVAILABILITY")
    for name in names:
        entry = known.get(name)
        source, target = (entry.source, entry.path) if entry else ("path", name)
        shown = name if ":" not in name else "-"
        mark = " *" if name in configured else ""
        print(f"{shown + mark:<28} {source:<12} {target:<46} {availability(target)}")
    if config is not None:
        print(f"(* configured in {path})")
        if probe:
            from proxy.server.health import probe as run_probe

            problem = asyncio.run(run_probe(config))
            print(f"upstream: NOT READY: {problem}" if problem else "upstream: ready")
            return 1 if problem else 0
    return 0


def availability(target: str) -> str:
    """``available``, or why the adapter at ``target`` cannot be used here."""
    if target == BUILTINS["vllm-engine"] and importlib.util.find_spec("vllm") is None:
        return "not importable: vllm is not installed (pip install -e '.[vllm]')"
    try:
        load_class(target)
    except ConfigError as exc:
        return "not importable: " + exc.problems[0].split(": ", 2)[-1]
    return "available"


def load_class(target: str) -> type[Adapter]:
    """Import the adapter class at ``module:Class``; ``ConfigError`` with one line if not."""
    module_name, sep, attr = target.partition(":")
    if not (module_name and sep and attr):
        raise ConfigError([f"{target}: expected module:Class, e.g. my_pkg.adapter:MyAdapter"])
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError([f"{target}: cannot import {module_name}: {exc}"]) from None
    except Exception as exc:  # a plugin's own import-time failure, shown in one line
        raise ConfigError(
            [f"{target}: importing {module_name} failed: {reason(exc)}: {exc}"]
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError([f"{target}: {module_name} has no attribute {attr}"])
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ConfigError([f"{target}: {attr} is not an Adapter class"])
    return cls


def _add(target: str, name: str | None, path: Path) -> int:
    cls = load_class(target)
    asyncio.run(_instantiate(cls, target))
    name = name or cls.name or cls.__name__.lower()
    if not path.exists():
        raise ConfigError([f"{path}: file not found (pass the config file with -c)"])
    text = path.read_text(encoding="utf-8")
    data = parse_yaml(text, str(path))
    current = data.get("plugins") or {}
    if not isinstance(current, dict):
        raise ConfigError([f"{path}: plugins: must be a mapping of name: module:Class"])
    registry({**current, name: target})  # a clash with a built-in, entry point or plugin
    if name in current:
        raise ConfigError([f"{path}: plugins.{name}: is already registered ({current[name]})"])
    line = f"  {name}: {target}\n"
    if "plugins" not in data:
        new = text + ("" if text.endswith("\n") or not text else "\n") + "plugins:\n" + line
    elif _BLOCK_KEY.search(text):
        at = _BLOCK_KEY.search(text)
        assert at is not None
        end = at.end() + 1
        new = text[:end] + line + text[end:]
    elif _EMPTY_FLOW.search(text):
        new = _EMPTY_FLOW.sub("plugins:\n" + line.rstrip("\n"), text, count=1)
    else:
        raise ConfigError([f"{path}: plugins: is written in a style this command cannot edit; "
                           f"add '{name}: {target}' under it by hand"])
    path.write_text(new, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError:
        path.write_text(text, encoding="utf-8")  # leave the file as it was
        raise
    print(f"added {name} ({target}) to {path}; use it as backend_provider: {name}")
    return 0


async def _instantiate(cls: type[Adapter], target: str) -> None:
    config = build_config({"backend_provider": target})
    async with aiohttp.ClientSession() as session:
        try:
            cls(config, session)
        except Exception as exc:
            raise ConfigError(
                [f"{target}: cannot be instantiated: {reason(exc)}: {exc}"]
            ) from None
