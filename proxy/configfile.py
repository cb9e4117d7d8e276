"""Reading ``model_backend.yaml``: YAML, ``${ENV}`` interpolation, ``*_file`` secrets, errors.

:func:`load_config` either returns a complete, validated config or raises ``ConfigError``
whose ``problems`` are single lines of the form ``FILE: KEY.PATH: what is wrong``. Nothing is
half-applied: callers swap configs only after this returns.
"""

from __future__ import annotations

import logging
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel, to_snake

from proxy.config import (
    SECRET_KEYS,
    VARIANTS,
    ModelSetConfig,
    ProxyConfig,
    _provider_tag,
    _top_tag,
    build_config,
)
from proxy.errors import ConfigError

log = logging.getLogger("model_proxy")
Loc = tuple[str | int, ...]
_REF = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


#: The environment variable naming the default ``auth.fxn_signatures.state_dir``.
STATE_DIR_ENV = "MODEL_PROXY_STATE_DIR"
#: Largest config file read; more is refused before parsing (``/dev/zero`` included).
MAX_CONFIG_BYTES = 1024 * 1024
#: Largest ``*_file`` secret read.
MAX_SECRET_BYTES = 64 * 1024
#: Deepest nesting of lists and mappings in a config file.
MAX_DEPTH = 64
#: Most values a config may hold once its aliases are expanded (a bound on alias bombs).
MAX_NODES = 100_000


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
        raise ConfigError([f"{name}: cannot read: {_reason(exc)}"]) from None
    data = parse_yaml(text, name)
    _drop_retired(data, name)
    problems: list[str] = []
    data = _interpolate(data, (), os.environ if env is None else env, name, problems)
    _read_secret_files(data, (), path.parent, name, problems)
    _anchor_key_file(data, path.parent)
    _anchor_state_dir(data, path.parent, os.environ if env is None else env)
    if problems:
        raise ConfigError(problems)
    try:
        return build_config(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, data, name)) from None


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


def _unquoted_in_flow(line: str) -> bool:
    """Whether ``line`` has a ``${`` after an opening ``[`` or ``{`` and outside quotes, where
    YAML reads ``{`` as the start of a mapping."""
    at = line.find("${")
    while at >= 0:
        before = line[:at]
        quoted = before.count('"') % 2 == 1 or before.count("'") % 2 == 1
        if not quoted and ("[" in before or "{" in before):
            return True
        at = line.find("${", at + 2)
    return False


def parse_yaml(text: str, name: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        message = f"{where}: YAML syntax error: {exc.problem or exc.context}"
        lines = text.splitlines()
        if mark is not None and mark.line < len(lines) and _unquoted_in_flow(lines[mark.line]):
            message += (
                '; inside [...] or {...} a ${VAR} must be quoted ("${VAR}"), '
                "or write the list one item per line (- ${VAR})"
            )
        raise ConfigError([message]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{name}: YAML error: {exc}"]) from None
    if data is None:
        raise ConfigError([f"{name}: the file is empty; it needs at least backend_provider"])
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"{name}: the top level must be a mapping of keys, not a {kind}"])
    return data


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with bounds, for files that may be hostile or simply wrong.

    Refuses a key given twice in one mapping (YAML would keep the last), keys that are lists
    or mappings, nesting deeper than :data:`MAX_DEPTH`, a value that contains itself, and more
    than :data:`MAX_NODES` values once aliases are expanded (an alias bomb is small on disk).
    Merge keys (``<<: *base``) work as in YAML 1.1; the mapping's own keys win.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # The composer recurses once per level; bound it before Python's own limit.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            node: yaml.Node | None = super().compose_node(parent, index)
            return node
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node: yaml.Node | None = super().get_single_node()
        if node is not None:
            _check_graph(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {kind}",
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        self.flatten_mapping(node)
        return super().construct_mapping(node, deep=deep)


def _check_graph(root: yaml.Node) -> None:
    """Refuse a node graph that refers to itself or expands to more than MAX_NODES values.

    Iterative (no recursion), and each node's expanded size is counted once, so the check
    itself stays cheap however many times an alias is used.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            size = 1 + sum(sizes[id(child)] for child in _children(node))
            if size > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None, None,
                    f"expands to more than {MAX_NODES} values (aliases used too often)",
                    node.start_mark,
                )
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to a value that contains it", node.start_mark
            )
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise yaml.composer.ComposerError(
                    None, None, "an alias refers to a value that contains it", child.start_mark
                )
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping
)


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


def _read_secret_files(data: Any, loc: Loc, base: Path, name: str, problems: list[str]) -> None:
    """Replace ``<secret>_file`` keys by the file's contents, in place."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            _read_secret_files(item, (*loc, i), base, name, problems)
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
            try:
                text = read_bounded(secret_path, MAX_SECRET_BYTES)
            except _TooLarge:
                problems.append(f"{name}: {where}: {secret_path} is larger than "
                                f"{MAX_SECRET_BYTES // 1024} KiB")
                continue
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{name}: {where}: cannot read {secret_path}: {_reason(exc)}")
                continue
            if stem == "api_keys":
                lines = (line.strip() for line in text.splitlines())
                data[stem] = [line for line in lines if line and not line.startswith("#")]
            else:
                data[stem] = text.strip()
            if not data[stem]:
                problems.append(f"{name}: {where}: {secret_path} is empty")
        else:
            _read_secret_files(data[key], (*loc, key), base, name, problems)


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
    ``$MODEL_PROXY_STATE_DIR`` names (the container image's), else the config file's."""
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


_ENTRY_MESSAGE = re.compile(r"(models\[\d+\]\.\S+): (.*)", re.S)


def _describe(exc: ValidationError, data: dict[str, Any], name: str) -> list[str]:
    top = VARIANTS[_top_tag(data)]
    lines = []
    errors = exc.errors(include_url=False, include_input=False)
    for err in errors:
        loc: Loc = tuple(err["loc"][1:])  # the first element is the provider tag
        if err["type"] == "too_short" and any(
            len(other["loc"]) > len(err["loc"]) and other["loc"][: len(err["loc"])] == err["loc"]
            for other in errors
        ):
            continue  # the item's own error says it; "too few items" would only follow from it
        variant, where = top, data
        prefix: Loc = ()
        if top is ModelSetConfig and len(loc) >= 3 and loc[0] == "models" and isinstance(
            loc[1], int
        ):
            # inside one entry: its own provider tag follows the index
            entries = data.get("models")
            entry = entries[loc[1]] if isinstance(entries, list) else None
            if isinstance(entry, dict):
                variant, where, prefix = VARIANTS[_provider_tag(entry)], entry, loc[:2]
                loc = loc[3:]
        ctx = err.get("ctx") or {}
        if err["type"] == "value_error" and not loc:
            message = str(ctx.get("error", err["msg"]))
            entry_message = _ENTRY_MESSAGE.fullmatch(message)
            if entry_message:
                lines.append(f"{name}: {entry_message[1]}: {entry_message[2]}")
                continue
        lines.append(_problem(err, loc, variant, where, prefix, name))
    return lines


def _problem(
    err: Any, loc: Loc, variant: type[BaseModel], data: dict[str, Any], prefix: Loc, name: str
) -> str:
    """One line for one validation error at ``loc`` of ``data`` (a ``variant``)."""
    ctx = err.get("ctx") or {}
    if err["type"] != "extra_forbidden":  # there the key is the user's own spelling
        loc = tuple(to_snake(p) if isinstance(p, str) else p for p in loc)
    if err["type"] == "extra_forbidden":
        return f"{name}: {_path((*prefix, *loc))}: {_unknown_key(variant, loc, data)}"
    if err["type"] == "value_error" and not loc:
        message = str(ctx.get("error", err["msg"]))
        where, colon, rest = message.partition(": ")
        if colon and " " not in where and where.split(".")[0] in _names(variant):
            return f"{name}: {_path((*prefix, where))}: {rest}"  # a model check naming its key
        first = message.split(" ", 1)[0]
        key = _path((*prefix, first)) if first in _names(variant) else (
            _path(prefix) if prefix else "(top level)")
        return f"{name}: {key}: {message}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "string_type" and isinstance(_value_at(data, loc), (int, float)):
        message += (" (YAML read an unquoted 0x... or digits as a number: "
                    "put it in quotes, e.g. \"0xAbC...\")")
    if err["type"] == "missing":
        provider = data.get("backend_provider") or data.get("backendProvider")
        message = "is required" + (
            f" for backend_provider {provider}" if len(loc) == 1 and provider else "")
    return f"{name}: {_path((*prefix, *loc))}: {message}"


def _unknown_key(variant: type[BaseModel], loc: Loc, data: dict[str, Any]) -> str:
    key = str(loc[-1])
    model = _model_at(variant, loc[:-1])
    parent = _value_at(data, loc[:-1])
    known = _names(model) if model else set()
    twin = to_camel(key) if to_camel(key) != key else to_snake(key)
    if twin in known and isinstance(parent, dict) and twin in parent:
        return f"given twice, as {twin} and {key}; keep one"
    if len(loc) == 1:
        users = [p for p, cls in VARIANTS.items()
                 if p not in ("plugin", "models") and key in _names(cls)]
        if users:
            provider = data.get("backend_provider") or data.get("backendProvider")
            return f"not used by backend_provider {provider} (only by {', '.join(users)})"
    close = get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if not close and model is not None:
        nested = [
            f"{section}.{to_snake(key)}"
            for section, field in model.model_fields.items()
            for sub in _models_in(field.annotation)
            if to_snake(key) in sub.model_fields
        ]
        close = nested[:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint}"


def _names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        names.add(field_name)
        if field.alias:
            names.add(field.alias)
    return names


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(to_snake(part))
        if field is None:
            return None
        current = next(_models_in(field.annotation), None)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _models_in(typing.get_args(annotation)[0])
    elif origin in (typing.Union, types.UnionType, tuple, list):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)


def _value_at(data: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
