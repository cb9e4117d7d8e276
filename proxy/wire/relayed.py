"""Answers of OpenAI-compatible upstreams (``custom``, a vLLM server, Function Network), read
and rewritten as they are relayed: they name the model the client asked for, and the tokens
they report are read for the metrics.

The fast path works on bytes, and only where the bytes prove it right. An answer (or an
event's JSON) is spliced when its ``model`` member is the compact ``"model":"<name>"`` at the
top level (the object's first ``{`` and no ``{`` or ``[`` before the member), its value holds
no escape, and nothing else could name a model: no other ``"model"`` in the bytes (a
pretty-printed ``"model" :`` is one) and no ``\\u`` escape (which could spell the key). Inside
a JSON string every quote is escaped, so ``"model"`` occurs in valid JSON only as a key or as
the whole string ``model``. A stream learns the upstream's spelling from its first event, and
each later read whose every ``"model"`` is that spelling, and whose every ``"usage"`` is
``"usage":null``, is renamed with one ``replace``. Anything else (another spelling, a usage
event, an escaped key) is parsed and serialised again, event by event: the client always gets
JSON naming its model, read once.

A stream is cut into whole events as it arrives (``proxy.wire.events``): an event is relayed
once its blank line is in, and one that never ends fails the stream at
``limits.max_response_bytes``. When the proxy asked the upstream for the usage event
(``stream_options.include_usage``) and the client did not, every usage the stream carries is
read and removed, so the client sees exactly the stream it asked for.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import orjson

from proxy.wire.events import HeldBack, span, split
from proxy.wire.events import lines as split_lines
from proxy.wire.tokens import MAX_TOKENS

MODEL = b'"model":'
MODEL_KEY = b'"model"'
USAGE = b'"usage":'
USAGE_KEY = b'"usage"'
NO_USAGE = b'"usage":null'
ESCAPE = b"\\u"
_BRACE, _BRACKET, _BACKSLASH = 123, 91, 92  # '{' '[' '\\'
_MEMBER_BEFORE = (44, 123)  # ',' '{': what precedes a key in compact JSON
_LAST_MODEL = b',"model":"'
_STRING = rb'"[^"\\]*+"'
_SCALAR = rb'(?:' + _STRING + rb'|[^"{}\[\],\\]++)'
_FLAT = (rb'(?:' + _SCALAR + rb'|\{(?:' + _STRING + rb':' + _SCALAR + rb'(?:,' + _STRING + rb':'
         + _SCALAR + rb')*)?\}|\[(?:' + _SCALAR + rb'(?:,' + _SCALAR + rb')*)?\])')
_NESTED = (rb'(?:' + _FLAT + rb'|\{(?:' + _STRING + rb':' + _FLAT + rb'(?:,' + _STRING + rb':'
           + _FLAT + rb')*)?\}|\[(?:' + _FLAT + rb'(?:,' + _FLAT + rb')*)?\])')
#: What may follow a top-level member to the end of its object: whole members, then ``}``.
_TAIL = re.compile(rb'(?:,' + _STRING + rb':' + _NESTED + rb')*+\}\s*+\Z')
#: The longest tail :data:`_TAIL` is tried on (a usage object is a few hundred bytes).
_MAX_TAIL = 4096
#: How many closing braces are tried when cutting a ``usage`` object out of a body.
_MAX_BRACES = 8
#: The largest stream event held back by default (``limits.max_response_bytes``'s default).
MAX_EVENT = 16 * 1024 * 1024


#: ``"model":<name>`` for the names clients asked for lately (the same few, request after
#: request), at most ``_MEMBERS_KEPT`` of them.
_MEMBERS: dict[str, bytes] = {}
_MEMBERS_KEPT = 256


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
    """One answer on its way back: names ``model`` (the name the client asked for) and reads
    its ``usage``; ``drop_usage``: the usage is the proxy's own request, not the client's, and
    is removed from the stream; ``max_event``: the largest stream event held back."""

    __slots__ = ("complete", "drop_usage", "events", "first", "grown", "max_event", "member",
                 "model", "seen", "usage", "usage_at")

    def __init__(self, model: str, *, drop_usage: bool = False,
                 max_event: int = MAX_EVENT) -> None:
        self.model = model
        member = _MEMBERS.get(model)
        if member is None:
            if len(_MEMBERS) >= _MEMBERS_KEPT:
                _MEMBERS.clear()
            member = _MEMBERS[model] = MODEL + orjson.dumps(model)
        self.member = member
        #: The member as the upstream spelled it in its first event, proven top-level.
        self.seen: bytes | None = None
        #: How many bytes one replacement of ``seen`` adds (0: as many as it takes away).
        self.grown = 0
        self.drop_usage = drop_usage
        self.usage: dict[str, Any] | None = None
        self.max_event = max_event
        #: The incomplete event held back, made when a read first ends inside an event.
        self.events: HeldBack | None = None
        self.first = 0.0
        self.usage_at = 0.0
        #: The whole answer went by (a stream to its end), so a missing usage is missing.
        self.complete = False

    def body(self, body: bytes) -> bytes:
        """A whole (non-streamed) answer, renamed; its usage read."""
        out = self._spliced_body(body)
        if out is None:
            out = self._parsed_body(body)
        self.complete = True
        return out

    def chunk(self, chunk: bytes) -> bytes:
        """The part of a stream to send now: whole events only, renamed; ``b""`` if none yet.

        Called per read, so the usual case is a few C-level calls: a read of whole events
        (``endswith``), the checks that the bytes hold only the spelling learnt (``count``),
        and one ``replace`` (nothing when it already says the client's name).
        """
        events = self.events
        if (events is not None and events.held) or not chunk.endswith(b"\n\n"):
            if events is None:
                events = self.events = HeldBack(self.max_event)
            chunk = events.feed(chunk)
            if not chunk:
                return chunk
        if _BACKSLASH not in chunk:
            # no escape: renamed with one replace when every "model" is the spelling learnt,
            # usage events included; then each usage but ``null`` is read from the renamed
            # bytes (the usual stream: one, in its last event)
            out = self._renamed(chunk)
            if out is None:
                return self._events(chunk)
            usage = out.find(USAGE_KEY)
            return out if usage < 0 else self._usage_read(out, usage)
        usage = chunk.find(USAGE_KEY)
        if suspects := _suspects(chunk, usage):
            return self._events(chunk, suspects)
        out = self._renamed(chunk)
        return out if out is not None else self._events(chunk, [])

    def _usage_read(self, data: bytes, at: int) -> bytes:
        """Renamed whole events without escapes, their usages (from ``at``, the first
        ``"usage"``) read, and removed where the client did not ask for them."""
        while at >= 0:
            if data.startswith(NO_USAGE, at):
                at = data.find(USAGE_KEY, at + len(NO_USAGE))
                continue
            begin, end = span(data, at)
            event = data[begin:end]
            kept = self._parsed_event(event)
            if kept is not event:  # one copy: the pieces around it are views
                view = memoryview(data)
                data = b"".join((view[:begin], kept, view[end:]))
                end = begin + len(kept)
            at = data.find(USAGE_KEY, end)
        return data

    def end(self) -> bytes:
        """What is left of a stream that ended without a blank line."""
        rest = self.events.rest() if self.events is not None else b""
        return self._events(rest) if rest else rest

    def rename(self, data: bytes) -> bytes:
        """A whole answer or whole events (``data:``), renamed; their usage read."""
        if not data.startswith(b"data:"):
            return self.body(data)
        suspects = _suspects(data)
        out = None if suspects else self._renamed(data)
        return out if out is not None else self._events(data, suspects)

    def tokens(self) -> tuple[int | None, int | None, dict[str, float], bool]:
        """Prompt and completion tokens as reported (``None`` where not a count, see
        ``proxy.wire.tokens``), the generation speed of a stream (completion tokens over the
        time from the first chunk to the usage event), and whether a count was not one."""
        usage = self.usage or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        invalid = False
        # token_count, written out: it runs for every answer
        if prompt is not None and not (type(prompt) is int and 0 <= prompt <= MAX_TOKENS):
            prompt, invalid = None, True
        if completion is not None and not (
                type(completion) is int and 0 <= completion <= MAX_TOKENS):
            completion, invalid = None, True
        extra: dict[str, float] = {}
        if completion and self.usage_at > self.first > 0:
            extra["tokens_per_second"] = completion / (self.usage_at - self.first)
        return prompt, completion, extra, invalid

    # --- streams ---------------------------------------------------------------------------

    def _spliced(self, data: bytes) -> bytes | None:
        """Whole events renamed on bytes, or ``None`` where the bytes do not prove that right:
        no ``\\u`` escape, no usage but ``"usage":null``, and every ``"model"`` the spelling
        learnt (:meth:`_renamed`)."""
        if ((_BACKSLASH in data and data.find(ESCAPE) >= 0)
                or ((usages := data.count(USAGE_KEY)) and usages != data.count(NO_USAGE))):
            return None
        return self._renamed(data)

    def _renamed(self, data: bytes) -> bytes | None:
        """Whole events with neither escape nor usage, renamed on bytes, or ``None`` unless
        every ``"model"`` in them is the spelling learnt from the first event whose bytes
        prove it top-level."""
        seen = self.seen
        if seen is None:
            if not self.first:
                self.first = time.perf_counter()
            seen = self.seen = self._learn(data)
            if seen is None:
                return None
        if seen is self.member:
            out, renamed = data, data.count(seen)
        else:  # how many were replaced, from the bytes the replacement added (or count)
            out = data.replace(seen, self.member)
            grown = self.grown
            renamed = (len(out) - len(data)) // grown if grown else data.count(seen)
        return out if data.count(MODEL_KEY) == renamed else None

    def _events(self, data: bytes, suspects: list[tuple[int, int]] | None = None) -> bytes:
        """Whole events that could not be renamed together: the events holding a usage or an
        escape (``suspects``, see :func:`_suspects`) are taken one by one, the runs between
        them together again (so one usage event in a read costs one parse, not one per
        event)."""
        out = []
        start = 0
        for begin, end in _suspects(data) if suspects is None else suspects:
            if begin > start:
                out.append(self._run(data[start:begin]))
            out.append(self._one(data[begin:end]))
            start = end
        if start < len(data):
            out.append(self._run(data[start:]))
        return b"".join(out)

    def _run(self, data: bytes) -> bytes:
        """Events that hold neither usage nor escape (see :func:`_suspects`)."""
        if data.find(MODEL_KEY) < 0:
            return data  # nothing names a model (``[DONE]``): nothing to rename
        renamed = self._renamed(data)
        return renamed if renamed is not None else b"".join(map(self._one, split(data)))

    def _one(self, event: bytes) -> bytes:
        spliced = self._spliced(event)
        return spliced if spliced is not None else self._parsed_event(event)

    def _learn(self, data: bytes) -> bytes | None:
        """The first event's ``model`` member, when its bytes prove it the top-level one."""
        begin = data.find(b"data:")
        if begin < 0:
            return None
        seen = _proven(data, begin + 6 if data[begin + 5:begin + 6] == b" " else begin + 5)
        if seen is not None:
            self.grown = len(self.member) - len(seen)
        return self.member if seen == self.member else seen

    def _parsed_event(self, raw: bytes) -> bytes:
        """One event, its JSON renamed and its usage read (and removed when the client did not
        ask for it); an event that carried only that usage is dropped."""
        if raw.startswith(b"data: {") and raw.count(b"\n") == 2 and raw.endswith(b"\n\n"):
            lines = [raw[:-2]]  # the usual event: one data line
            event = _object(raw[6:-2])
        else:
            lines = split_lines(raw)
            data = [line[6:] if line[5:6] == b" " else line[5:]
                    for line in lines if line.startswith(b"data:")]
            event = _object(b"\n".join(data)) if data else None
        if event is None:
            return raw
        changed = self._rename(event)
        usage = event.get("usage")
        if usage is not None:
            if isinstance(usage, dict):
                self.usage = usage
                self.usage_at = time.perf_counter()
            if self.drop_usage:
                if not event.get("choices"):
                    return b""
                del event["usage"]
                changed = True
        if not changed:
            return raw
        others = b"".join(line + b"\n" for line in lines if line and not line.startswith(
            b"data:"))
        return others + b"data: " + _dumps(event) + b"\n\n"

    def _rename(self, answer: dict[str, Any]) -> bool:
        if answer.get("model") is None or answer["model"] == self.model:
            return False
        answer["model"] = self.model
        return True

    # --- whole answers ---------------------------------------------------------------------

    def _spliced_body(self, body: bytes) -> bytes | None:
        """``body`` renamed on bytes and its usage cut out, or ``None`` where the bytes do not
        prove that right."""
        seen = _proven(body, 0) or _proven_last(body)
        if (seen is None or (_BACKSLASH in body and body.find(ESCAPE) >= 0)
                or body.count(MODEL_KEY) != 1):
            return None
        # The usage is read, not relayed differently: the last member of that name is taken.
        at = body.rfind(USAGE_KEY)
        if at >= 0:
            if body[at + len(USAGE_KEY):at + len(USAGE)] != b":":
                return None
            found = _object_at(body, at + len(USAGE))
            if found is None and not body.startswith(b"null", at + len(USAGE)):
                return None
            self.usage = found
        return body if seen == self.member else body.replace(seen, self.member)

    def _parsed_body(self, body: bytes) -> bytes:
        answer = _object(body)
        if answer is None:
            return body
        usage = answer.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        return _dumps(answer) if self._rename(answer) else body


def _suspects(data: bytes, usage: int | None = None) -> list[tuple[int, int]]:
    """The spans of the events in ``data`` that hold a usage other than ``null`` or a ``\\u``
    escape, in order, merged where they touch; ``usage``: where the first ``"usage"`` is, if
    already sought."""
    spans: list[tuple[int, int]] = []
    for mark, harmless in ((USAGE_KEY, NO_USAGE), (ESCAPE, None)):
        if mark is ESCAPE and _BACKSLASH not in data:
            break
        at = usage if mark is USAGE_KEY and usage is not None else data.find(mark)
        while at >= 0:
            if harmless is None or not data.startswith(harmless, at):
                spans.append(span(data, at))
            at = data.find(mark, at + 1)
    if len(spans) < 2:
        return spans
    spans.sort()
    merged: list[tuple[int, int]] = []
    for begin, end in spans:
        if merged and begin < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((begin, end))
    return merged


def _proven(data: bytes, start: int) -> bytes | None:
    """The first ``"model"`` after ``start`` as its member ``"model":"..."``, when the bytes
    prove it a member of the JSON object that opens at ``start`` with a plain string value: no
    ``{`` or ``[`` lies between them (so no object or array is open), a comma or the brace
    precedes it (so its quote opens a key, not one inside a string), and its value holds no
    escape.

    Written for few calls: a bytes method that takes arguments parses them as a tuple, and
    ``bytes in bytes`` first tries its operand as an integer (an exception made and dropped),
    while ``int in bytes`` is one ``memchr``."""
    at = data.find(MODEL_KEY, start)
    if at <= start or data[start] != _BRACE or data[at - 1] not in _MEMBER_BEFORE:
        return None
    value = at + len(MODEL)
    head = data[start + 1:value + 1]  # up to the value's opening quote
    if _BRACE in head or _BRACKET in head or not head.endswith(b'":"'):
        return None
    close = data.find(b'"', value + 1)
    if close < 0 or _BACKSLASH in data[value:close]:
        return None
    return data[at:close + 1]


def _proven_last(data: bytes) -> bytes | None:
    """The last ``"model":"..."`` member of a body, when the bytes after it prove it a member
    of the top-level object: only whole members follow it (string or scalar values, or
    objects and arrays of those, two levels deep at most, no string with an escape), then the
    object's closing brace. An embeddings list names its model after its ``data`` array."""
    at = data.rfind(_LAST_MODEL) + 1
    if not at or len(data) - at > _MAX_TAIL:
        return None
    close = data.find(b'"', at + len(MODEL) + 1)
    if close < 0 or _BACKSLASH in data[at:close] or not _TAIL.match(data, close + 1):
        return None
    return data[at:close + 1]


def _object(text: bytes) -> dict[str, Any] | None:
    """``text`` as a JSON object, or ``None``. Integers orjson cannot hold (over 64 bits) are
    read by the standard library, so such an answer is renamed too."""
    if not text.lstrip().startswith(b"{"):
        return None
    try:
        found = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            found = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return None
    return found if isinstance(found, dict) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _dumps(answer: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(answer)
    except TypeError:  # an integer over 64 bits, read by the standard library
        return json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode()


def _object_at(body: bytes, start: int) -> dict[str, Any] | None:
    """The JSON object that begins at ``start``, parsed alone."""
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
