"""Server-sent events cut out of a byte stream as it arrives.

An event ends at a blank line, and SSE lets a line end with ``\\n``, ``\\r\\n`` or a bare ``\\r``,
so a blank line is any two line ends in a row: ``\\n\\n``, ``\\r\\r``, ``\\n\\r`` (``\\r\\n\\r\\n``
holds the last). :class:`HeldBack` passes on whole events only and keeps the rest until its
blank line arrives: only the bytes new in each read are searched (the held part never holds a
blank line), and the held part is bounded, so an event that never ends costs neither quadratic
time nor unbounded memory.
"""

from __future__ import annotations

import re

from proxy.errors import UpstreamError

_MARKS = (b"\n\n", b"\r\r", b"\n\r")
_CR = 13
#: One line end; a ``\r`` before ``\n`` is half of ``\r\n``, never a line end alone.
_LINE_END = re.compile(rb"\r\n|\r(?!\n)|\n")
#: A blank line: two line ends in a row.
_BLANK = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


def last_end(data: bytes) -> int:
    """Where the last whole event in ``data`` ends (after its blank line); 0 if none does."""
    cut = 0
    for mark in _MARKS:
        at = data.rfind(mark)
        if at >= 0 and at + 2 > cut:
            cut = at + 2
    if cut and data[cut - 1] == _CR and data[cut:cut + 1] == b"\n":
        cut += 1  # the blank line's \r was the start of a \r\n
    return cut


class HeldBack:
    """The incomplete event at the end of what has arrived; ``limit`` bounds its size
    (an event over it is an ``UpstreamError``, which ends the stream with an error event)."""

    __slots__ = ("held", "limit", "scanned")

    def __init__(self, limit: int) -> None:
        self.held = bytearray()
        self.limit = limit
        #: Bytes searched for a blank line so far: what arrived, not its square.
        self.scanned = 0

    def feed(self, chunk: bytes) -> bytes:
        """What was held and ``chunk``, up to the end of their last whole event (``b""`` if
        none ended); the rest is held."""
        held = self.held
        self.scanned += len(chunk) + 1
        if not held:
            cut = last_end(chunk)
            if cut:
                self.held = bytearray(chunk[cut:])
                return chunk if cut == len(chunk) else chunk[:cut]
        else:
            # A blank line may start on the held part's last byte; none lies wholly in it.
            before = held[-1:]
            cut = last_end(bytes(before) + chunk) - 1
            if cut > 0:
                out = bytes(held) + chunk[:cut]
                self.held = bytearray(chunk[cut:])
                return out
        held += chunk
        if len(held) > self.limit:
            size = len(held)
            held.clear()
            raise UpstreamError(
                f"the upstream sent a stream event of more than {size} bytes without its end; "
                f"the limit is {self.limit} bytes (limits.max_response_bytes)",
                code="upstream_response_too_large",
            )
        return b""

    def rest(self) -> bytes:
        """What is held at the end of the stream (an event without its blank line)."""
        rest = bytes(self.held)
        self.held.clear()
        return rest


def split(data: bytes) -> list[bytes]:
    """``data`` as events, each with its blank line; what follows the last blank line is one
    more event."""
    if _CR not in data:  # \n alone ends lines: split in C
        parts = data.split(b"\n\n")
        last = parts.pop()
        events = [part + b"\n\n" for part in parts]
        if last:
            events.append(last)
        return events
    events = []
    start = 0
    for blank in _BLANK.finditer(data):
        events.append(data[start:blank.end()])
        start = blank.end()
    if start < len(data):
        events.append(data[start:])
    return events


def lines(event: bytes) -> list[bytes]:
    """The lines of one event (empty ones included)."""
    return event.split(b"\n") if _CR not in event else _LINE_END.split(event)


def span(data: bytes, at: int) -> tuple[int, int]:
    """Where the event holding ``data[at]`` (a byte of one of its lines, not of a line end)
    begins and ends (after its blank line) in whole events ``data``."""
    if _CR not in data:  # \n alone ends lines: one blank line to look for, each way
        before, after = data.rfind(b"\n\n", 0, at), data.find(b"\n\n", at)
        return before + 2 if before >= 0 else 0, after + 2 if after >= 0 else len(data)
    begin, end = 0, len(data)
    for mark in _MARKS:
        before, after = data.rfind(mark, 0, at), data.find(mark, at)
        if before >= 0 and before + 2 > begin:
            begin = before + 2
        if 0 <= after and after + 2 < end:
            end = after + 2
    for edge in (begin, end):  # a blank line's \r may be the start of a \r\n
        if edge and data[edge - 1] == _CR and data[edge:edge + 1] == b"\n":
            if edge == begin:
                begin += 1
            else:
                end += 1
    return begin, end
