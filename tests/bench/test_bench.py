"""The benchmark's own parts: the fast upstream speaks HTTP/1.1 and shapes streams as asked,
and the table's cells and ratios are what they say. (`python -m bench --smoke` runs the whole
benchmark; it needs wrk.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.run import Results, body, table
from bench.servers import ANSWER, EVENTS, FastUpstream


async def test_fast_upstream_answers_and_streams() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FastUpstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    opened: list[object] = []
    trace = aiohttp.TraceConfig()

    async def on_connect(*args: object) -> None:
        opened.append(args)

    trace.on_connection_create_end.append(on_connect)
    try:
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            async with session.post(url, data=body(None)) as plain:
                assert plain.status == 200
                assert await plain.read() == ANSWER
            async with session.post(url, data=b'{"stream":true}') as default:
                assert await default.read() == b"".join(EVENTS)
            start = time.monotonic()
            async with session.post(url, data=body("bench:chunks=3:delay=50")) as slow:
                events = [e for e in (await slow.read()).split(b"\n\n") if e]
            assert time.monotonic() - start >= 0.1  # two gaps of 50 ms
            assert events[-1] == b"data: [DONE]"
            final = orjson.loads(events[-2].removeprefix(b"data: "))
            assert final["usage"]["completion_tokens"] == 3
            assert len(events) == 5
            assert slow.headers["Transfer-Encoding"] == "chunked"
            async with session.get(f"http://127.0.0.1:{port}/") as missing:
                assert missing.status == 404
        assert len(opened) == 1  # one kept-alive connection for all five
    finally:
        server.close()
        await server.wait_closed()


def test_table_cells_are_medians_with_spread_and_ratios_of_medians() -> None:
    results = Results()
    for target, values in {"direct": [10.0, 30.0, 20.0], "bare": [4.0, 5.0, 6.0],
                           "ours": [5.0, 6.0, 7.0]}.items():
        for value in values:
            results.add("non-streamed", "req/s", target, value)
    head, row = table(results, ["direct", "bare", "ours"])
    assert head[:5] == ["test", "metric", "direct", "bare", "ours"]
    assert row[2:5] == ["20.0 (10.0-30.0)", "5.00 (4.00-6.00)", "6.00 (5.00-7.00)"]
    assert row[5:8] == ["1.20x", "0.30x", "0.25x"]


def test_core_target_is_the_same_proxy_with_its_optional_features_off(tmp_path: Path) -> None:
    """``bench.instructions``' ``ours-core`` (``--core``): what every request pays for, measured
    beside ``ours``; its config must load and differ from ``ours`` only where it says."""
    from bench.instructions import CORE
    from bench.overhead import config_text
    from proxy.config import load_config

    def loaded(extra: list[str]) -> Any:
        path = tmp_path / "model_backend.yaml"
        path.write_text(config_text("http://127.0.0.1:9", 8080, True, extra))
        return load_config(path)

    ours, core = loaded([]), loaded(CORE)
    assert ours.auth.api_keys and not core.auth.api_keys
    assert ours.logging.access_log and not core.logging.access_log
    assert (ours.upstream_name, ours.public_name) == ("bench-upstream", "bench")
    assert (core.upstream_name, core.public_name) == (None, None)
    assert (ours.retries.attempts, core.retries.attempts) == (3, 1)
    same = ("url", "api_key", "limits", "metrics", "timeouts", "circuit", "determinism")
    assert all(getattr(ours, key) == getattr(core, key) for key in same)
