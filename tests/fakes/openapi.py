"""Checks JSON values against the schemas of Ollama's ``openapi.yaml`` (a small subset of JSON
Schema: type, required, properties, items, enum, oneOf, $ref), so the fake Ollama and the
adapter's requests can be held to the reference document instead of to our reading of it.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

_REPO = Path(__file__).resolve().parents[2]
#: Where the reference lives next to the repository; OLLAMA_OPENAPI overrides it.
OPENAPI_PATH = Path(
    os.environ.get("OLLAMA_OPENAPI", _REPO.parent / "shared" / "reference" / "ollama-openapi.yaml")
)

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


@cache
def schemas() -> dict[str, Any]:
    if not OPENAPI_PATH.is_file():
        raise FileNotFoundError(
            f"Ollama's openapi.yaml is not at {OPENAPI_PATH}; set OLLAMA_OPENAPI to its path"
        )
    document = yaml.safe_load(OPENAPI_PATH.read_text())
    found: dict[str, Any] = document["components"]["schemas"]
    return found


def problems(value: Any, schema_name: str) -> list[str]:
    """Every way ``value`` breaks the named schema, as ``path: what`` lines (empty: it fits)."""
    out: list[str] = []
    _check(value, {"$ref": f"#/components/schemas/{schema_name}"}, "$", out)
    return out


def _check(value: Any, schema: dict[str, Any], path: str, out: list[str]) -> None:
    ref = schema.get("$ref")
    if ref is not None:
        schema = schemas()[ref.rsplit("/", 1)[-1]]
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            trial: list[str] = []
            _check(value, option, path, trial)
            matches += not trial
        if matches != 1:
            out.append(f"{path}: matches {matches} of the oneOf options, not exactly one")
        return
    kind = schema.get("type")
    if kind is not None:
        types = _TYPES[kind]
        # bool is an int in Python; JSON keeps them apart.
        if not isinstance(value, types) or (isinstance(value, bool) and kind != "boolean"):
            out.append(f"{path}: expected {kind}, got {type(value).__name__}")
            return
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                out.append(f"{path}: missing required {key!r}")
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}", out)
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{index}]", out)
