"""Request ids: on every answer, sent upstream, in error bodies and SSE error events."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.server.requestid import MAX_LENGTH, RequestIds, fit
from tests.conftest import StartProxy, upstream_url
from tests.fakes.faulty_upstream import Faulty, sse_events
from tests.fakes.openai_upstream import FakeOpenAI

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def custom(server: TestServer, **extra: Any) -> dict[str, Any]:
    return {"backend_provider": "custom", "url": upstream_url(server), **extra}


async def test_a_fit_client_id_is_answered_and_sent_upstream(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream))
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"X-Request-ID": "trace-7f:abc/1"})
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "trace-7f:abc/1"
    sent = {k.lower(): v for k, v in fake_openai.seen[-1].headers.items()}
    assert sent["x-request-id"] == "trace-7f:abc/1"


@pytest.mark.parametrize("given", [
    "x" * (MAX_LENGTH + 1), "has space", "tab\there", "caf\u00e9", "",
])
async def test_an_unfit_client_id_is_replaced_everywhere(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI, given: str
) -> None:
    client = await start_proxy(custom(openai_upstream))
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"X-Request-ID": given.encode().decode("latin-1")})
    assert resp.status == 200
    made = resp.headers["X-Request-ID"]
    assert made != given and fit(made)
    sent = {k.lower(): v for k, v in fake_openai.seen[-1].headers.items()}
    assert sent["x-request-id"] == made


async def test_made_ids_differ_per_request_and_reach_the_upstream(
    start_proxy: StartProxy, openai_upstream: TestServer, fake_openai: FakeOpenAI
) -> None:
    client = await start_proxy(custom(openai_upstream))
    answered = []
    for stream in (False, True, False):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 200
        await resp.read()
        answered.append(resp.headers["X-Request-ID"])
    assert len(set(answered)) == 3
    completions = [s for s in fake_openai.seen if s.path == "/v1/chat/completions"]
    assert [s.headers["X-Request-ID"] for s in completions] == answered


async def test_error_bodies_carry_the_id_beside_the_openai_error(
    start_proxy: StartProxy, openai_upstream: TestServer
) -> None:
    client = await start_proxy(custom(openai_upstream, auth={"api_keys": ["k" * 20]}))
    key = {"Authorization": "Bearer " + "k" * 20}
    for method, path, status, more in (("POST", "/v1/chat/completions", 401, {}),
                                       ("GET", "/nowhere", 404, key)):
        resp = await client.request(method, path, json=CHAT,
                                    headers={"X-Request-ID": "e-1", **more})
        assert resp.status == status
        body = await resp.json()
        assert body["request_id"] == "e-1" == resp.headers["X-Request-ID"]
        assert set(body["error"]) == {"message", "type", "param", "code"}
    resp = await client.post("/v1/chat/completions", data=b"{",
                             headers={**key, "Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["request_id"] == resp.headers["X-Request-ID"]


async def test_upstream_failures_and_probes_carry_the_id(
    start_proxy: StartProxy, unused_tcp_port: int
) -> None:
    client = await start_proxy({"backend_provider": "custom",
                                "url": f"http://127.0.0.1:{unused_tcp_port}",
                                "retries": {"attempts": 1}})
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    assert (await resp.json())["request_id"] == resp.headers["X-Request-ID"]
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
        resp = await client.get(path, headers={"X-Request-ID": "probe-1"})
        assert resp.headers["X-Request-ID"] == "probe-1", path


async def test_a_stream_that_fails_part_way_names_the_id_in_its_error_event(
    start_proxy: StartProxy, aiohttp_server: Any
) -> None:
    upstream = await aiohttp_server(Faulty(["fail_after_first_chunk"]).app())
    client = await start_proxy(custom(upstream))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                             headers={"X-Request-ID": "s-1"})
    assert resp.headers["X-Request-ID"] == "s-1"
    events = sse_events(await resp.read())
    last = [e for e in events if isinstance(e, dict) and "error" in e][-1]
    assert last["request_id"] == "s-1"


def test_made_ids_are_unique_per_process_and_fit() -> None:
    ids, other = RequestIds(), RequestIds()
    made = {ids.new() for _ in range(1000)}
    assert len(made) == 1000 and all(fit(i) for i in made)
    assert ids.prefix != other.prefix
    assert ids.of("kept") == "kept"
    assert ids.of(None).startswith(ids.prefix)
