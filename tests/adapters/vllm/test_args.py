"""``engine:`` as ``vllm serve`` flags: parsed by vLLM's own argument parser before anything
loads, every problem one line naming the key."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.adapters.vllm.runtime import serve_args
from proxy.config import EngineSection
from proxy.errors import ConfigError
from tests.adapters.vllm.conftest import SLOW

pytestmark = SLOW

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "unknown option": ({"args": {"max_num_seq": 4}},
                       "engine.args.max_num_seq: not a vllm serve option "
                       "(did you mean 'max_num_seqs'?)"),
    "bad value": ({"args": {"max_num_seqs": "many"}},
                  "engine.args.max_num_seqs: --max-num-seqs: invalid int value: 'many'"),
    "not a boolean": ({"args": {"enforce_eager": "yes"}},
                      "engine.args.enforce_eager: expected true or false, got 'yes'"),
    "bad choice": ({"dtype": "float7"}, "engine.dtype: --dtype: invalid choice: 'float7'"),
    "nested config": ({"args": {"structured_outputs_config": {"bogus": 1}}},
                      "engine.args.structured_outputs_config: --structured-outputs-config: "
                      "1 validation error for StructuredOutputsConfig; bogus;"),
    "unknown tool parser": ({"tool_call_parser": "hermez"},
                            "engine.tool_call_parser: vLLM has no parser 'hermez' "
                            "(did you mean 'hermes'?)"),
    "unknown reasoning parser": ({"reasoning_parser": "nope"},
                                 "engine.reasoning_parser: vLLM has no parser 'nope'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_with_one_line(case: str, tiny_model: Path) -> None:
    extra, expected = REFUSED[case]
    with pytest.raises(ConfigError) as info:
        serve_args(EngineSection(model=str(tiny_model), **extra), ("tiny",))
    (line,) = info.value.problems
    assert line.startswith(expected), line
    assert "\n" not in line


async def test_settings_reach_vllm_as_its_flags(tiny_model: Path) -> None:
    section = EngineSection(
        model=str(tiny_model), tool_call_parser="pythonic", enable_auto_tool_choice=True,
        reasoning_parser="granite", chat_template="{{ messages }}",
        args={"max-num-seqs": 3, "enable_prefix_caching": False,
              "structured_outputs_config": {"enable_in_reasoning": True}})
    args = serve_args(section, ("tiny", "other"))
    assert args.served_model_name == ["tiny", "other"]
    assert args.tool_call_parser == "pythonic" and args.enable_auto_tool_choice is True
    assert args.reasoning_parser == "granite" and args.chat_template == "{{ messages }}"
    assert args.max_num_seqs == 3 and args.enable_prefix_caching is False
    assert args.structured_outputs_config.enable_in_reasoning is True
    assert args.disable_log_stats is False  # the stat loggers feed /metrics


async def test_serve_reports_them_before_loading(tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({"backend_provider": "vllm", "engine": {
        "model": str(tiny_model), "args": {"max_num_seq": 4, "enforce_eager": "yes"}}}))
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", "serve", "-c", str(path)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"{path}: ")]
    assert sorted(lines) == [
        f"{path}: engine.args.enforce_eager: expected true or false, got 'yes'",
        f"{path}: engine.args.max_num_seq: not a vllm serve option "
        "(did you mean 'max_num_seqs'?)",
    ], done.stderr[-2000:]
