"""Inbound authentication: API keys, Function Network signatures, any/all, metrics, exposure."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.auth.inbound import REASONS, AuthState, check_exposure
from proxy.auth.signing import Signer
from proxy.cli import main
from proxy.config import BaseConfig, build_config
from proxy.errors import ConfigError, Unauthorized
from tests.conftest import StartProxy
from tests.fakes.fxn_node import gateway_headers

GATEWAY_KEY = bytes.fromhex("8f2a55949038a9610f50fb23b5883af3b4ecb3c3bb792cbcefbd1542c692be63")
GATEWAY = Signer(GATEWAY_KEY).address
OUTSIDER_KEY = bytes(31) + b"\x05"
KEYS = ["key-current-0123456789", "key-previous-9876543210"]
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
BODY = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}]}'


def mock(**auth: Any) -> dict[str, Any]:
    return {"backend_provider": "mock", "auth": auth}


def signed(
    body: bytes = BODY,
    *,
    key: bytes = GATEWAY_KEY,
    nonce: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    ts = str(int(time.time()) + 1 if timestamp is None else timestamp)  # see gateway_headers
    headers = gateway_headers(key, body, timestamp=ts, nonce=nonce or f"n-{time.monotonic_ns()}")
    return {**headers, "Content-Type": "application/json"}


async def post(
    client: TestClient[Any, Any], headers: dict[str, str], body: bytes = BODY
) -> tuple[int, Any]:
    resp = await client.post("/v1/chat/completions", data=body, headers=headers)
    return resp.status, await resp.json()


def refused(status: int, answer: Any, reason: str) -> bool:
    error = answer["error"]
    return (status, error["type"], error["code"]) == (401, "authentication_error", reason)


async def failures(client: TestClient[Any, Any]) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    pattern = r'model_proxy_auth_failures_total\{reason="([^"]+)"\} (\S+)'
    return {reason: float(count) for reason, count in re.findall(pattern, text)}


# -- API keys -------------------------------------------------------------------------------


async def test_api_keys(start_proxy: StartProxy) -> None:
    client = await start_proxy(mock(api_keys=KEYS))
    assert (await post(client, {"Authorization": f"Bearer {KEYS[0]}"}))[0] == 200
    assert (await post(client, {"authorization": f"bearer {KEYS[1]}"}))[0] == 200
    assert (await post(client, {"x-api-key": KEYS[1]}))[0] == 200
    cases = [
        ({}, "missing_api_key"),
        ({"Authorization": f"Basic {KEYS[0]}"}, "missing_api_key"),
        ({"Authorization": "Bearer "}, "missing_api_key"),
        ({"Authorization": "Bearer wrong-key"}, "bad_api_key"),
        ({"x-api-key": KEYS[0][:-1]}, "bad_api_key"),
        ({"x-api-key": KEYS[0] + "x"}, "bad_api_key"),
    ]
    for headers, reason in cases:
        status, answer = await post(client, headers)
        assert refused(status, answer, reason), (headers, answer)
        assert KEYS[0] not in str(answer)
    counted = await failures(client)
    assert counted == {"missing_api_key": 3, "bad_api_key": 3}


async def test_duplicate_credentials_refused(start_proxy: StartProxy) -> None:
    client = await start_proxy(mock(api_keys=KEYS))
    resp = await client.post(
        "/v1/chat/completions",
        data=BODY,
        headers=[("x-api-key", KEYS[0]), ("x-api-key", "other")],
    )
    assert refused(resp.status, await resp.json(), "duplicate_header")


async def test_probes_and_scrapes_need_no_credentials(start_proxy: StartProxy) -> None:
    client = await start_proxy(mock(api_keys=KEYS))
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status == 200
    for path in ("/v1/models", "/v1/unknown", "/healthz/"):
        resp = await client.get(path)
        assert refused(resp.status, await resp.json(), "missing_api_key")


async def test_authenticated_request_is_answered_as_without_auth(start_proxy: StartProxy) -> None:
    open_client = await start_proxy(mock())
    locked = await start_proxy(mock(api_keys=KEYS))
    status, plain = await post(open_client, {})
    status_locked, answer = await post(locked, {"x-api-key": KEYS[0]})
    assert status == status_locked == 200
    assert answer["choices"] == plain["choices"]


# -- signatures -----------------------------------------------------------------------------


async def test_signed_requests(start_proxy: StartProxy) -> None:
    client = await start_proxy(mock(fxn_signatures={"allowed_addresses": [GATEWAY.lower()]}))
    assert (await post(client, signed()))[0] == 200
    replayed = signed(nonce="once")
    assert (await post(client, replayed))[0] == 200
    cases = [
        (replayed, BODY, "replayed"),
        (signed(), BODY.replace(b"hi", b"ho"), "bad_signature"),
        (signed(key=OUTSIDER_KEY), BODY, "unknown_address"),
        (signed(timestamp=int(time.time()) - 3600), BODY, "stale"),
        (signed(timestamp=int(time.time()) + 3600), BODY, "future"),
        ({**signed(), "X-Signature": "nothex"}, BODY, "bad_hex"),
        ({**signed(), "X-Signature": "ab" * 10}, BODY, "bad_length"),
        ({**signed(), "X-Address": "0x" + "zz" * 20}, BODY, "bad_address"),
        ({"Content-Type": "application/json"}, BODY, "missing_header"),
    ]
    for headers, body, reason in cases:
        status, answer = await post(client, headers, body)
        assert refused(status, answer, reason), (reason, answer)
    counted = await failures(client)
    assert set(counted) <= REASONS
    assert sum(counted.values()) == len(cases)


async def test_signed_chunked_body_is_read_once(start_proxy: StartProxy) -> None:
    client = await start_proxy(mock(fxn_signatures={"allowed_addresses": [GATEWAY]}))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(BODY), 7):
            yield BODY[i : i + 7]

    resp = await client.post("/v1/chat/completions", data=chunks(), headers=signed())
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"]


async def test_unsigned_request_is_refused_before_its_body_is_read(
    start_proxy: StartProxy,
) -> None:
    client = await start_proxy(
        {
            **mock(fxn_signatures={"allowed_addresses": [GATEWAY]}),
            "limits": {"max_body_bytes": 1024},
        }
    )
    # Over the body limit, but refused for the missing signature first: the body stays unread.
    status, answer = await post(client, {}, b"x" * 4096)
    assert refused(status, answer, "missing_header")


# -- any / all ------------------------------------------------------------------------------


async def test_mode_any(start_proxy: StartProxy) -> None:
    client = await start_proxy(mock(api_keys=KEYS, fxn_signatures={"allowed_addresses": [GATEWAY]}))
    assert (await post(client, {"x-api-key": KEYS[0]}))[0] == 200
    assert (await post(client, signed()))[0] == 200
    assert (await post(client, {**signed(), "x-api-key": "wrong"}))[0] == 200
    assert refused(*await post(client, {}), "missing_credentials")
    assert refused(*await post(client, {"x-api-key": "wrong"}), "bad_api_key")
    assert refused(*await post(client, {**signed(), "X-Nonce": "changed"}), "bad_signature")


async def test_mode_all(start_proxy: StartProxy) -> None:
    client = await start_proxy(
        mock(mode="all", api_keys=KEYS, fxn_signatures={"allowed_addresses": [GATEWAY]})
    )
    assert (await post(client, {**signed(), "x-api-key": KEYS[0]}))[0] == 200
    assert refused(*await post(client, {"x-api-key": KEYS[0]}), "missing_header")
    assert refused(*await post(client, signed()), "missing_api_key")
    assert refused(*await post(client, {**signed(), "x-api-key": "wrong"}), "bad_api_key")


def test_an_accepted_key_stays_checked_and_a_retired_one_is_refused() -> None:
    """A key that matched is remembered (no hashing on the next request), and only keys
    that matched are: a wrong one is refused every time; a reload that drops a key refuses it,
    though it was accepted before."""
    def config(keys: list[str]) -> BaseConfig:
        return build_config({"backend_provider": "mock", "auth": {"api_keys": keys}})

    state = AuthState(config(KEYS), refused=lambda reason: None)
    assert not state.needs_body

    def check(key: str) -> str:
        try:
            state.check_keys(CIMultiDictProxy(CIMultiDict({"x-api-key": key})))
        except Unauthorized as exc:
            return str(exc.code)
        return "ok"

    for _ in range(3):
        assert check(KEYS[0]) == "ok"
        assert check("wrong") == "bad_api_key"
        assert check(KEYS[0] + "x") == "bad_api_key"
    assert check(KEYS[1]) == "ok"
    state.configure(config([KEYS[1]]))  # KEYS[0] retired
    assert check(KEYS[0]) == "bad_api_key"
    assert check(KEYS[1]) == "ok"


def test_new_auth_section_keeps_replay_cache() -> None:
    def config(auth: dict[str, Any]) -> BaseConfig:
        return build_config({"backend_provider": "mock", "auth": auth})

    reasons: list[str] = []
    first = config({"fxn_signatures": {"allowed_addresses": [GATEWAY]}})
    state = AuthState(first, refused=reasons.append)
    auth = state.authenticator
    assert auth is not None and auth.verifier is not None
    assert state.enabled and state.needs_body
    state.configure(config({"fxn_signatures": {"allowed_addresses": [GATEWAY]}}))
    assert state.authenticator is auth  # an equal section: the same authenticator
    headers = signed()
    auth.verifier.verify(headers, BODY)
    state.configure(config({"fxn_signatures": {"allowed_addresses": [GATEWAY], "window": 900}}))
    rebuilt = state.authenticator
    assert rebuilt is not None and rebuilt is not auth and rebuilt.verifier is not None
    with pytest.raises(Exception, match="already used"):
        rebuilt.verifier.verify(headers, BODY)
    state.configure(config({}))
    assert state.authenticator is None and not state.enabled


# -- exposure -------------------------------------------------------------------------------


def test_public_address_needs_auth() -> None:
    assert check_exposure(build_config({"backend_provider": "mock"})) is None
    assert (
        check_exposure(build_config({"backend_provider": "mock", "server": {"host": "::1"}}))
        is None
    )
    assert (
        check_exposure(
            build_config(
                {
                    "backend_provider": "mock",
                    "server": {"host": "0.0.0.0"},
                    "auth": {"api_keys": KEYS},
                }
            )
        )
        is None
    )
    with pytest.raises(ConfigError) as info:
        check_exposure(build_config({"backend_provider": "mock", "server": {"host": "0.0.0.0"}}))
    assert "server.host: 0.0.0.0" in info.value.problems[0]
    assert "allow_unauthenticated" in info.value.problems[0]
    warning = check_exposure(
        build_config(
            {
                "backend_provider": "mock",
                "server": {"host": "0.0.0.0"},
                "auth": {"allow_unauthenticated": True},
            }
        )
    )
    assert warning is not None and "SERVING WITHOUT AUTHENTICATION on 0.0.0.0" in warning


def test_check_and_serve_refuse_public_address_without_auth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "model_backend.yaml"
    config.write_text("backend_provider: mock\nserver: {host: 0.0.0.0}\n")
    assert main(["check", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{config}: server.host: 0.0.0.0 is reachable")
    assert "auth.allow_unauthenticated" in err and err.count("\n") == 1
    # serve refuses before binding, also when the public address comes from the command line
    config.write_text("backend_provider: mock\n")
    assert main(["serve", "-c", str(config), "--host", "0.0.0.0", "--port", "1"]) == 2
    assert capsys.readouterr().err.startswith("command line: --host: server.host: 0.0.0.0")
    config.write_text(
        "backend_provider: mock\nserver: {host: 0.0.0.0}\nauth: {allow_unauthenticated: true}\n"
    )
    assert main(["check", "-c", str(config)]) == 0
    assert "warning: SERVING WITHOUT AUTHENTICATION" in capsys.readouterr().err


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"api_keys": ["has space"]}, "api_keys: [0] must be"),
        ({"api_keys": [""]}, "api_keys: [0] must be"),
        ({"fxn_signatures": {"allowed_addresses": ["0x12"]}}, "[0] must be 0x"),
        ({"fxn_signatures": {"allowed_addresses": []}}, "allowed_addresses"),
        ({"mode": "some"}, "mode"),
    ],
)
def test_bad_auth_config(tmp_path: Path, auth: dict[str, Any], message: str) -> None:
    import yaml

    from proxy.config import load_config

    path = tmp_path / "model_backend.yaml"
    path.write_text(yaml.safe_dump({"backend_provider": "mock", "auth": auth}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in "\n".join(info.value.problems)
    assert "has space" not in "\n".join(info.value.problems)
