"""Log lines: text or JSON (``logging.format``), the request id on each, and JSON access lines
that carry what is known about a request without its secrets or text."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import LoggingSection
from proxy.server.logs import uses_json
from tests.conftest import free_port, upstream_url, wait_healthy
from tests.fakes.faulty_upstream import Faulty

API_KEY = "inbound-key-never-logged-31"
PROMPT = "the prompt text is private 8d1f"
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": PROMPT}]}


async def serve_and_collect(tmp_path: Path, config: str,
                            requests: list[dict[str, Any]]) -> tuple[list[str], list[Any]]:
    """Run ``serve`` with ``config``, send ``requests`` (``session.request`` arguments), stop
    it; its stderr lines and the answers (status, headers, body)."""
    path = tmp_path / "model_backend.yaml"
    path.write_text(config)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(path), "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    answers = []
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as session:
            for args in requests:
                async with session.request(url=url + args.pop("path"), **args) as resp:
                    answers.append((resp.status, resp.headers, await resp.read()))
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    lines = (await proc.stderr.read()).decode().splitlines()
    # the start-up probes (wait_healthy) come first; the requests' lines follow
    first = next((i for i, line in enumerate(lines)
                  if "/healthz" not in line and "access" in line), len(lines))
    return [line for i, line in enumerate(lines) if i >= first or "/healthz" not in line], answers


def chat(**extra: Any) -> dict[str, Any]:
    return {"method": "POST", "path": "/v1/chat/completions", "json": CHAT,
            "headers": {"Authorization": f"Bearer {API_KEY}"}, **extra}


async def test_json_lines_carry_each_requests_facts_and_no_secrets(tmp_path: Path) -> None:
    config = ("backend_provider: mock\nmodel: {name: mock-model}\n"
              f"auth: {{api_keys: [{API_KEY}]}}\nlogging: {{format: json}}\n")
    lines, answers = await serve_and_collect(tmp_path, config, [
        chat(),
        {**chat(), "json": {**CHAT, "stream": True}},
        {"method": "POST", "path": "/v1/chat/completions", "json": CHAT,
         "headers": {"X-Request-ID": "refused-1"}},
        {"method": "GET", "path": "/healthz"},
    ])
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [e for e in entries if e["logger"] == "model_proxy.access"]
    assert [e["status"] for e in access] == [200, 200, 401, 200]
    for entry, (_, headers, _) in zip(access, answers, strict=True):
        assert entry["request_id"] == headers["X-Request-ID"]
    plain, stream, refused, probe = access
    for entry in (plain, stream):
        assert entry["method"] == "POST" and entry["path"] == "/v1/chat/completions"
        assert entry["model"] == "mock-model" and entry["upstream"] == "mock"
        assert entry["attempts"] == 1
        assert entry["tokens_in"] > 0 and entry["tokens_out"] > 0
        assert 0 <= entry["ttfb_ms"] and entry["duration_ms"] >= 0
        assert "request_body" not in entry and "response_body" not in entry
    assert refused["request_id"] == "refused-1" and "model" not in refused
    assert probe["path"] == "/healthz"
    text = "\n".join(lines)
    assert API_KEY not in text and PROMPT not in text


async def test_bodies_are_logged_only_when_asked(tmp_path: Path) -> None:
    config = ("backend_provider: mock\nmodel: {name: mock-model}\n"
              "logging: {format: json, include_bodies: true}\n")
    lines, answers = await serve_and_collect(tmp_path, config, [
        chat(), {**chat(), "json": {**CHAT, "stream": True}}])
    access = [e for e in map(json.loads, lines) if e["logger"] == "model_proxy.access"]
    for entry, (_, _, body) in zip(access, answers, strict=True):
        assert PROMPT in entry["request_body"]
        assert entry["response_body"] == body.decode()


async def test_warnings_about_a_request_carry_its_id(tmp_path: Path, aiohttp_server: Any) -> None:
    upstream = await aiohttp_server(Faulty(["fail_after_first_chunk"]).app())
    config = f"backend_provider: custom\nurl: {upstream_url(upstream)}\nlogging: {{format: json}}\n"
    lines, _ = await serve_and_collect(tmp_path, config, [
        {"method": "POST", "path": "/v1/chat/completions", "headers": {"X-Request-ID": "w-9"},
         "json": {**CHAT, "stream": True}}])
    warnings = [e for e in map(json.loads, lines) if e["level"] == "warning"]
    assert warnings and all(e["request_id"] == "w-9" for e in warnings), warnings
    # the upstream's failure (with its address) and the stream's early end
    assert any("ended early" in w["msg"] for w in warnings), warnings


async def test_text_lines_end_with_the_request_id(tmp_path: Path, aiohttp_server: Any) -> None:
    upstream = await aiohttp_server(Faulty(["fail_after_first_chunk"]).app())
    config = f"backend_provider: custom\nurl: {upstream_url(upstream)}\nlogging: {{format: text}}\n"
    lines, answers = await serve_and_collect(tmp_path, config, [
        {"method": "POST", "path": "/v1/chat/completions", "headers": {"X-Request-ID": "t-3"},
         "json": {**CHAT, "stream": True}},
        {"method": "GET", "path": "/healthz"}])
    assert not any(line.startswith("{") for line in lines)
    ended = [line for line in lines if "ended early" in line]
    assert ended and ended[0].endswith(" request_id=t-3")
    access = [line for line in lines if "model_proxy.access:" in line]
    assert " model_proxy.access: POST /v1/chat/completions 200 " in access[0]
    assert access[0].endswith("ms request_id=t-3")
    assert access[1].endswith(" request_id=" + answers[1][1]["X-Request-ID"])


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("format", "stream", "json_lines"), [
    ("auto", Terminal(), False), ("auto", io.StringIO(), True),
    ("text", io.StringIO(), False), ("json", Terminal(), True),
])
def test_auto_is_text_on_a_terminal_and_json_elsewhere(
    format: str, stream: io.StringIO, json_lines: bool
) -> None:
    assert uses_json(LoggingSection(format=format), stream) is json_lines  # type: ignore[arg-type]


async def test_access_lines_are_json_whatever_the_request_spells() -> None:
    """The access line is written from a template, not by a JSON encoder: ids, paths and
    model names with quotes, backslashes, control characters, non-ASCII letters and a path's
    undecodable bytes (a lone surrogate) still make one valid JSON line each, saying what
    was sent."""
    from proxy.adapters.base import Job, Usage
    from proxy.server.logs import AccessLines
    from proxy.upstream.exchange import Exchange

    out = io.StringIO()
    lines = AccessLines(LoggingSection(access_log=True, format="json"), out)
    odd = ['plain-1', 'q"uote', "back\\slash", "tab\there", "ünï-código", "bad\udcff"]
    for i, text in enumerate(odd):
        exchange = Exchange(text)
        exchange.job = Job(endpoint="chat", method="POST", path="/v1/chat/completions",
                           body=b"{}", model=text, upstream_model=text, headers={},
                           request_id=text)
        exchange.provider, exchange.attempts = "custom", 1
        exchange.upstream_seconds = 0.0034
        exchange.usage = Usage(prompt_tokens=7, completion_tokens=None) if i % 2 else None
        lines.add_job("POST", "/v1/" + text, 200, 0.0125, text, exchange)
        lines.add("GET", "/" + text, 404, 0.0004, text)
    lines.flush()
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(entries) == 2 * len(odd)
    for i, text in enumerate(odd):
        shown = text.encode("utf-8", "backslashreplace").decode()
        job, plain = entries[2 * i], entries[2 * i + 1]
        assert job["request_id"] == job["model"] == job["upstream_model"] == shown
        assert job["path"] == "/v1/" + shown and plain["path"] == "/" + shown
        assert (job["status"], job["duration_ms"], job["upstream_ms"], job["ttfb_ms"]) == (
            200, 12, 3, 12)
        assert (job["tokens_in"], job["tokens_out"]) == ((7, None) if i % 2 else (None, None))
        assert (plain["status"], plain["duration_ms"], plain["request_id"]) == (404, 0, shown)
        assert job["logger"] == plain["logger"] == "model_proxy.access"
