"""``check`` refuses every config ``serve`` could not run: one line each, exit 2, no traceback."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)
)
ADDRESS = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
BASE = "backend_provider: custom\nurl: http://127.0.0.1:9\n"

CASES = {
    "newline inside api_key": (BASE + 'api_key: "zq7\\nw9"\n', "api_key: ", "control characters"),
    "newline inside bearer_token": (BASE + 'bearer_token: "zq7\\rw9"\n', "bearer_token: ",
                                    "control characters"),
    "CRLF in api_key_header": (BASE + 'api_key: k\napi_key_header: "X-Key\\r\\nX-Evil: 1"\n',
                               "api_key_header: ", "header name"),
    "newline in url": ('backend_provider: custom\nurl: "http://127.0.0.1:9/\\nx"\n', "url: ",
                       "control characters"),
    "alias bomb": (BASE + BOMB, "YAML", "aliases"),
    "deep nesting": (BASE + "model: {aliases: " + "[" * 3000 + "]" * 3000 + "}\n", "YAML",
                     "levels deep"),
    "self reference": (BASE + "model: &m {aliases: *m}\n", "YAML", "contains it"),
    "list key": (BASE + "? [a, b]\n: 1\n", "YAML", "not a list"),
    "mapping key": (BASE + "? {a: 1}\n: 1\n", "YAML", "not a mapping"),
    "unquoted address": (BASE + f"auth: {{fxn_signatures: {{allowed_addresses: [{ADDRESS}]}}}}\n",
                         "auth.fxn_signatures.allowed_addresses", "quotes"),
}


async def check(path: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "check", "-c", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_each_unrunnable_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    paths = {}
    for i, (name, (text, _, _)) in enumerate(CASES.items()):
        paths[name] = tmp_path / f"c{i}.yaml"
        paths[name].write_text(text)
    paths["dev zero"] = Path("/dev/zero")
    results = await asyncio.gather(*(check(p) for p in paths.values()))
    for (name, path), (code, _, err) in zip(paths.items(), results, strict=True):
        assert code == 2, (name, err)
        assert "Traceback" not in err, name
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith(f"{path}"), (name, err)
        if name == "dev zero":
            assert "larger than" in err
            continue
        _, where, what = CASES[name]
        assert where in lines[0] and what in lines[0], (name, err)
        assert "zq7" not in lines[0], err  # secrets are never quoted


@pytest.mark.parametrize("value", ['"secret-1\\n"', "${KEY}"])
async def test_trailing_newline_of_a_secret_is_stripped(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + f"api_key: {value}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import sys; from proxy.config import load_config; "
        "print(repr(load_config(sys.argv[1]).api_key.get_secret_value()))", str(path),
        stdout=asyncio.subprocess.PIPE, env={"KEY": "secret-1\n", "PATH": "/usr/bin"},
    )
    out, _ = await proc.communicate()
    assert out.decode().strip() == "'secret-1'"


async def test_merge_keys_and_a_quoted_address_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "x-common: &common {context_length: 4096, aliases: [a]}\n"
        + BASE
        + "model:\n  <<: *common\n  name: m\n  aliases: [b]\n"
        + f'auth: {{fxn_signatures: {{allowed_addresses: ["{ADDRESS}"]}}}}\n'
    )
    code, out, err = await check(path)
    assert code == 2 and "x-common: unknown key" in err  # top-level extras stay errors
    path.write_text(
        BASE + "model:\n  <<: {context_length: 4096, aliases: [a]}\n  name: m\n  aliases: [b]\n"
        + f'auth: {{fxn_signatures: {{allowed_addresses: ["{ADDRESS}"]}}}}\n'
    )
    code, out, err = await check(path)
    assert code == 0, err
    assert "context_length: 4096" in out and "- b" in out and "- a" not in out
