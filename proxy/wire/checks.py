"""Every request-field rule in one place: refuse early, never crash. Pure data, no I/O.

``check_payload`` runs once a JSON body has been parsed (``parse_object``): nesting depth,
number of messages, and the types and sane ranges of the fields every OpenAI-compatible
server reads. Unknown fields pass on untouched (wire models allow extra fields); a known field
of the wrong type or an absurd value is a 400 here rather than a crash or a confusing answer
further on. Adapters keep only their "this backend cannot honour X" refusals.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import orjson

from proxy.config import RequestLimits
from proxy.errors import BadRequest

#: Longest model name accepted; real ones are far shorter, and names end up in messages.
MAX_MODEL_CHARS = 256
_INT32 = 2**31 - 1

#: field -> (lowest, highest) for integers (bool is not an integer here).
INT_FIELDS: dict[str, tuple[int, int]] = {
    "max_tokens": (1, _INT32),
    "max_completion_tokens": (1, _INT32),
    "n": (1, 128),
    "best_of": (1, 128),
    "seed": (-(2**63), 2**64 - 1),
    "top_k": (-1, _INT32),
    "top_logprobs": (0, 20),
    "dimensions": (1, 1 << 16),
}
#: field -> (lowest, highest) for finite numbers.
NUMBER_FIELDS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 100.0),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.0, 100.0),
}
BOOL_FIELDS = frozenset({"stream", "echo", "parallel_tool_calls"})
#: field -> the values it may take.
CHOICE_FIELDS: dict[str, tuple[str, ...]] = {"encoding_format": ("float", "base64")}
OBJECT_FIELDS = frozenset({"stream_options", "response_format", "logit_bias", "metadata"})
#: Every top-level field with a rule here but ``model`` and ``stream`` (which
#: :func:`check_request` reads first); a request's other fields pass untouched.
CHECKED_FIELDS = frozenset(
    {"stop", *INT_FIELDS, *NUMBER_FIELDS, *BOOL_FIELDS - {"stream"}, *OBJECT_FIELDS,
     *CHOICE_FIELDS}
)


#: The field each inference endpoint cannot do without.
REQUIRED: dict[str, str] = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


def check_request(
    endpoint: str, payload: dict[str, Any], body: bytes,
    limits: RequestLimits,
) -> tuple[str, bool]:
    """The requested model and whether a stream is asked for; ``BadRequest`` (with ``param``)
    for the first problem found in ``payload``."""
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required and must be a non-empty string", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"model must be at most {MAX_MODEL_CHARS} characters", param="model")
    required = REQUIRED[endpoint]
    if required not in payload:
        raise BadRequest(f"{required} is required", param=required)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    check_payload(endpoint, payload, body, limits)
    if _suspect(body):
        _members_once(body)
    return model, stream


def check_payload(
    endpoint: str, payload: dict[str, Any], body: bytes,
    limits: RequestLimits,
) -> None:
    """Raise ``BadRequest`` (with ``param``) for the first problem found in ``payload``."""
    # Nesting needs brackets: a body with fewer of them than the limit is shallow enough, and
    # counting bytes is C-speed, so the walk runs only for bodies that might be deep.
    limit = limits.max_json_depth
    if body.count(b"[") + body.count(b"{") > limit:
        _check_depth(payload, limit)
    # Only the fields the request has are looked at: a few membership tests (a set
    # intersection of the keys costs more, as it builds a set from them first).
    checked = CHECKED_FIELDS
    for name, value in payload.items():
        if name in checked:
            _check_field(name, value)
    if endpoint == "chat":
        _check_messages(payload.get("messages"), limits.max_messages)
        if "tools" in payload or "tool_choice" in payload:
            _check_tools(payload)
    elif endpoint == "completions":
        _check_tokens_or_text(payload.get("prompt"), "prompt")
    elif endpoint == "embeddings":
        _check_tokens_or_text(payload.get("input"), "input")


#: Members that decide where a request goes and how it is answered and counted; named twice,
#: they could be read one way here (orjson keeps the last) and another way upstream (some
#: servers keep the first): routed to one model's upstream, on its credential, while the
#: bytes forwarded ask for another model.
GUARDED = frozenset({"model", "stream", "stream_options"})
#: A lower-case letter or ``_`` written as an escape: the one way a member name can be spelt
#: twice without the same bytes twice (honest encoders escape only quotes, control characters
#: and, at most, non-ASCII or HTML characters).
_BACKSLASH = ord("\\")
_LETTER_ESCAPE = re.compile(rb"\\u00(?:5[fF]|6[1-9a-fA-F]|7[0-9aA])")
_SPACE = re.compile(r"[ \t\n\r]*")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_DECODER = json.JSONDecoder()


def check_members_once(body: bytes) -> None:
    """``BadRequest`` (``duplicate_member``) for a body that names a member of
    :data:`GUARDED` twice at its top level, or a member of ``stream_options`` twice.
    ``body`` has been parsed already (``parse_object``) and found shallow enough.

    An ordinary body costs two byte counts and one search: the walk below runs only when a
    guarded name's bytes occur twice anywhere, or a letter is written as an escape."""
    if _suspect(body):
        _members_once(body)


def _members_once(body: bytes) -> None:
    try:
        _walk_members(body.decode("utf-8"))
    except RecursionError:  # deeper than the C scanner goes: only with a huge max_json_depth
        raise BadRequest("JSON is nested too deeply", code="json_too_deep") from None


def _suspect(body: bytes) -> bool:
    if body.count(b'"model"') > 1:
        return True
    # one count for "stream" and "stream_options" alike; a body with both counts each
    if body.count(b'"stream') > 1 and (
        body.count(b'"stream"') > 1
        or body.count(b'"stream_options"') > 1
        or body.count(b'"include_usage"') > 1
    ):
        return True
    # a letter written as an escape needs a backslash: one memchr before the search
    return _BACKSLASH in body and _LETTER_ESCAPE.search(body) is not None


def _walk_members(text: str) -> None:
    seen: set[str] = set()
    for name, start in _members(text):
        if name in seen and name in GUARDED:
            raise _duplicate(name)
        seen.add(name)
        if name == "stream_options" and text[start] == "{":
            options: set[str] = set()
            for inner, _ in _members(text, start):
                if inner in options:
                    shown = inner if _PLAIN_NAME.fullmatch(inner) else "a member"
                    raise _duplicate(f"stream_options.{shown}")
                options.add(inner)


def _members(text: str, at: int = 0) -> Iterator[tuple[str, int]]:
    """``(name, where its value starts)`` for each member of the JSON object at ``at``, in
    order, duplicates included; ``text`` is known to be valid JSON."""
    index = _skip(text, _skip(text, at) + 1)  # past "{"
    if text[index] == "}":
        return
    while True:
        name, index = _DECODER.raw_decode(text, index)  # the name: a JSON string
        start = _skip(text, _skip(text, index) + 1)  # past ":"
        _, end = _DECODER.raw_decode(text, start)  # the value, skipped at C speed
        yield name, start
        index = _skip(text, end)
        if text[index] == "}":
            return
        index = _skip(text, index + 1)  # past ","


def _skip(text: str, index: int) -> int:
    """The index of the first non-space character at or after ``index``."""
    match = _SPACE.match(text, index)
    return index if match is None else match.end()


def _duplicate(name: str) -> BadRequest:
    return BadRequest(
        f"the request body names the member {name!r} more than once; send each member once",
        param=name,
        code="duplicate_member",
    )


def _check_field(name: str, value: Any) -> None:
    if value is None and name not in BOOL_FIELDS:
        return
    if name in INT_FIELDS:
        low, high = INT_FIELDS[name]
        if not (type(value) is int and low <= value <= high):  # a bool is not one
            raise BadRequest(f"{name} must be an integer from {low} to {high}", param=name)
    elif name in NUMBER_FIELDS:
        low_f, high_f = NUMBER_FIELDS[name]
        kind = type(value)
        if not ((kind is int or (kind is float and math.isfinite(value)))
                and low_f <= value <= high_f):
            raise BadRequest(f"{name} must be a number from {low_f:g} to {high_f:g}", param=name)
    elif name in BOOL_FIELDS:
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false", param=name)
    elif name in CHOICE_FIELDS:
        if value not in CHOICE_FIELDS[name]:
            allowed = " or ".join(CHOICE_FIELDS[name])
            raise BadRequest(f"{name} must be {allowed}", param=name)
    elif name in OBJECT_FIELDS:
        if not isinstance(value, dict):
            raise BadRequest(f"{name} must be an object", param=name)
    elif name == "stop":
        _check_stop(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_depth(payload: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise BadRequest(f"JSON is nested deeper than {limit} levels", code="json_too_deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("stop must be a string or a list of strings", param="stop")


def _check_messages(messages: Any, limit: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of message objects", param="messages")
    if len(messages) > limit:
        raise BadRequest(
            f"{len(messages)} messages exceed the limit of {limit}",
            param="messages",
            code="too_many_messages",
        )
    for i, message in enumerate(messages):
        # the usual message is one dict lookup and two type checks; the words of a refusal
        # are made only for one
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"messages[{i}].role must be a non-empty string",
                             param=f"messages[{i}].role")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(
                f"messages[{i}].content must be a string, a list of parts or null",
                param=f"messages[{i}].content",
            )
        if not all(isinstance(p, (dict, str)) for p in content):
            raise BadRequest(f"messages[{i}].content parts must be objects",
                             param=f"messages[{i}].content")


def _check_tools(payload: dict[str, Any]) -> None:
    tools = payload.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise BadRequest("tools must be a list of objects", param="tools")
    choice = payload.get("tool_choice")
    if choice is not None and not isinstance(choice, (str, dict)):
        raise BadRequest("tool_choice must be a string or an object", param="tool_choice")


def _check_tokens_or_text(value: Any, name: str) -> None:
    """``prompt`` / ``input``: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or all(_is_token(v) for v in value):
            return
        if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
            return
    raise BadRequest(
        f"{name} must be a string, a list of strings, or (lists of) token ids", param=name
    )


def _is_token(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= _INT32


def parse_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} at byte {exc.pos}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload
