"""Checks JSON values against the schemas of Ollama's API (a small subset of JSON Schema: type,
required, properties, items, enum, oneOf, $ref), so the fake Ollama and the adapter's requests
are held to a written description of the wire format rather than to the code under test.

The schemas live in the repository (``ollama_wire.yaml`` beside this file); ``reference()``
finds Ollama's own ``openapi.yaml`` when a copy is at hand, so a test can compare the two.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

_REPO = Path(__file__).resolve().parents[2]
#: The project's own description of the wire format.
WIRE_PATH = Path(__file__).with_name("ollama_wire.yaml")
#: Where a copy of Ollama's openapi.yaml may lie beside the repository; OLLAMA_OPENAPI overrides.
REFERENCE_PATH = Path(
    os.environ.get("OLLAMA_OPENAPI", _REPO.parent / "shared" / "reference" / "ollama-openapi.yaml")
)
#: The keywords ``problems`` reads; a reference schema reduced to them must equal ours.
KEYWORDS = frozenset({"type", "required", "properties", "items", "enum", "oneOf", "$ref"})

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
    found: dict[str, Any] = yaml.safe_load(WIRE_PATH.read_text())["schemas"]
    return found


def reference() -> dict[str, Any] | None:
    """Ollama's own schemas, reduced to :data:`KEYWORDS`, when a copy is at hand."""
    if not REFERENCE_PATH.is_file():
        return None
    document = yaml.safe_load(REFERENCE_PATH.read_text())
    return {name: reduce(schema) for name, schema in document["components"]["schemas"].items()}


def reduce(schema: Any) -> Any:
    """``schema`` with only the keywords this checker reads (descriptions, examples dropped)."""
    if isinstance(schema, list):
        return [reduce(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: reduce(sub) for name, sub in value.items()}
        elif key in KEYWORDS:
            out[key] = reduce(value)
    return out


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
