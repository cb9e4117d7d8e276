"""Paths that another server would resolve differently never get past the router."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.raw_upstream import RawUpstream
from tests.hardening.wire import CHAT, exchange, request, write_config
from tests.server.test_run import serving

ESCAPES = [
    ("GET", "/v1/../metrics"),
    ("GET", "/v1/%2e%2e/admin"),
    ("GET", "/v1/%2E%2E/admin"),
    ("GET", "/v1/..%2fadmin"),
    ("GET", "/v1/foo/..%2F..%2Fadmin"),
    ("GET", "/v1/..\\admin"),
    ("GET", "/v1/.."),
    ("GET", "/v1/..;/admin"),
    ("POST", "/v1/./chat/completions"),
    ("POST", "/v1/x/../chat/completions"),
    ("POST", "/v1/%2e/chat/completions"),
    ("POST", "/v1//chat/completions"),
    ("POST", "/v1/chat%2fcompletions"),
]


@pytest.fixture
async def upstream() -> RawUpstream:
    server = await RawUpstream().start()
    yield server
    await server.close()


async def test_dot_segments_and_encoded_separators_are_refused(
    tmp_path: Path, upstream: RawUpstream
) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        f"backend_provider: custom\nurl: {upstream.url}\napi_key: upstream-credential-1\n"
        "model: {name: m}\n",
    )
    async with serving(config) as (_, url):
        for method, target in ESCAPES:
            status, _, body = await exchange(url, request(method, target, CHAT))
            assert status == 400, (target, body)
            assert b'"invalid_path"' in body, target
        # nothing reached the upstream, with its credential or without (but the model probe)
        assert [r.target for r in upstream.seen if r.target != "/v1/models"] == []
        # ordinary paths, query strings with % included, still work
        status, _, _ = await exchange(url, request("POST", "/v1/chat/completions?x=%2e%2e", CHAT))
        assert status == 200
        status, _, _ = await exchange(url, request("GET", "/v1/files/a.b?q=%26"))
        assert status == 200
        assert [r.target for r in upstream.seen if r.target != "/v1/models"] == [
            "/v1/chat/completions", "/v1/files/a.b?q=%26"]


async def test_passthrough_can_be_turned_off_or_limited_to_prefixes(
    tmp_path: Path, upstream: RawUpstream
) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        f"backend_provider: custom\nurl: {upstream.url}\n"
        "passthrough: {enabled: true, prefixes: [/v1/files]}\n",
    )
    async with serving(config) as (_, url):
        status, _, _ = await exchange(url, request("GET", "/v1/files/1"))
        assert status == 200
        status, _, body = await exchange(url, request("GET", "/v1/admin"))
        assert status == 404 and b"unknown_path" in body
    config.write_text(
        f"backend_provider: custom\nurl: {upstream.url}\npassthrough: {{enabled: false}}\n"
    )
    async with serving(config) as (_, url):
        status, _, _ = await exchange(url, request("GET", "/v1/files/1"))
        assert status == 404
        status, _, _ = await exchange(url, request("POST", "/v1/chat/completions", CHAT))
        assert status == 200
    assert [r.target for r in upstream.seen if r.target != "/v1/models"] == [
        "/v1/files/1", "/v1/chat/completions"]


def test_prefixes_outside_v1_are_config_errors() -> None:
    from pydantic import ValidationError

    from proxy.config import PassthroughSection

    for bad in ("/admin", "/v1/../x", "/v1/%2e", "/v1/a?b"):
        with pytest.raises(ValidationError):
            PassthroughSection(prefixes=(bad,))
