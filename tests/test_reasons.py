"""Messages say what went wrong in words (``No such file or directory``, ``Connection
refused``), never an exception's class name (``FileNotFoundError``,
``ClientConnectorDNSError``): ``proxy.errors.reason``."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from proxy.config import load_config
from proxy.errors import ConfigError, reason
from proxy.node.chain import Chain, ChainError
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


async def test_a_refused_connection_reads_as_words() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(f"http://127.0.0.1:{free_port()}/")
    assert reason(caught.value) == "Connection refused"


def test_a_name_that_does_not_resolve_reads_as_words() -> None:
    # what aiohttp raises when getaddrinfo fails, made as aiohttp makes it
    key = ConnectionKey("no-such-host.invalid", 80, False, True, None, None, None)
    error = aiohttp.ClientConnectorDNSError(
        key, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert reason(error) == "the host name does not resolve (Name or service not known)"


def test_other_exceptions_read_as_their_kind_in_words_never_their_text() -> None:
    assert reason(TimeoutError()) == "timed out"
    bad = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert reason(bad) == "not UTF-8 text"
    assert reason(aiohttp.ServerDisconnectedError()) == "server disconnected error"
    assert reason(ValueError("sk-secret")) == "value error"



def test_a_missing_node_key_says_no_such_file_and_how_to_make_one(tmp_path: Path) -> None:
    path = tmp_path / "model_backend.yaml"
    path.write_text("backend_provider: mock\nnode:\n  key_file: nodekey.json\n"
                    "  scheduler_address: '0x" + "ab" * 20 + "'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    line = caught.value.problems[-1]
    assert line.endswith(": No such file or directory (make one with: model-proxy keygen -o "
                         f"{tmp_path / 'nodekey.json'})")
    assert "Error" not in line


async def test_an_unreachable_chain_says_why_in_words() -> None:
    async with aiohttp.ClientSession() as session:
        chain = Chain(session, f"http://127.0.0.1:{free_port()}/", timeout=5)
        with pytest.raises(ChainError) as caught:
            await chain.call("0x" + "11" * 20, b"")
    assert str(caught.value) == "JSON-RPC unreachable: Connection refused"


def test_no_message_is_built_from_a_class_name() -> None:
    found = [f"{path.relative_to(ROOT)}:{n}"
             for path in sorted((ROOT / "proxy").rglob("*.py"))
             if path != ROOT / "proxy" / "errors.py"  # reason() itself spells them out
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"type\((exc|error|e)\)\.__name__", line)]
    assert found == []
