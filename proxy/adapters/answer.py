"""What the proxy's upstream client (:mod:`proxy.adapters.lean`) hands its callers: one
:class:`Answer` per request, read as it arrives, and the errors it raises."""

from __future__ import annotations

import asyncio
import collections
import os
import socket
from collections.abc import AsyncIterator
from typing import Literal, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

Stage = Literal["send", "body"]


class LeanError(ConnectionError):
    """The upstream connection failed; ``stage`` says whether any of the answer had arrived."""

    def __init__(self, message: str, stage: Stage) -> None:
        super().__init__(message)
        self.stage = stage


class ConnectError(LeanError):
    """No connection could be made; ``reason`` says why, in the system's words (no address)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot connect: {reason}", "send")
        self.reason = reason

    @classmethod
    def of(cls, exc: OSError) -> ConnectError:
        if isinstance(exc, socket.gaierror):  # a failed lookup: its errno is the resolver's
            return cls(exc.strerror or "the host name could not be resolved")
        return cls(os.strerror(exc.errno) if exc.errno else (exc.strerror or "no connection"))


class StaleConnection(LeanError):
    """A reused keep-alive connection closed before any byte of its answer: the upstream had
    closed it meanwhile (as servers do to idle connections), so the request never reached it
    and may be sent again, on a fresh connection."""

    def __init__(self) -> None:
        super().__init__("the kept-alive connection was closed by the upstream", "send")


class ConnectTimeout(TimeoutError):
    """The upstream did not accept a connection within ``connect_timeout``."""


class IdleTimeout(TimeoutError):
    """Nothing of the body arrived within ``idle`` seconds of the last bytes."""


class Carrier(Protocol):
    """What an answer needs of the connection that carries it."""

    loop: asyncio.AbstractEventLoop
    paused: bool

    def watch(self, until: float, timeout: type[TimeoutError]) -> None: ...

    def resume(self) -> None: ...

    def abort(self) -> None: ...


class Answer:
    """One upstream answer: ``status`` and ``headers`` once :meth:`LeanPool.request` returns,
    then the body, read with :meth:`readany` until it returns ``b""``.

    ``headers`` is the list of ``(name, value)`` byte pairs as sent; :meth:`header` looks one
    up, :attr:`fields` gives them as a case-insensitive mapping of strings. :meth:`release`
    gives the connection back once the body has been read whole, else closes it (the upstream
    sees the client go); :meth:`close` always closes it unless the answer is complete.
    """

    __slots__ = ("_chunks", "_conn", "_done", "_error", "_fields", "_idle", "_loop", "_size",
                 "_started", "_waiter", "deadline", "framed", "head", "headers", "keep_alive",
                 "length", "media", "status")

    def __init__(self, conn: Carrier, idle: float | None, deadline: float | None = None,
                 head: bool = False) -> None:
        self._conn: Carrier | None = conn
        self._idle = idle
        # the connection's loop, kept (``_conn`` goes at the answer's end):
        # asyncio.get_running_loop() costs a getpid() system call on Python 3.11, and a stream
        # waits once per chunk
        self._loop = conn.loop
        #: The answer to a HEAD request: it has no body, whatever its headers say.
        self.head = head
        #: ``loop.time()`` by which the whole answer must have arrived (``None``: no bound).
        self.deadline = deadline
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        #: The first Content-Type and Content-Length values, as the connection read them (so
        #: that the two looked up on every answer are not sought in ``headers``).
        self.media: bytes | None = None
        self.length: bytes | None = None
        self._fields: CIMultiDictProxy[str] | None = None
        self.framed = False  # Content-Length or chunked; otherwise the body ends at close
        self.keep_alive = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._started = False  # a byte of the answer arrived
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first header called ``name`` (any case)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def fields(self) -> CIMultiDictProxy[str]:
        """The headers as a case-insensitive mapping of strings (made on first use)."""
        if self._fields is None:
            made: CIMultiDict[str] = CIMultiDict()
            for name, value in self.headers:
                made.add(name.decode("latin-1"), value.decode("latin-1"))
            self._fields = CIMultiDictProxy(made)
        return self._fields

    @property
    def content_type(self) -> str:
        """The media type, lower-cased, without parameters."""
        value = self.media
        if value is None:
            return "application/octet-stream"
        return value.partition(b";")[0].strip().lower().decode("latin-1")

    @property
    def content_length(self) -> int | None:
        value = self.length
        return int(value) if value is not None and value.isdigit() else None

    @property
    def reading_paused(self) -> bool:
        """Whether the connection stopped reading because this body is unread."""
        return self._conn is not None and self._conn.paused

    # -- the connection's side
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self._done:
            self._error = exc
        self._wake()

    # -- the reader's side
    async def _wait(self, seconds: float | None) -> None:
        """Wait for the connection's next event; at most ``seconds`` (and never past
        :attr:`deadline`), else a timeout and the connection is dropped."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        conn = self._conn
        if conn is not None:
            until, timeout = self.deadline, TimeoutError
            if seconds is not None:
                bound = loop.time() + seconds
                if until is None or bound < until:
                    until, timeout = bound, IdleTimeout if self.status else TimeoutError
            if until is not None:
                conn.watch(until, timeout)
        await waiter

    async def readany(self) -> bytes:
        """The bytes buffered now, or the next to arrive; ``b""`` at the body's end.

        Past :attr:`deadline` it raises ``TimeoutError`` even while bytes keep arriving.
        """
        while True:
            chunks = self._chunks
            if chunks:
                deadline = self.deadline
                if deadline is not None and self._loop.time() >= deadline and not self._done:
                    self.close()
                    raise TimeoutError()
                data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
                chunks.clear()
                self._size = 0
                if self._conn is not None:
                    self._conn.resume()
                return data
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            await self._wait(self._idle)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever is buffered at each step, joined."""
        while chunk := await self.readany():
            yield chunk

    async def read(self) -> bytes:
        """The whole body."""
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    def at_eof(self) -> bool:
        """Whether the whole body has arrived and been read."""
        return self._done and not self._chunks

    def release(self) -> None:
        """Done with the answer: its connection was pooled when the body arrived whole;
        one still carrying unread body is closed."""
        self.close()

    def close(self) -> None:
        """Give up on the rest of the body; the connection is closed unless it had all of it."""
        if not self._done and self._conn is not None:
            self._conn.abort()
        self._chunks.clear()
