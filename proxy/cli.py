"""``model-proxy``: serve and check; keygen and sign (``proxy.auth.keytool``); migrate (from a
function-node home, ``proxy.node.compat``); vllm-worker (``proxy.adapters.vllm.worker``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from proxy import __version__, backendtool, trial
from proxy.adapters.vllm import worker as vllm_worker
from proxy.auth import keytool
from proxy.config import (
    PER_MODEL,
    BaseConfig,
    ModelSetConfig,
    ProxyConfig,
    ServerSection,
    default_path,
    load_config,
)
from proxy.errors import ConfigError
from proxy.server.preflight import check_servable

EXIT_CONFIG = 2
#: What the exit status means, the same for every command.
EXIT_STATUSES = """exit status: 0 done; 2 what was given cannot be used (an argument, the config
file, a key or body file it names: fix it and run again); 1 it could not be done as things
are (the port is taken, the upstream is not ready, the output went away)"""


def _parser() -> argparse.ArgumentParser:
    """The command line: ``serve``, ``check``, ``migrate`` and the tools' own commands."""
    parser = argparse.ArgumentParser(
        prog="model-proxy", description="Reverse proxy in front of a model backend.",
        epilog=EXIT_STATUSES,
    )
    parser.add_argument("--version", action="version", version=f"model-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _config_arg(serve)
    serve.add_argument("--host", help="address to bind (overrides server.host)")
    serve.add_argument("--port", type=int, help="port to bind (overrides server.port)")

    check = commands.add_parser("check", help="validate the config and print it, secrets masked")
    _config_arg(check)
    check.add_argument(
        "--probe", action="store_true", help="also ask the upstream whether it is ready to serve"
    )
    check.add_argument(
        "--node-backend", metavar="PATH",
        help="model_backend.yaml of a function-node that forwards to this proxy, to check "
             "that the two work together",
    )

    migrate = commands.add_parser(
        "migrate", help="print this proxy's config for a function-node's config.yaml and "
                        "model_backend.yaml (node mode)"
    )
    migrate.add_argument(
        "--home", metavar="DIR", default=str(Path("~/.fxn").expanduser()),
        help="the function-node home holding config.yaml, model_backend.yaml and nodekey.json "
             "(default: ~/.fxn)",
    )

    keytool.add_commands(commands)
    backendtool.add_commands(commands)
    trial.add_commands(commands)
    vllm_worker.add_command(commands)
    for command in commands.choices.values():
        command.epilog = EXIT_STATUSES
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _run(argv)
        sys.stdout.flush()  # a reader gone away shows here, where it can still be handled
    except BrokenPipeError:
        # `model-proxy check | head`: the rest is not wanted; end quietly, not with a traceback
        # (and let nothing flush into the closed pipe again at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("keygen", "sign"):  # these need no config file
        return keytool.run(args)
    if args.command == "migrate":
        return _migrate(Path(args.home))
    if args.command == "backends":
        return backendtool.run(args)
    if args.command == "vllm-worker":
        try:
            return vllm_worker.run(args)
        except ConfigError as exc:
            for line in exc.problems:
                print(line if line.startswith(("command line:", args.config)) else
                      f"{args.config}: {line}", file=sys.stderr)
            return EXIT_CONFIG
    return _with_config(args)


def _with_config(args: argparse.Namespace) -> int:
    """``serve``, ``check`` and ``test``: each reads the config first."""
    path = Path(args.config) if args.config else default_path()
    try:
        config = load_config(path)
        if args.command == "serve" and (args.host or args.port is not None):
            config = _override_server(config, args.host, args.port)
        # refused here, before logging or binding; a reload runs the same checks
        exposure = check_servable(
            config, path,
            host_from="command line: --host" if args.command == "serve" and args.host else None,
        )
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "test":
        return trial.run(config, args)
    if args.command == "check":
        if exposure:
            print(f"warning: {exposure}", file=sys.stderr)
        try:
            for line in _compat_warnings(config, args.node_backend):
                print(f"warning: {line}", file=sys.stderr)
        except ConfigError as exc:
            for line in exc.problems:
                print(line, file=sys.stderr)
            return EXIT_CONFIG
        return _check(config, path, probe=args.probe)
    from proxy.server.logs import setup_logging
    from proxy.server.run import run

    setup_logging(config.logging)
    try:
        run(config, config_path=str(path))
    except ConfigError as exc:  # found only when the adapter starts (e.g. engine.args)
        for line in exc.problems:
            print(f"{path}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(
            f"model-proxy: cannot serve on {config.server.host}:{config.server.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def _compat_warnings(config: BaseConfig, node_backend: str | None) -> list[str]:
    from proxy.node.compat import warnings

    theirs = None
    if node_backend is not None:
        theirs = _read_yaml(Path(node_backend))
    return warnings(config, theirs)


def _read_yaml(path: Path) -> dict[str, Any]:
    from proxy.config import parse_yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return parse_yaml(text, str(path))


def _migrate(home: Path) -> int:
    from proxy.node.compat import translate

    try:
        theirs = _read_yaml(home / "config.yaml")
        backend = _read_yaml(home / "model_backend.yaml")
        # the key file's path absolute, so that the config works wherever it is saved
        ours, notes = translate(theirs, backend, home=home.absolute())
        text = yaml.safe_dump(_literal(ours), sort_keys=False)
        _checked(text)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"{home / 'config.yaml'}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(text, end="")
    return 0


def _literal(value: Any) -> Any:
    """Strings as they are: ``$`` doubled, so that no value is read as ``${VAR}``."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _checked(text: str) -> None:
    """What ``check`` would say of ``text`` as a config file; ``ConfigError`` if it refuses it,
    so that migrate never prints a config that cannot serve."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model_backend.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            config = load_config(path)
            check_servable(config, path)
        except ConfigError as exc:
            name = str(path)
            raise ConfigError([
                "migrate: the config it would print is refused by check: "
                + problem.removeprefix(name + ": ") for problem in exc.problems
            ]) from None


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="config file (default: $MODEL_BACKEND_CONFIG, else ./model_backend.yaml)",
    )


def _override_server(config: ProxyConfig, host: str | None, port: int | None) -> ProxyConfig:
    overrides: dict[str, Any] = {"host": host} if host else {}
    if port is not None:
        overrides["port"] = port
    try:
        server = ServerSection.model_validate({**config.server.model_dump(), **overrides})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError([f"command line: --{first['loc'][0]}: {first['msg']}"]) from None
    return config.model_copy(update={"server": server})


def _check(config: BaseConfig, path: Path, *, probe: bool) -> int:
    print(f"# {path}: valid ({config.backend_provider})")
    print(yaml.safe_dump(masked(config), sort_keys=False), end="")
    if probe:
        import asyncio

        from proxy.server.health import probe as run_probe

        problem = asyncio.run(run_probe(config))
        if problem:
            print(f"upstream: NOT READY: {problem}", file=sys.stderr)
            return 1
        print("upstream: ready")
    return 0


def masked(config: BaseConfig) -> dict[str, Any]:
    """The effective config as plain data, every secret replaced by asterisks."""
    shown: dict[str, Any] = _mask(config.model_dump(mode="python"))
    if isinstance(config, ModelSetConfig):  # the per-model keys live in each entry
        for key in ("backend_provider", *PER_MODEL):
            shown.pop(key, None)
    return shown


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "********"
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
