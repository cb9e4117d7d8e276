"""The repository's description of Ollama's wire format matches Ollama's own openapi.yaml.

The tests hold the adapter and the fake Ollama to ``tests/fakes/ollama_wire.yaml``; this test
holds that file to the reference document wherever a copy is at hand. ``.ci/run`` sets
``OLLAMA_REFERENCE_REQUIRED=1`` when the copy beside the repository exists, so there a missing
or drifted reference fails instead of skipping.
"""

from __future__ import annotations

import os

import pytest

from tests.fakes.openapi import REFERENCE_PATH, reference, schemas


def test_every_schema_matches_the_reference() -> None:
    theirs = reference()
    if theirs is None:
        if os.environ.get("OLLAMA_REFERENCE_REQUIRED") == "1":
            pytest.fail(f"Ollama's openapi.yaml is required but not at {REFERENCE_PATH}")
        pytest.skip(f"no copy of Ollama's openapi.yaml at {REFERENCE_PATH} (OLLAMA_OPENAPI)")
    ours = schemas()
    assert ours, "the repository's Ollama schemas are empty"
    missing = sorted(set(ours) - set(theirs))
    assert missing == [], f"schemas not in Ollama's openapi.yaml: {missing}"
    drifted = sorted(name for name, schema in ours.items() if theirs[name] != schema)
    assert drifted == [], f"schemas that differ from Ollama's openapi.yaml: {drifted}"
