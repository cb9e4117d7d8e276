"""A pydantic ``ValidationError`` as the lines an operator reads: ``FILE: KEY.PATH: problem``,
with a suggestion for a misspelt key.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from difflib import get_close_matches
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel, to_snake

from proxy.config.build import VARIANTS, ModelSetConfig, _top_tag
from proxy.config.providers import _provider_tag

_ENTRY_MESSAGE = re.compile(r"(models\[\d+\]\.\S+): (.*)", re.S)

Loc = tuple[str | int, ...]


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
        if colon and " " not in where and where.split(".")[0] in _names_of(variant):
            return f"{name}: {_path((*prefix, where))}: {rest}"  # a model check naming its key
        first = message.split(" ", 1)[0]
        key = _path((*prefix, first)) if first in _names_of(variant) else (
            _path(prefix) if prefix else "(top level)")
        return f"{name}: {key}: {message}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "string_type" and isinstance(_value_at(data, loc), (int, float)):
        message += (" (YAML read an unquoted 0x... or digits as a number: "
                    "put it in quotes, e.g. \"0xAbC...\")")
    if err["type"] == "model_type":
        message = _not_a_section(variant, loc, _value_at(data, loc))
    if err["type"] == "missing":
        provider = data.get("backend_provider") or data.get("backendProvider")
        message = "is required" + (
            f" for backend_provider {provider}" if len(loc) == 1 and provider else "")
    return f"{name}: {_path((*prefix, *loc))}: {message}"


def _not_a_section(variant: type[BaseModel], loc: Loc, value: Any) -> str:
    """A single value (or a list) where a section of keys belongs, and what to write."""
    key = str(loc[-1]) if loc else ""
    section = _model_at(variant, loc)
    fields = list(section.model_fields) if section is not None else []
    # a plain value where a section goes is most often meant for its first key (model.name)
    if fields and isinstance(value, str | int | float) and not isinstance(value, bool):
        return (f"is a section of keys, not a single value: write {key}: "
                f"{{{fields[0]}: {value}}}")
    example = f" such as {key}: {{{fields[0]}: ...}}" if fields else ""
    given = ("a list" if isinstance(value, list) else "true/false" if isinstance(value, bool)
             else "empty" if value is None else "a single value")
    return f"is a section of keys{example}, not {given}"


def _unknown_key(variant: type[BaseModel], loc: Loc, data: dict[str, Any]) -> str:
    key = str(loc[-1])
    model = _model_at(variant, loc[:-1])
    parent = _value_at(data, loc[:-1])
    known = _names_of(model) if model else set()
    twin = to_camel(key) if to_camel(key) != key else to_snake(key)
    if twin in known and isinstance(parent, dict) and twin in parent:
        return f"given twice, as {twin} and {key}; keep one"
    if len(loc) == 1:
        users = [p for p, cls in VARIANTS.items()
                 if p not in ("plugin", "models") and key in _names_of(cls)]
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


def _names_of(model: type[BaseModel]) -> set[str]:
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
