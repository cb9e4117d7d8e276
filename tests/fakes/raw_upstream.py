"""An HTTP/1.1 upstream written on raw sockets, for answers no well-behaved server would send.

``RawUpstream.answer`` is an async function ``(request, writer) -> bool`` that writes whatever
bytes it likes for one parsed request and returns whether to keep the connection open for the
next one. Every request head is recorded (``seen``), exactly as it arrived on the wire, and
``connections`` counts the TCP connections accepted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class RawRequest:
    line: str  # "POST /v1/chat/completions HTTP/1.1"
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def target(self) -> str:
        return self.line.split(" ")[1]


Answer = Callable[[RawRequest, asyncio.StreamWriter], Awaitable[bool]]

COMPLETION = json.dumps(
    {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                  "finish_reason": "stop"}]}
).encode()


def response(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def ok(request: RawRequest, writer: asyncio.StreamWriter) -> bool:
    writer.write(response(200, COMPLETION))
    return True


@dataclass
class RawUpstream:
    answer: Answer = ok
    seen: list[RawRequest] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = RawRequest(lines[0], headers, body)
                self.seen.append(request)
                keep = await self.answer(request, writer)
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
