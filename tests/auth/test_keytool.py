"""Keys: files, loading, ``model-proxy keygen`` and ``sign``, and signatures over HTTP."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import stat
from pathlib import Path

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from eth_keys.constants import SECPK1_N

from proxy.auth.signing import Signer, Verifier, generate_key_file
from proxy.cli import main
from tests.fakes.fxn_node import FAKE_NODE, create_fake_node, recover_signer

KEY_A = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
KEY_B = bytes(31) + b"\x07"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture
def signer() -> Signer:
    return Signer(KEY_A)


# -- keys -----------------------------------------------------------------------------------


def test_signer_does_not_reveal_key(signer: Signer) -> None:
    secret = KEY_A.hex()
    assert secret not in repr(signer) and secret not in str(signer)
    assert signer.address in repr(signer)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)


@pytest.mark.parametrize(
    "key",
    [
        "0x" + "ab" * 31,
        "ab" * 32 + "a",
        "xy" * 32,
        "00" * 32,
        format(SECPK1_N, "064x"),
        b"\x01" * 31,
    ],
    ids=["short", "odd", "not-hex", "zero", "order", "short-bytes"],
)
def test_bad_keys_refused_without_echo(key: str | bytes) -> None:
    with pytest.raises(ValueError) as info:
        Signer(key)
    shown = key if isinstance(key, str) else key.hex()
    assert shown.removeprefix("0x") not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_signer_rejects_unsendable_fields(signer: Signer) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        signer.headers(BODY, timestamp="soon")
    with pytest.raises(ValueError, match="nonce"):
        signer.headers(BODY, nonce="two words")


def test_generate_key_file(tmp_path: Path) -> None:
    path = tmp_path / "nodekey.json"
    address = generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["address"] == address
    assert document["public_key"].startswith("04") and len(document["public_key"]) == 130
    assert len(document["private_key"]) == 64
    loaded = Signer.from_file(path)
    assert loaded.address == address
    assert Verifier([address]).verify(loaded.headers(BODY), BODY) == address


def test_generate_key_file_refuses_overwrite_and_symlinks(tmp_path: Path) -> None:
    path = tmp_path / "nodekey.json"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    assert path.read_text() == "keep me"
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(FileExistsError):
        generate_key_file(link)
    assert not (tmp_path / "elsewhere.json").exists()


def test_generated_keys_differ(tmp_path: Path) -> None:
    assert generate_key_file(tmp_path / "a") != generate_key_file(tmp_path / "b")


@pytest.mark.parametrize(
    "content",
    [
        KEY_A.hex(),
        "0x" + KEY_A.hex() + "\n",
        json.dumps({"private_key": KEY_A.hex(), "address": "ignored"}),
        json.dumps({"private_key": "0x" + KEY_A.hex()}),
    ],
    ids=["hex", "0x-hex-newline", "json", "json-0x"],
)
def test_key_file_formats(tmp_path: Path, content: str) -> None:
    path = tmp_path / "key"
    path.write_text(content)
    assert Signer.from_file(path).address == Signer(KEY_A).address


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"key": KEY_A.hex()}), 'no "private_key"'),
        (json.dumps([KEY_A.hex()]), 'no "private_key"'),
        (KEY_A.hex()[:-2], "64 hex digits"),
    ],
    ids=["broken-json", "no-key", "json-list", "short-hex"],
)
def test_bad_key_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        Signer.from_file(path)
    assert KEY_A.hex()[:-2] not in str(info.value)
    assert str(path) in str(info.value)


def test_unreadable_key_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read key file .*absent: No such file or dir"):
        Signer.from_file(tmp_path / "absent")
    if os.geteuid() != 0:  # root reads anything; the mode check would not bite
        path = tmp_path / "locked"
        path.write_text(KEY_A.hex())
        path.chmod(0)
        with pytest.raises(ValueError, match="PermissionError"):
            Signer.from_file(path)


# -- over HTTP, against a fake network node that verifies on its own ------------------------


async def test_fake_node_accepts_our_signatures(
    aiohttp_client: AiohttpClient, signer: Signer
) -> None:
    app = create_fake_node(allowed=[signer.address], fail_first=1)
    client = await aiohttp_client(app)
    live = Signer(KEY_A)  # real clock: the fake node checks the window against time.time()

    async def post(headers: dict[str, str], body: bytes = BODY) -> int:
        response = await client.post("/v1/chat/completions", data=body, headers=headers)
        await response.read()
        return response.status

    assert await post({}) == 401
    assert await post(live.headers(BODY)) == 503  # told to fail the first signed request
    signed = live.headers(BODY)
    assert await post(signed) == 200
    assert await post(signed) == 401  # the fake node refuses replays too
    assert await post(live.headers(BODY), BODY + b" ") == 401
    assert await post(Signer(KEY_B).headers(BODY)) == 401
    received = app[FAKE_NODE].received
    assert [r.status for r in received] == [401, 503, 200, 401, 401, 401]
    assert received[2].signer == signer.address
    assert received[1].headers["X-Nonce"] != received[2].headers["X-Nonce"]


async def test_fake_node_streams(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_fake_node(stream_chunks=2))
    body = b'{"model":"m","stream":true,"messages":[]}'
    live = Signer(KEY_A)
    response = await client.post("/v1/chat/completions", data=body, headers=live.headers(body))
    assert response.headers["Content-Type"] == "text/event-stream"
    text = (await response.read()).decode()
    assert text.count("data: ") == 3 and text.endswith("data: [DONE]\n\n")


# -- the command line -----------------------------------------------------------------------


def test_keygen_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fxn.key"
    assert main(["keygen", "-o", str(path)]) == 0
    out, err = capsys.readouterr()
    address = out.strip()
    assert Signer.from_file(path).address == address
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "0600" in err and json.loads(path.read_text())["private_key"] not in out + err
    before = path.read_bytes()
    assert main(["keygen", "-o", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before


def signed_by_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    assert main(["sign", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def test_sign_command_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "fxn.key"
    key.write_text(KEY_A.hex())
    body_file = tmp_path / "body.json"
    body_file.write_bytes(BODY + b"\n")  # the trailing newline is part of what is signed

    headers = signed_by_cli(["-k", str(key), "-f", str(body_file)], capsys)
    assert recover_signer(BODY + b"\n", headers["X-Timestamp"], headers["X-Nonce"],
                          headers["X-Signature"]) == Signer(KEY_A).address

    assert main(["sign", "-k", str(key), "-d", BODY.decode(), "--format", "json",
                 "--timestamp", "1750000000", "--nonce", "fixed"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json == Signer(KEY_A).headers(BODY, timestamp="1750000000", nonce="fixed")

    assert main(["sign", "-k", str(key), "-f", str(body_file), "--format", "curl",
                 "--url", "http://127.0.0.1:1/v1/completions"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[:3] == ["curl", "-sS", "http://127.0.0.1:1/v1/completions"]
    assert words[-2:] == ["--data-binary", f"@{body_file}"]
    sent = dict(words[i + 1].split(": ", 1) for i, w in enumerate(words) if w == "-H")
    assert recover_signer(BODY + b"\n", sent["X-Timestamp"], sent["X-Nonce"],
                          sent["X-Signature"]) == Signer(KEY_A).address


def test_sign_command_key_from_environment_and_body_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FXN_PRIVATE_KEY", "0x" + KEY_B.hex())
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(BODY)))
    headers = signed_by_cli([], capsys)
    verifier = Verifier([Signer(KEY_B).address])
    assert verifier.verify(headers, BODY) == Signer(KEY_B).address


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], None, "give --key-file or set FXN_PRIVATE_KEY"),
        (["-k", "missing.key", "-d", "x"], None, "cannot read key file"),
        (["-d", "x"], "ab" * 31, "64 hex digits"),
        (["-d", "x", "--nonce", "two words"], KEY_A.hex(), "nonce"),
        (["-d", "x", "--timestamp", "soon"], KEY_A.hex(), "timestamp"),
    ],
    ids=["no-key", "missing-file", "bad-key", "bad-nonce", "bad-timestamp"],
)
def test_sign_command_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    args: list[str], env: str | None, message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FXN_PRIVATE_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("FXN_PRIVATE_KEY", env)
    assert main(["sign", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert env is None or env not in err
