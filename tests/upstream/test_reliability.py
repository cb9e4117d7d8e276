"""Fault injection: every way an upstream or a client can fail ends bounded, clear and counted.

Each test runs the proxy and a misbehaving upstream (``tests.fakes.faulty_upstream``) on real
sockets on 127.0.0.1 and checks the client's outcome, how many attempts reached the upstream,
and that the answer came within its timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import build_config
from proxy.server.app import create_app
from tests.conftest import StartProxy, free_port, upstream_url
from tests.fakes.clock import FakeClock
from tests.fakes.faulty_upstream import Faulty, sse_events

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
#: Fast retries, so the suite does not spend its time in backoff.
FAST_RETRIES = {"attempts": 3, "backoff_initial": 0.01, "backoff_max": 0.05}


def config(url: str, **sections: Any) -> dict[str, Any]:
    return {"backend_provider": "custom", "url": url, "retries": FAST_RETRIES, **sections}


@pytest.fixture
def faulty() -> Faulty:
    return Faulty()


@pytest.fixture
async def upstream(aiohttp_server: Any, faulty: Faulty) -> TestServer:
    server: TestServer = await aiohttp_server(faulty.app())
    return server


async def metric(client: TestClient, name: str) -> float:
    """A sample's value from the proxy's ``/metrics`` (0 when absent)."""
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0




class Clock:
    """Wall time, for what real timers bound (the upstream client's timeouts, the drain):
    a lower bound only, as a loaded machine may take longer; breakers, queues, retries and
    cool-downs run on a ``FakeClock`` instead."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


async def until(condition: Any, what: str) -> None:
    """Let the loop run until ``condition()`` holds (each step a real event: a request in)."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


# --- upstream faults before the answer ------------------------------------------------------


async def test_refused_connection_is_retried_then_502(start_proxy: StartProxy) -> None:
    clock = FakeClock(auto=True)
    client = await start_proxy(config(f"http://127.0.0.1:{free_port()}"), clock=clock)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    assert "unreachable" in (await resp.json())["error"]["message"]
    assert len(clock.slept) == 2 and all(0 <= s <= 0.05 for s in clock.slept)  # the backoff
    assert await metric(client, "model_proxy_upstream_retries_total") == 2


async def test_reset_before_answer_is_retried(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("reset_before_answer", "ok")
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "fine"
    assert faulty.attempts == 2


async def test_503_twice_then_200(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan((503, {}), (503, {}), "ok")
    clock = FakeClock(auto=True)
    client = await start_proxy(config(upstream_url(upstream)), clock=clock)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert faulty.attempts == 3
    assert len(clock.slept) == 2 and all(0 <= s <= 0.05 for s in clock.slept)
    assert await metric(client, "model_proxy_upstream_retries_total") == 2


async def test_streamed_request_is_retried_before_its_first_byte(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan((502, {}), "ok")
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 200
    assert sse_events(await resp.read())[-1] == "[DONE]"
    assert faulty.attempts == 2


async def test_last_error_answer_is_relayed_faithfully(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan((503, {"X-Why": "maintenance"}))
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503
    assert resp.headers["X-Why"] == "maintenance"
    assert (await resp.json())["error"]["message"] == "upstream 503"
    assert faulty.attempts == 3


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422, 500])
async def test_other_statuses_are_never_retried(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty, status: int
) -> None:
    faulty.with_plan((status, {}), "ok")
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == (502 if status == 401 else status)  # 401: upstream_auth_failed
    assert faulty.attempts == 1


async def test_429_retry_after_is_honoured(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan((429, {"Retry-After": "1"}), "ok")
    clock = FakeClock(auto=True)
    client = await start_proxy(config(upstream_url(upstream)), clock=clock)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert faulty.attempts == 2
    assert clock.slept == [1.0]  # waited what the upstream asked, not the 10 ms backoff


async def test_429_retry_after_beyond_cap_is_relayed_at_once(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan((429, {"Retry-After": "120"}), "ok")
    clock = FakeClock(auto=True)
    client = await start_proxy(
        config(upstream_url(upstream), retries={**FAST_RETRIES, "retry_after_cap": 5}),
        clock=clock,
    )
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "120"
    assert faulty.attempts == 1
    assert clock.slept == []


async def test_retries_stop_at_the_total_budget(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan((503, {"Retry-After": "0.4"}))
    clock = FakeClock(auto=True)
    client = await start_proxy(
        config(upstream_url(upstream), retries={**FAST_RETRIES, "attempts": 20, "total": 1.0}),
        clock=clock,
    )
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503
    assert clock.slept == [0.4, 0.4]
    assert faulty.attempts == 3  # 0 s, 0.4 s, 0.8 s; a wait past 1 s is not started


async def test_no_first_byte_is_504_after_each_attempt_times_out(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("no_first_byte")
    client = await start_proxy(config(
        upstream_url(upstream), timeouts={"first_byte": 0.3},
        retries={**FAST_RETRIES, "attempts": 2},
    ))
    clock = Clock()
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert faulty.attempts == 2
    assert clock.elapsed >= 0.6


async def test_total_timeout_bounds_all_attempts(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("no_first_byte")
    client = await start_proxy(config(
        upstream_url(upstream), timeouts={"first_byte": 0.4, "total": 0.6},
        retries={**FAST_RETRIES, "attempts": 10},
    ))
    clock = Clock()
    resp = await client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 504
    assert faulty.attempts == 2  # 0.4 s each: a third would end past the total of 0.6 s
    assert clock.elapsed >= 0.4


# --- upstream faults after the answer began -------------------------------------------------


async def test_reset_mid_body_is_502_and_not_retried(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("reset_mid_body", "ok")
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    # The upstream may have done the work: a buffered answer that broke is not sent again.
    assert resp.status == 502
    assert "broke off" in (await resp.json())["error"]["message"]
    assert faulty.attempts == 1


async def test_stream_failing_after_first_chunk_is_not_retried(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("fail_after_first_chunk", "ok")
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 200
    events = sse_events(await resp.read())
    assert events[0]["choices"][0]["delta"]["content"] == "first"
    assert events[-1]["error"]["type"] == "upstream_error"
    assert len(events) == 2
    assert faulty.attempts == 1
    assert await metric(client, "model_proxy_upstream_retries_total") == 0


async def test_stall_mid_stream_ends_with_idle_timeout_event(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("stall_mid_stream")
    client = await start_proxy(config(upstream_url(upstream), timeouts={"idle": 0.3}))
    clock = Clock()
    resp = await client.post("/v1/chat/completions", json=STREAM)
    events = sse_events(await resp.read())
    assert resp.status == 200
    assert events[0]["choices"][0]["delta"]["content"] == "a"
    assert "error" in events[-1], (events, clock.elapsed)
    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert "sent nothing for 0.3 s" in events[-1]["error"]["message"]
    assert clock.elapsed >= 0.3
    assert faulty.attempts == 1


async def test_malformed_sse_and_json_are_relayed_as_sent(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    # The custom adapter passes bytes through without parsing them: the client gets exactly
    # what the upstream said, once, and judges it itself.
    faulty.with_plan("malformed")
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 200
    assert await resp.read() == (b"data: {not json at all\n\nevent without data\n\n"
                                 b"data: [DONE]\n\n")
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    assert await resp.read() == b'{"choices": [ {"mess'
    assert faulty.attempts == 2


async def test_missing_terminating_chunk(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("no_terminator")
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=STREAM)
    events = sse_events(await resp.read())
    assert events[0]["choices"][0]["delta"]["content"] == "a"
    assert events[-1]["error"]["type"] == "upstream_error"
    assert "incomplete" in events[-1]["error"]["message"]
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    assert "incomplete" in (await resp.json())["error"]["message"]
    assert faulty.attempts == 2


# --- backpressure ---------------------------------------------------------------------------


async def test_backpressure_admits_concurrency_plus_queue(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("slow")
    faulty.delay = 0.4
    client = await start_proxy(config(
        upstream_url(upstream), limits={"max_concurrency": 2, "max_queue": 2, "queue_timeout": 5},
    ))

    async def one() -> tuple[int, str | None, Any]:
        resp = await client.post("/v1/chat/completions", json=CHAT)
        return resp.status, resp.headers.get("Retry-After"), await resp.json()

    clock = Clock()
    results = await asyncio.gather(*(one() for _ in range(10)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 4 + [429] * 6
    for status, retry_after, body in results:
        if status == 200:
            assert body["choices"][0]["message"]["content"] == "fine"
        else:
            assert retry_after == "1"
            assert body["error"]["code"] == "overloaded"
    assert faulty.attempts == 4
    assert clock.elapsed >= 0.8  # two rounds of 0.4 s: the queued two ran after the first
    assert await metric(client, "model_proxy_in_flight_requests") == 0
    assert await metric(client, "model_proxy_queued_requests") == 0


async def test_queue_timeout_is_429(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("slow")
    faulty.delay = 0.3
    clock = FakeClock()
    client = await start_proxy(config(
        upstream_url(upstream),
        limits={"max_concurrency": 1, "max_queue": 5, "queue_timeout": 0.2},
    ), clock=clock)
    first = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: faulty.attempts == 1, "the first request reached the upstream")
    second = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: clock.sleeping == 1, "the second request queued")
    clock.advance(0.19)
    await asyncio.sleep(0)
    assert not second.done()
    clock.advance(0.01)
    resp = await second
    assert resp.status == 429
    assert "waited 0.2 s" in (await resp.json())["error"]["message"]
    assert (await first).status == 200
    assert faulty.attempts == 1


async def test_client_disconnect_frees_the_slot_at_once(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("ok")
    faulty.events, faulty.event_delay = 100, 0.1
    client = await start_proxy(
        config(upstream_url(upstream), limits={"max_concurrency": 1, "max_queue": 0}),
        server_kwargs={"handler_cancellation": True},
    )
    resp = await client.post("/v1/chat/completions", json=STREAM)
    assert (await resp.content.readline()).startswith(b"data: ")
    assert await metric(client, "model_proxy_in_flight_requests") == 1
    busy = await client.post("/v1/chat/completions", json=CHAT)
    assert busy.status == 429
    resp.close()  # the client goes away mid-stream
    for _ in range(50):
        if await metric(client, "model_proxy_in_flight_requests") == 0:
            break
        await asyncio.sleep(0.02)
    assert await metric(client, "model_proxy_in_flight_requests") == 0
    faulty.event_delay = 0
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200


async def test_body_over_the_limit_is_413_before_it_is_read(start_proxy: StartProxy) -> None:
    client = await start_proxy({"backend_provider": "mock", "limits": {"max_body_bytes": 1024}})
    assert client.server.port is not None
    # Announce 10 MB but send 20 bytes: the answer must come without the proxy waiting for
    # the rest, so it cannot have read the body whole.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
                 b'{"model": "m", "mes')
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=2)
    assert status_line.startswith(b"HTTP/1.1 413")
    writer.close()
    # Chunked, no length: refused as soon as the running total passes the limit.
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        writer.write(b"200\r\n" + b" " * 0x200 + b"\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=2)
    assert status_line.startswith(b"HTTP/1.1 413")
    writer.close()


# --- circuit breaker ------------------------------------------------------------------------


async def test_circuit_opens_fails_fast_half_opens_and_closes(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan((503, {}))
    clock = FakeClock()
    client = await start_proxy(config(
        upstream_url(upstream), retries={"attempts": 1},
        circuit={"failures": 2, "cooldown": 0.5},
    ), clock=clock)
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 503
    assert faulty.attempts == 2
    assert await metric(client, "model_proxy_circuit_state") == 2

    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "circuit_open"
    assert resp.headers["Retry-After"] == "1"
    assert faulty.attempts == 2  # failed fast, the upstream saw nothing
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "circuit open" in (await ready.json())["reason"]

    clock.advance(0.49)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert (await resp.json())["error"]["code"] == "circuit_open"  # not yet
    clock.advance(0.01)
    faulty.with_plan("slow")
    faulty.delay = 0.3
    # Half-open: one probe goes through, the request beside it still fails fast.
    probing = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: faulty.attempts == 1, "the probe reached the upstream")
    beside = await client.post("/v1/chat/completions", json=CHAT)
    probe = await probing
    assert probe.status == 200
    assert beside.status == 503
    assert faulty.attempts == 1
    assert await metric(client, "model_proxy_circuit_state") == 0
    assert (await client.get("/readyz")).status == 200
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200


async def test_failed_probe_reopens_the_circuit(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan((502, {}))
    clock = FakeClock(auto=True)
    client = await start_proxy(config(
        upstream_url(upstream), retries={"attempts": 5, "backoff_initial": 0.01},
        circuit={"failures": 2, "cooldown": 0.3},
    ), clock=clock)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 502
    assert faulty.attempts == 2  # the circuit opened after the second: no third attempt
    clock.advance(0.3)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 502
    assert faulty.attempts == 3  # the probe, alone: one failure re-opens
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert (await resp.json())["error"]["code"] == "circuit_open"


# --- graceful shutdown ----------------------------------------------------------------------


async def test_shutdown_drains_then_ends_streams_with_an_error_event(
    upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("ok")
    faulty.events, faulty.event_delay = 3, 0.1
    app = create_app(build_config(config(upstream_url(upstream),
                                         server={"shutdown_grace": 0.6})))
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        short = await client.post("/v1/chat/completions", json=STREAM)
        faulty.events = 1000
        long = await client.post("/v1/chat/completions", json=STREAM)
        assert (await long.content.readline()).startswith(b"data: ")
        clock = Clock()
        closing = asyncio.ensure_future(client.server.close())
        short_events = sse_events(await short.read())
        long_events = sse_events(await long.read())
        await closing
    finally:
        await client.close()
    assert short_events[-1] == "[DONE]"  # finished within the grace, intact
    assert long_events[-1]["error"]["code"] == "shutting_down"
    assert all("choices" in e for e in long_events[:-1])
    assert clock.elapsed >= 0.6


async def test_reset_mid_body_of_the_upstream_is_seen_as_an_error_event(
    start_proxy: StartProxy, upstream: TestServer, faulty: Faulty
) -> None:
    faulty.with_plan("reset_mid_body")
    client = await start_proxy(config(upstream_url(upstream)))
    resp = await client.post("/v1/chat/completions", json=STREAM)
    events = sse_events(await resp.read())
    assert events[0]["choices"][0]["delta"]["content"] == "a"
    assert "broke off" in events[-1]["error"]["message"]
    assert faulty.attempts == 1
