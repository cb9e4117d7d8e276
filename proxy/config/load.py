"""Reading ``model_backend.yaml``: ``${ENV}`` interpolation, ``*_file`` secrets, paths anchored
beside the file; then :func:`load_config` validates. It either returns a complete config or
raises ``ConfigError`` whose ``problems`` are single lines ``FILE: KEY.PATH: what is wrong``.
Nothing is half-applied: callers swap configs only after it returns.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_camel, to_snake

from proxy.config.base import SECRET_KEYS, with_node_signatures
from proxy.config.build import ProxyConfig, build_config
from proxy.config.describe import Loc, _describe, _path
from proxy.config.providers import InstalledEntryPoints
from proxy.config.yamlfile import parse_yaml
from proxy.errors import ConfigError, reason

log = logging.getLogger("model_proxy")




_REF = re.compile(r"\$\$|\$\{([^}]*)\}")


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


#: The environment variable naming the default ``auth.fxn_signatures.state_dir``.
STATE_DIR_ENV = "MODEL_PROXY_STATE_DIR"


#: Largest config file read; more is refused before parsing (``/dev/zero`` included).
MAX_CONFIG_BYTES = 1024 * 1024


#: Largest ``*_file`` secret read.
MAX_SECRET_BYTES = 64 * 1024






class _TooLarge(Exception):
    pass


def read_bounded(path: Path, limit: int) -> str:
    """A file's text, reading at most ``limit + 1`` bytes; ``_TooLarge`` beyond ``limit``."""
    with path.open("rb") as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise _TooLarge
    return raw.decode("utf-8")


def default_path() -> Path:
    return Path(os.environ.get("MODEL_BACKEND_CONFIG") or "model_backend.yaml")


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read, interpolate and validate a config file; raise ``ConfigError`` on any problem."""
    path = Path(path)
    name = str(path)
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError([
            f"{name}: file not found; give a config with -c PATH or $MODEL_BACKEND_CONFIG, "
            "or copy model_backend.yaml.example (or one of config/examples/) to "
            "./model_backend.yaml"
        ]) from None
    except _TooLarge:
        raise ConfigError([
            f"{name}: the file is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
            "a config is a few hundred lines"
        ]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{name}: cannot read: {reason(exc)}"]) from None
    data = parse_yaml(text, name)
    _drop_retired(data, name)
    problems: list[str] = []
    data = _interpolate(data, (), os.environ if env is None else env, name, problems)
    secrets: list[str] = []
    _read_secret_files(data, (), path.parent, name, problems, secrets)
    _anchor_key_file(data, path.parent)
    _anchor_state_dir(data, path.parent, os.environ if env is None else env)
    if problems:
        raise ConfigError(problems)
    files = [f"{name}: {problem}" for problem in files_problems(data)]
    try:
        config = build_config(data, entry_points=InstalledEntryPoints())
    except ValidationError as exc:
        raise ConfigError(_describe(exc, data, name) + files) from None
    if files:
        raise ConfigError(files)
    config._secret_files = tuple(secrets)
    return config


def _key(section: Any, key: str) -> Any:
    """``section[key]`` in either spelling (snake_case or camelCase), if ``section`` has it."""
    if not isinstance(section, dict):
        return None
    value = section.get(key)
    return section.get(to_camel(key)) if value is None else value


def files_problems(data: dict[str, Any]) -> list[str]:
    """What is wrong with the files a config names (read here, not in validators): the node's
    key file, an engine's chat template file; ``KEY.PATH: problem`` each. Values of the wrong
    type are left to validation."""
    problems = []
    key_file = _key(data.get("node"), "key_file")
    if isinstance(key_file, str) and key_file:
        from proxy.auth.signing import Signer  # eth-account loads only for node configs

        try:
            Signer.from_file(key_file)  # names the file, never quotes the key
        except ValueError as exc:
            missing = not os.path.lexists(key_file)
            problems.append(f"node.key_file: {exc}"
                            + (_keygen_hint(Path(key_file)) if missing else ""))
    entries = data.get("models")
    places = ([(f"models[{i}].", e) for i, e in enumerate(entries)]
              if isinstance(entries, list) else [("", data)])
    for where, entry in places:
        template = _key(_key(entry, "engine"), "chat_template")
        if (isinstance(template, str) and not any(m in template for m in ("{{", "{%", "\n"))
                and not Path(template).is_file()):
            problems.append(f"{where}engine.chat_template: no such file {template[:200]!r} "
                            "(give a template file or the template text itself)")
    return problems


#: Keys earlier versions read and this one ignores, with what to know about each.
RETIRED = {
    "upstream_client": "the proxy has one HTTP client for upstreams now; remove the key",
}


def _drop_retired(data: dict[str, Any], name: str) -> None:
    """Take out the keys this version no longer reads, with one log line each."""
    entries = data.get("models")
    places = [("", data)]
    if isinstance(entries, list):
        places += [(f"models.{i}.", e) for i, e in enumerate(entries) if isinstance(e, dict)]
    for prefix, place in places:
        for key, note in RETIRED.items():
            for spelt in (key, to_camel(key)):
                if spelt in place:
                    del place[spelt]
                    log.warning("%s: %s%s: no longer read: %s", name, prefix, spelt, note)


def _interpolate(
    value: Any, loc: Loc, env: Mapping[str, str], name: str, problems: list[str]
) -> Any:
    if isinstance(value, str):
        if "$" not in value:
            return value

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            ref = match.group(1)
            var, sep, default = ref.partition(":-")
            if not _NAME.match(var):
                problems.append(f"{name}: {_path(loc)}: bad environment reference ${{{ref}}}")
                return ""
            if var in env:
                return env[var]
            if sep:
                return default
            problems.append(
                f"{name}: {_path(loc)}: environment variable {var} is not set "
                f"(use ${{{var}:-default}} for a fallback)"
            )
            return ""

        return _REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), env, name, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), env, name, problems) for i, v in enumerate(value)]
    return value


def _read_secret_files(
    data: Any, loc: Loc, base: Path, name: str, problems: list[str], read: list[str]
) -> None:
    """Replace ``<secret>_file`` keys by the file's contents, in place; each file's path is
    added to ``read``."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            _read_secret_files(item, (*loc, i), base, name, problems, read)
        return
    if not isinstance(data, dict):
        return
    for key in list(data):
        if not isinstance(key, str):
            continue
        snake = to_snake(key)
        stem = snake.removesuffix("_file")
        if snake.endswith("_file") and stem in SECRET_KEYS:
            where = _path((*loc, key))
            if stem in data or to_camel(stem) in data:
                problems.append(f"{name}: {where}: give either {stem} or {stem}_file, not both")
                continue
            file_value = data.pop(key)
            if not isinstance(file_value, str) or not file_value:
                problems.append(f"{name}: {where}: must be a file path")
                continue
            secret_path = base / Path(file_value).expanduser()
            read.append(str(secret_path))
            try:
                text = read_bounded(secret_path, MAX_SECRET_BYTES)
            except _TooLarge:
                problems.append(f"{name}: {where}: {secret_path} is larger than "
                                f"{MAX_SECRET_BYTES // 1024} KiB")
                continue
            except (OSError, UnicodeDecodeError) as exc:
                missing_key = stem == "private_key" and isinstance(exc, FileNotFoundError)
                problems.append(f"{name}: {where}: cannot read {secret_path}: {reason(exc)}"
                                + (_keygen_hint(secret_path) if missing_key else ""))
                continue
            if stem == "api_keys":
                lines = (line.strip() for line in text.splitlines())
                data[stem] = [line for line in lines if line and not line.startswith("#")]
            else:
                data[stem] = text.strip()
            if not data[stem]:
                problems.append(f"{name}: {where}: {secret_path} is empty")
        else:
            _read_secret_files(data[key], (*loc, key), base, name, problems, read)


def _keygen_hint(path: Path) -> str:
    """For a signing key that is not there yet: how to make one."""
    return f" (make one with: model-proxy keygen -o {path})"


def _anchor_key_file(data: dict[str, Any], base: Path) -> None:
    """A relative ``node.key_file`` is relative to the config file, like ``*_file`` secrets."""
    node = data.get("node")
    if not isinstance(node, dict):
        return
    for key in ("key_file", "keyFile"):
        value = node.get(key)
        if isinstance(value, str) and value:
            node[key] = str(base / Path(value).expanduser())


def _anchor_state_dir(data: dict[str, Any], base: Path, env: Mapping[str, str]) -> None:
    """``auth.fxn_signatures.state_dir``: relative to the config file; unset, the directory
    ``$MODEL_PROXY_STATE_DIR`` names (the container image's), else the config file's. Node mode
    checks signatures with no ``auth.fxn_signatures`` section written: the section it gets
    keeps its journal where a written one would."""
    data.update(with_node_signatures(data))
    auth = data.get("auth")
    signatures = auth.get("fxn_signatures", auth.get("fxnSignatures")) if isinstance(
        auth, dict) else None
    if not isinstance(signatures, dict):
        return
    key = "stateDir" if "stateDir" in signatures else "state_dir"
    value = signatures.get(key)
    if value is None:
        value = env.get(STATE_DIR_ENV) or "."
    if isinstance(value, str) and value:
        signatures[key] = str(base / Path(value).expanduser())
