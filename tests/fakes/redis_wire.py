"""A hostile Redis on a raw socket: it reads RESP commands and answers each with the same bytes.

``reply`` is written once per command read (nil, ``:1``, an endless array header, ...);
``flood`` is written after the first reply, again and again while the client reads it (the
elements of an array that never ends); ``reply=None`` answers nothing. Everything sent is
counted in ``written``, every command read is kept in ``commands``.
"""

from __future__ import annotations

import asyncio
import contextlib


class FakeRedis:
    def __init__(self, reply: bytes | None, *, flood: bytes = b"", flood_limit: int = 64 << 20):
        self.reply, self.flood, self.flood_limit = reply, flood, flood_limit
        self.commands: list[list[bytes]] = []
        self.written = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        """Stop listening and end every connection (a client waiting on one sees EOF)."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                buffer += data
                for command in _commands(buffer):
                    self.commands.append(command)
                    if self.reply is not None:
                        await self._write(writer, self.reply)
                    while self.flood and self.written < self.flood_limit:
                        await self._write(writer, self.flood)
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        self.written += len(data)
        await writer.drain()


def _commands(buffer: bytearray) -> list[list[bytes]]:
    """The complete RESP commands (arrays of bulk strings) at the start of ``buffer``, taken
    out of it."""
    found: list[list[bytes]] = []
    while buffer.startswith(b"*"):
        end = buffer.find(b"\r\n")
        if end < 0:
            break
        at, args = end + 2, []
        for _ in range(int(buffer[1:end])):
            line = buffer.find(b"\r\n", at)
            if line < 0:
                return found
            size = int(buffer[at + 1:line])
            if len(buffer) < line + 2 + size + 2:
                return found
            args.append(bytes(buffer[line + 2:line + 2 + size]))
            at = line + 2 + size + 2
        del buffer[:at]
        found.append(args)
    return found
