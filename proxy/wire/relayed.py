"""Answers of OpenAI-compatible upstreams (``custom``, a vLLM server, Function Network), read
and rewritten on bytes as they are relayed: they name the model the client asked for, and
the tokens they report are read for the metrics.

Why a bytes search finds the right ``model``: in OpenAI's answer shapes (completion, stream
chunk, embeddings list) the only object with a ``model`` member is the top-level one, and
inside JSON strings every quote is escaped, so the bytes ``"model":`` occur only as that
member: once per body, once per SSE event. The same holds for ``"usage":``.

A stream is never parsed as a whole: each chunk is searched (a few C-level calls), and only
the event that carries a non-null ``usage`` (the last one) is parsed. When the proxy asked the
upstream for that event (``stream_options.include_usage``) and the client did not, the event
is dropped, so the client sees exactly the stream it asked for.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

MODEL = b'"model":'
USAGE = b'"usage":'
_QUOTE = 34  # '"'
_SPACE = 32
#: How many closing braces are tried when cutting a ``usage`` object out of a body.
_MAX_BRACES = 8


def ask_usage(payload: dict[str, Any]) -> bool:
    """Set ``stream_options.include_usage`` in a stream request whose client did not ask for
    the usage event; whether ``payload`` changed."""
    options = payload.get("stream_options")
    if isinstance(options, dict):
        if options.get("include_usage"):
            return False
        payload["stream_options"] = {**options, "include_usage": True}
    else:
        payload["stream_options"] = {"include_usage": True}
    return True


class Relayed:
    """One answer on its way back: renames its ``model`` to ``model`` (the name the client
    asked for) and reads its ``usage``; ``drop_usage``: the usage event is the proxy's own
    request, not the client's, and is removed from the stream."""

    __slots__ = ("complete", "drop_usage", "first", "member", "seen", "tail", "usage",
                 "usage_at")

    def __init__(self, model: str, *, drop_usage: bool = False) -> None:
        self.member = MODEL + orjson.dumps(model)
        #: The member as the upstream spelled it in its first event (an upstream names its
        #: model the same way throughout a stream), replaced in one call from then on.
        self.seen: bytes | None = None
        self.drop_usage = drop_usage
        self.usage: dict[str, Any] | None = None
        self.tail = b""  # an incomplete event held back until the rest arrives
        self.first = 0.0
        self.usage_at = 0.0
        #: The whole answer went by (a stream to its end), so a missing usage is missing.
        self.complete = False

    def body(self, body: bytes) -> bytes:
        """A whole (non-streamed) answer, renamed; its usage read."""
        body = self._splice(body)
        at = body.rfind(USAGE)
        if at >= 0:
            found = _object_at(body, at + len(USAGE))
            if found is not None:
                self.usage = found
        self.complete = True
        return body

    def chunk(self, chunk: bytes) -> bytes:
        """The part of a stream to send now: whole events only, renamed; ``b""`` if none yet.

        Called per chunk, so the usual case costs three C-level calls: a chunk of whole events
        (``endswith``), the upstream's ``model`` member replaced as it spelled it in the first
        event (``replace``; nothing when it already says the client's name), and a search for
        ``usage``.
        """
        if self.tail or not chunk.endswith(b"\n\n"):
            chunk = self._whole_events(chunk)
            if not chunk:
                return chunk
        seen = self.seen
        if seen is None:  # the first event: learn how the upstream names its model
            if not self.first:
                self.first = time.perf_counter()
            chunk = self._splice(chunk)
        elif seen is not self.member:
            chunk = chunk.replace(seen, self.member)
        if USAGE in chunk:
            chunk = self._read_usage(chunk)
        return chunk

    def _whole_events(self, chunk: bytes) -> bytes:
        """``chunk`` after what was held back, up to its last complete event; the rest is held
        back until its blank line arrives."""
        if self.tail:
            chunk = self.tail + chunk
            self.tail = b""
        if chunk.endswith(b"\n\n"):
            return chunk
        lf, crlf = chunk.rfind(b"\n\n"), chunk.rfind(b"\r\n\r\n")
        cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        self.tail = chunk[cut:]
        return chunk[:cut]

    def end(self) -> bytes:
        """What is left of a stream that ended without a blank line."""
        tail, self.tail = self.tail, b""
        return self.rename(tail) if tail else tail

    def tokens(self) -> tuple[int | None, int | None, dict[str, float]]:
        """Prompt and completion tokens as reported, and the generation speed of a stream
        (completion tokens over the time from the first chunk to the usage event)."""
        usage = self.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt = prompt if isinstance(prompt, int) else None
        completion = completion if isinstance(completion, int) else None
        extra: dict[str, float] = {}
        if completion and self.usage_at > self.first > 0:
            extra["tokens_per_second"] = completion / (self.usage_at - self.first)
        return prompt, completion, extra

    def rename(self, data: bytes) -> bytes:
        seen = self.seen
        if seen is None:
            return self._splice(data)
        return data if seen is self.member else data.replace(seen, self.member)

    def _splice(self, data: bytes) -> bytes:
        """``data`` with its first ``model`` member's value replaced, however the upstream
        spelled it; the rest (more events of a stream) replaced by that spelling, in one call.
        """
        at = data.find(MODEL)
        size = len(data)
        while at >= 0:
            value = at + len(MODEL)
            while value < size and data[value] == _SPACE:
                value += 1
            if value < size and data[value] == _QUOTE:
                close = data.find(b'"', value + 1)
                if close < 0:
                    return data
                member = self.member
                seen = data[at:close + 1]
                if seen == member:  # it says the client's name already: nothing to replace
                    self.seen = member
                    return data
                self.seen = seen
                return data.replace(seen, member)  # this event's and any further ones
            at = data.find(MODEL, value)  # "model": null, or no value yet
        return data

    def _read_usage(self, chunk: bytes) -> bytes:
        at = chunk.find(USAGE)
        while at >= 0:
            value = at + len(USAGE)
            while chunk[value:value + 1] == b" ":
                value += 1
            if chunk[value:value + 1] == b"{":
                begin = chunk.rfind(b"data:", 0, at)
                end = chunk.find(b"\n", value)
                if begin >= 0 and end >= 0:
                    return self._usage_event(chunk, begin, end)
            at = chunk.find(USAGE, value)
        return chunk

    def _usage_event(self, chunk: bytes, begin: int, end: int) -> bytes:
        try:
            event = orjson.loads(chunk[begin + 5:end])
        except orjson.JSONDecodeError:
            return chunk
        usage = event.get("usage") if isinstance(event, dict) else None
        if not isinstance(usage, dict):
            return chunk
        self.usage = usage
        self.usage_at = time.perf_counter()
        if not self.drop_usage:
            return chunk
        while chunk[end + 1:end + 2] in (b"\n", b"\r"):  # the blank line that ends the event
            end += 1
        if event.get("choices"):  # usage on a chunk that carries content: keep the content
            del event["usage"]
            return chunk[:begin] + b"data: " + orjson.dumps(event) + b"\n\n" + chunk[end + 1:]
        return chunk[:begin] + chunk[end + 1:]


def _object_at(body: bytes, start: int) -> dict[str, Any] | None:
    """The JSON object that begins at ``start`` (after spaces), parsed alone."""
    while body[start:start + 1] == b" ":
        start += 1
    if body[start:start + 1] != b"{":
        return None
    end = body.find(b"}", start)
    for _ in range(_MAX_BRACES):
        if end < 0:
            return None
        try:
            found = orjson.loads(body[start:end + 1])
        except orjson.JSONDecodeError:
            end = body.find(b"}", end + 1)
            continue
        return found if isinstance(found, dict) else None
    return None
