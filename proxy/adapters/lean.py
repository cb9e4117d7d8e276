"""The proxy's HTTP/1.1 client for one upstream origin: keep-alive connections on asyncio
protocols, answers parsed by llhttp (``httptools``, the parser uvicorn uses server-side).

It is the only client on the request path (``HTTPUpstream`` sends through it); measured by
``python -m bench.lean``. It does what the proxy needs of an upstream client and no more: one
origin, bodies as bytes, no redirects, cookies or compression; answers framed by
``Content-Length``, chunked encoding, or the connection's close. A request goes out in one
write; the answer's body is buffered per answer (reading pauses above :data:`HIGH_WATER`
bytes unread), so a connection goes back to the pool as soon as its answer has arrived whole.

What it refuses (as ``LeanError``, never a traceback): what llhttp refuses in strict mode
(duplicate or invalid ``Content-Length``, ``Content-Length`` beside ``Transfer-Encoding``, bad
chunk sizes, bare LF, obs-fold: RFC 9112 lets a recipient reject each, and a proxy that cannot
be sure how the next hop frames a message must), transfer codings other than chunked (the
body could only be relayed still encoded), status codes outside 100-599, heads over
:data:`MAX_HEAD_BYTES` or :data:`MAX_FIELDS` (interim answers and trailers counted with them),
more than :data:`MAX_INTERIM` interim answers, and a protocol switch (101: the connection is
closed, the status returned for the caller to refuse). Bytes after a complete answer close the
connection: they are never read as the next request's answer.

Failures are ``TimeoutError`` (:class:`ConnectTimeout`, first byte, :class:`IdleTimeout`
between body reads, the ``total`` deadline, enforced also while data keeps arriving) or
:class:`LeanError` with the stage it happened in (``send``: nothing of an answer arrived;
``body``: the answer broke off). A reused connection that closes before any byte of its answer
raises :class:`StaleConnection`: the caller sends the request again with ``fresh=True`` (on a
connection opened for it, never another pooled one), rebuilding what must change per send.
Pooled connections unused for ``keep_idle`` seconds are closed by a sweep (one timer per pool).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl as ssl_module
import time
from collections.abc import Callable, Iterable
from typing import cast

import httptools

from proxy.adapters.answer import (
    Answer,
    ConnectError,
    ConnectTimeout,
    IdleTimeout,
    LeanError,
    Stage,
    StaleConnection,
)

__all__ = ["Answer", "ConnectError", "ConnectTimeout", "IdleTimeout", "LeanError", "LeanPool",
           "StaleConnection"]

#: Unread body bytes of one answer above which its connection stops reading.
HIGH_WATER = 256 * 1024
#: Bytes of header fields (names, values, 4 per line) one answer may send, interim answers and
#: trailers included; and how many fields. aiohttp's client allows 8 KiB per line and 32,768
#: fields; an upstream has no reason to send more than a few dozen.
MAX_HEAD_BYTES = 64 * 1024
MAX_FIELDS = 256
#: Interim answers (100 Continue, 103 Early Hints) skipped before the real one.
MAX_INTERIM = 8


class _Refused(Exception):
    """Raised in a parser callback to stop parsing an answer the client refuses."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time.

    Its answer's waits are bounded by one timer per connection, armed lazily: a wait only
    notes until when it may last (:meth:`watch`), and the timer, when it fires, ends a wait
    that is still pending past that time or re-arms for the one pending now. A stream of
    many chunks thus costs no timer per chunk (creating and cancelling one costs more than
    the rest of a chunk's reading).
    """

    def __init__(self, pool: LeanPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        #: Until when the pending wait may last, and what it raises then.
        self.until = 0.0
        self.timeout: type[TimeoutError] = TimeoutError
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Answer | None = None
        self.closed = False
        self.paused = False
        #: The message being parsed is an interim answer (100 Continue, 103 Early Hints).
        self.interim = False
        self.interims = 0
        #: Header bytes and fields of the answer being parsed (interim and trailers included).
        self.head_bytes = 0
        self.fields = 0
        #: An answer completed in the read being parsed: pooled once the read is done.
        self.completed = False
        self.used = 0
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def send(self, response: Answer, data: bytes) -> None:
        assert self.transport is not None
        self.response = response
        self.used += 1
        self.interims = self.head_bytes = self.fields = 0
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked (late bytes of an earlier answer)
            self.abort()
            return
        response._started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols: the status is in; the connection is no longer HTTP
            self.abort()
            if not response.status:
                response._fail(LeanError("malformed answer: a protocol switch", "send"))
            response._wake()
            return
        except httptools.HttpParserError as exc:
            refused = exc.__context__
            message = str(refused) if isinstance(refused, _Refused) else str(exc)
            self.abort()
            stage: Stage = "body" if response.status else "send"
            response._fail(LeanError(f"malformed answer: {message}", stage))
            return
        if self.completed:
            self.completed = False
            self.response = None
            if response.keep_alive and not self.closed:
                self.resume()
                self.pool._release(self)
            else:
                self.closed = True
                if self.transport is not None:
                    self.transport.close()
        # once per read, not per callback: a read of a chunked stream holds many pieces
        response._wake()

    def watch(self, until: float, timeout: type[TimeoutError]) -> None:
        """Bound the wait that begins now to ``until`` (loop time), then ``timeout``."""
        self.until, self.timeout = until, timeout
        timer = self.timer
        if timer is None or self.timer_at > until:
            if timer is not None:
                timer.cancel()
            self.timer_at = until
            self.timer = self.loop.call_at(until, self._check)

    def _check(self) -> None:
        self.timer = None
        response = self.response
        waiter = response._waiter if response is not None else None
        if waiter is None or waiter.done():
            return  # nothing waits: the next wait arms the timer again
        if self.loop.time() + 0.001 < self.until:  # a later wait than the one armed for
            self.timer_at = self.until
            self.timer = self.loop.call_at(self.until, self._check)
            return
        waiter.set_exception(self.timeout())
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool._forget(self)
        response, self.response = self.response, None
        if response is None or response._done:
            return
        if response.status and not response.framed and exc is None and not response._error:
            response._done = True  # close-delimited body: the close is its end
            response._wake()
        elif not response._started:
            response._fail(StaleConnection() if self.used > 1 else
                           LeanError("the upstream closed the connection before answering",
                                     "send"))
        elif response.status:
            message = "the response body was incomplete (the connection closed)"
            response._fail(LeanError(message, "body"))
        else:
            response._fail(LeanError("the upstream closed the connection before answering",
                                     "send"))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def resume(self) -> None:
        if self.paused and not self.closed and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # -- llhttp callbacks (a callback that raises stops the parser: data_received handles it)
    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response._done:
            raise _Refused("bytes after the end of the answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        self.fields += 1
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES or self.fields > MAX_FIELDS:
            raise _Refused(f"more than {MAX_FIELDS} header fields or {MAX_HEAD_BYTES} bytes "
                           "of them")
        if response.status:
            return  # a trailer: counted, not kept
        lowered = name.lower()
        if lowered == b"content-type":
            if response.media is None:  # the first one, as ``Answer.header`` finds
                response.media = value.rstrip(b" \t")
        elif lowered == b"content-length":
            response.framed = True
            if response.length is None:
                response.length = value.rstrip(b" \t")
        elif lowered == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                # its body could only be relayed still encoded, and the header is dropped
                raise _Refused("a transfer coding other than chunked")
            response.framed = True
        # OWS around a value is not part of it (RFC 9110 5.5); llhttp keeps what trails
        response.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise _Refused(f"status {status} is outside 100-599")
        if 100 <= status < 200 and status != 101:
            # an interim answer (as aiohttp's client does, skipped): the real one follows
            self.interims += 1
            if self.interims > MAX_INTERIM:
                raise _Refused(f"more than {MAX_INTERIM} interim answers")
            self.interim = True
            response.headers.clear()
            response.media = response.length = None
            response.framed = False
            return
        response.status = status
        if response.head:
            # llhttp cannot be told that a response answers HEAD, and would read the
            # Content-Length it names as a body: the answer ends here, and so does the
            # connection (HEAD is rare; a new parser state is not worth the risk)
            self._finish(response)
            self.abort()
        # the reader is woken as the read that held the head ends (data_received)

    def _finish(self, response: Answer) -> None:
        """``response`` has arrived whole: it and this connection part."""
        response._done = True
        response._conn = None

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        if response._done:
            return  # the body of an answer to HEAD: there is none
        response._chunks.append(body)
        response._size += len(body)
        if response._size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        response = self.response
        assert response is not None
        response.keep_alive = self.parser.should_keep_alive()
        self._finish(response)
        self.completed = True  # pooled by data_received once nothing follows in this read


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class LeanPool:
    """Keep-alive HTTP/1.1 connections to one origin (``http://`` or ``https://``).

    ``clock`` (``time.monotonic`` unless given) times the keep-alive and the name cache; the
    sweep of idle connections runs on the loop's timer and closes what :meth:`sweep` finds
    expired by ``clock``.
    """

    def __init__(self, host: str, port: int, *, tls: ssl_module.SSLContext | None = None,
                 connect_timeout: float = 5.0, keep_idle: float = 30.0,
                 dns_ttl: float = 300.0, clock: Callable[[], float] | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.connect_timeout = connect_timeout
        #: Seconds an unused connection is kept before it is closed.
        self.keep_idle = keep_idle
        #: Seconds a host name's addresses are reused for new connections (as aiohttp's
        #: ``ttl_dns_cache``); forgotten at once when none of them takes a connection.
        self.dns_ttl = dns_ttl
        self.clock = clock or time.monotonic
        #: The host name's addresses, looked up at ``_resolved_at`` (empty: look up again).
        self._addresses: list[tuple[str, int]] = []
        self._resolved_at = 0.0
        self._literal = _is_ip(host)
        self.lookups = 0  # host name lookups made, for tests
        default_port = 443 if tls is not None else 80
        named = f"[{host}]" if ":" in host else host  # an IPv6 address is bracketed
        self.host_header = (named if port == default_port else f"{named}:{port}").encode()
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.opened = 0  # connections made, for tests and benchmarks

    def head(self, method: str, path: str, length: int,
             headers: Iterable[tuple[str, str]] = (), fixed: bytes = b"") -> bytes:
        """The request head: ``headers`` as given (values as the client sent their bytes)
        and ``fixed``, header lines already encoded."""
        parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
                 % (method.encode(), path.encode(), self.host_header, length)]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError(f"header {name!r} has a character HTTP does not allow there")
            # the server read the client's bytes as UTF-8 with surrogateescape: this gives
            # back exactly the bytes it sent, obs-text included
            parts.append(b"%s: %s\r\n" % (name.encode(), value.encode("utf-8",
                                                                         "surrogateescape")))
        parts.append(fixed)
        parts.append(b"\r\n")
        return b"".join(parts)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: Iterable[tuple[str, str]] = (), *,
                      fixed: bytes = b"",
                      first_byte: float | None = None,
                      idle: float | None = None,
                      total: float | None = None,
                      fresh: bool = False) -> Answer:
        """Send one request; return once the status line and headers are in.

        ``first_byte`` bounds the wait for them; ``idle`` each later wait for body bytes;
        ``total`` the whole exchange from here to the body's last byte. ``fresh`` sends on a
        new connection. Raises :class:`StaleConnection` when a reused connection turns out
        closed before any byte of the answer.
        """
        loop = asyncio.get_running_loop()
        deadline = None if total is None else loop.time() + total
        data = self.head(method, path, len(body), headers, fixed) + body
        conn = await self._acquire(loop, fresh)
        response = Answer(conn, idle, deadline, method == "HEAD")
        conn.send(response, data)
        try:
            while not response.status:
                if response._error is not None:
                    raise response._error
                await response._wait(first_byte)
            return response
        except BaseException:
            conn.abort()  # given up on (cancelled, timed out): the upstream sees it go
            raise

    async def _acquire(self, loop: asyncio.AbstractEventLoop, fresh: bool) -> _Conn:
        if not fresh:
            expired = self.clock() - self.keep_idle
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and conn.idle_since > expired:
                    return conn
                conn.abort()
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await self._connect(loop)
        except TimeoutError as exc:
            raise ConnectTimeout() from exc
        except OSError as exc:
            raise ConnectError.of(exc) from exc
        self.opened += 1
        self._all.add(conn)
        return conn

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        """A new connection: to each of the host's addresses in turn until one takes it."""
        hostname = self.host if self.tls is not None else None
        addresses = [(self.host, self.port)] if self._literal else await self._resolve(loop)
        error: OSError | None = None
        for host, port in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, loop), host, port, ssl=self.tls,
                    server_hostname=hostname)
                return conn
            except OSError as exc:
                error = exc
        self._addresses = []  # look the name up again next time
        assert error is not None
        raise error

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[tuple[str, int]]:
        now = self.clock()
        if self._addresses and now - self._resolved_at < self.dns_ttl:
            return self._addresses
        self.lookups += 1
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "the host name has no address")
        self._addresses, self._resolved_at = addresses, now
        return addresses

    def _release(self, conn: _Conn) -> None:
        conn.idle_since = self.clock()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.keep_idle, self._sweep_now)

    def _sweep_now(self) -> None:
        self._sweeper = None
        self.sweep()
        if self._idle:
            oldest = min(conn.idle_since for conn in self._idle)
            wait = max(oldest + self.keep_idle - self.clock(), 0.0) + 0.01
            self._sweeper = self._idle[0].loop.call_later(wait, self._sweep_now)

    def sweep(self) -> int:
        """Close the pooled connections unused for ``keep_idle`` seconds; how many."""
        expired = self.clock() - self.keep_idle
        stale = [conn for conn in self._idle if conn.idle_since <= expired or conn.closed]
        if stale:
            self._idle = [conn for conn in self._idle if conn not in stale]
            for conn in stale:
                if conn.transport is not None:
                    conn.transport.close()
        return len(stale)

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def open(self) -> int:
        """Connections open now, pooled or carrying a request."""
        return len(self._all)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let connection_lost run
