"""A body that names a member the proxy reads twice is refused: never one reading to route by
and another reaching the upstream."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import StartProxy, upstream_url
from tests.fakes.openai_upstream import FakeOpenAI

HI = b'"messages":[{"role":"user","content":"hi"}]'


async def two_models(start_proxy: StartProxy, aiohttp_server: Any
                     ) -> tuple[TestClient, FakeOpenAI, FakeOpenAI]:
    alpha, beta = FakeOpenAI(), FakeOpenAI()
    up_alpha, up_beta = await aiohttp_server(alpha.app()), await aiohttp_server(beta.app())
    client = await start_proxy({"models": [
        {"backend_provider": "custom", "url": upstream_url(up_alpha), "api_key": "alpha-key",
         "model": {"name": "alpha"}},
        {"backend_provider": "custom", "url": upstream_url(up_beta), "api_key": "beta-key",
         "model": {"name": "beta"}},
    ]})
    return client, alpha, beta


def completions(fake: FakeOpenAI) -> list[Any]:
    return [seen for seen in fake.seen if seen.path == "/v1/chat/completions"]


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model":"alpha","model":"beta",' + HI + b"}", "model"),
    (b'{ "model" : "alpha" ,\n "model":"beta",' + HI + b"}", "model"),
    # the same name spelt with an escape: the same member to every JSON reader
    (b'{"model":"alpha","\\u006dodel":"beta",' + HI + b"}", "model"),
    (b'{"model":"beta","stream":true,"stream":false,' + HI + b"}", "stream"),
    (b'{"model":"beta","stream":true,"stream_options":{"include_usage":false},'
     b'"stream_options":{"include_usage":true},' + HI + b"}", "stream_options"),
    (b'{"model":"beta","stream":true,'
     b'"stream_options":{"include_usage":false,"include_usage":true},' + HI + b"}",
     "stream_options.include_usage"),
])
async def test_a_member_named_twice_is_refused_before_any_upstream(
    start_proxy: StartProxy, aiohttp_server: Any, body: bytes, param: str
) -> None:
    client, alpha, beta = await two_models(start_proxy, aiohttp_server)
    resp = await client.post("/v1/chat/completions", data=body,
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "duplicate_member"
    assert error["param"] == param
    assert repr(param) in error["message"]
    assert completions(alpha) == [] and completions(beta) == []


async def test_the_names_inside_other_members_and_pretty_bodies_pass(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    client, alpha, beta = await two_models(start_proxy, aiohttp_server)
    schema = (b'"tools":[{"type":"function","function":{"name":"pick","parameters":'
              b'{"type":"object","properties":{"model":{"type":"string"},'
              b'"stream":{"type":"boolean"}}}}}]')
    bodies = [
        b'{"model":"beta",' + HI + b"," + schema + b"}",
        b'{\n  "model": "beta",\n  "stream": false,\n  ' + HI + b"\n}",
        # escapes that are not letters (HTML-safe encoders, non-ASCII text) are ordinary
        b'{"model":"beta","messages":[{"role":"user","content":"\\u003cb\\u003e caf\\u00e9"}]}',
        # one member named twice is refused only if the proxy reads it
        b'{"model":"beta","user":"a","user":"b",' + HI + b"}",
    ]
    for body in bodies:
        resp = await client.post("/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 200, await resp.text()
    assert len(completions(beta)) == len(bodies)
    assert completions(alpha) == []
    assert {seen.headers.get("X-Api-Key") or seen.headers.get("x-api-key")
            for seen in completions(beta)} == {"beta-key"}
