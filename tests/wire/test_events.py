"""Whole SSE events cut out of reads: every line end SSE allows, a bounded held part."""

from __future__ import annotations

import pytest

from proxy.errors import UpstreamError
from proxy.wire.events import HeldBack, lines, span, split

STREAMS = [b"data: a\n\ndata: b\n\n", b"data: a\r\rdata: b\r\r",
           b"data: a\r\n\r\ndata: b\r\n\r\n", b"data: a\n\rdata: b\r\n\n",
           b": hi\rdata: a\r\n\rid: 2\ndata: b\r\r"]
#: Where each stream's first event is known to end: at its blank line's second line end (a
#: \r ends a line, whether or not a \n follows).
FIRST_ENDS = dict(zip(STREAMS, (9, 9, 10, 9, 15), strict=True))


@pytest.mark.parametrize("stream", STREAMS)
def test_events_are_passed_on_as_soon_as_their_blank_line_is_in(stream: bytes) -> None:
    for cut in range(1, len(stream)):
        held = HeldBack(1024)
        first = held.feed(stream[:cut])
        second = held.feed(stream[cut:])
        assert first + second + held.rest() == stream, cut
        got = [lines(event) for event in split(first + second)]
        assert [[x for x in lines if x.startswith(b"data:")] for lines in got] == [
            [b"data: a"], [b"data: b"]], (cut, got)
        if cut >= FIRST_ENDS[stream]:  # the first event goes as soon as its blank line is in
            assert first.startswith(stream[:FIRST_ENDS[stream]]), cut
        else:
            assert first == b"", cut


def test_an_event_that_never_ends_is_bounded_and_searched_once() -> None:
    held = HeldBack(1 << 20)
    piece = b"x" * 16384
    held.feed(b"data: ")
    for _ in range(63):
        assert held.feed(piece) == b""
    assert held.scanned < 64 * (16384 + 2)  # each byte searched once, not on every read
    with pytest.raises(UpstreamError) as caught:
        held.feed(piece * 2)
    assert caught.value.code == "upstream_response_too_large"
    assert len(held.held) == 0  # the held part is let go with the stream


def test_what_follows_the_last_blank_line_is_one_more_event() -> None:
    assert split(b"data: a\n\ndata: b") == [b"data: a\n\n", b"data: b"]


def test_the_span_of_an_event_is_found_from_any_byte_of_its_lines() -> None:
    for stream in STREAMS:
        events = split(stream)
        start = 0
        for event in events:
            for at in range(start, start + len(event)):
                if stream[at] in b"\r\n":
                    continue  # a line's own bytes are asked about, not its end's
                begin, end = span(stream, at)
                assert stream[begin:end] == event, (stream, at)
            start += len(event)
