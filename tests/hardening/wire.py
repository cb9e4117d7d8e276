"""Raw-socket helpers for the hardening tests: requests exactly as written, answers as read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psutil

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def exchange(url: str, raw: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a new connection; the status, headers (lower-cased) and body read back."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()
        return int(lines[0].split(" ")[1]), headers, body
    finally:
        writer.close()


def request(
    method: str, target: str, body: Any = None, headers: dict[str, str] | None = None
) -> bytes:
    """One request with ``Connection: close``; a ``body`` that is not bytes is sent as JSON."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    data = data or b""
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            f"Content-Length: {len(data)}"]
    if body is not None:
        head.append("Content-Type: application/json")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)
