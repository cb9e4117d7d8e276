"""Table tests of the answer mapping (Ollama to OpenAI): whole answers, SSE streams, framing."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest

from proxy.adapters.ollama import replies
from proxy.errors import UpstreamError

# --- answers -------------------------------------------------------------------------------

DONE = {
    "done": True,
    "total_duration": 2_000_000_000,
    "load_duration": 500_000_000,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 250_000_000,
    "eval_count": 100,
    "eval_duration": 1_000_000_000,
}


@pytest.mark.parametrize(
    ("final", "tool_calls", "expected"),
    [
        ({"done_reason": "stop"}, False, "stop"),
        ({"done_reason": "length"}, False, "length"),
        ({"done_reason": "stop"}, True, "tool_calls"),
        ({"done_reason": "load"}, False, "stop"),
        ({}, False, "stop"),
    ],
)
def test_finish_reason(final: dict[str, Any], tool_calls: bool, expected: str) -> None:
    assert replies.finish_reason(final, tool_calls) == expected


def test_usage_and_timings() -> None:
    assert replies.usage(DONE) == {
        "prompt_tokens": 26,
        "completion_tokens": 100,
        "total_tokens": 126,
    }
    assert replies.usage({}) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert replies.timings(DONE) == {
        "total_duration": 2.0,
        "load_duration": 0.5,
        "prompt_eval_duration": 0.25,
        "eval_duration": 1.0,
        "tokens_per_second": 100.0,
        "prompt_tokens_per_second": 104.0,
    }


def test_chat_response_with_text() -> None:
    obj = {
        "model": "llama3.2:3b",
        "message": {"role": "assistant", "content": "Hello!"},
        "done_reason": "stop",
    } | DONE
    out = replies.chat_response(obj, model="public", response_id="chatcmpl-1", created=7)
    assert out == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "public",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 26, "completion_tokens": 100, "total_tokens": 126},
    }


def test_chat_response_with_tool_calls_and_thinking() -> None:
    calls = [
        {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
        {"function": {"name": "get_time", "arguments": {}}},
    ]
    obj = {
        "message": {"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": calls}
    } | DONE
    out = replies.chat_response(obj, model="m", response_id="chatcmpl-1", created=1)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    assert message["reasoning"] == "hmm" and "reasoning_content" not in message
    assert [c["function"] for c in message["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city":"Tokyo"}'},
        {"name": "get_time", "arguments": "{}"},
    ]
    ids = [c["id"] for c in message["tool_calls"]]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    assert all(c["type"] == "function" and "index" not in c for c in message["tool_calls"])
    single = replies.chat_response(obj, model="m", response_id="x", created=1, max_tool_calls=1)
    assert len(single["choices"][0]["message"]["tool_calls"]) == 1


def test_chat_response_logprobs() -> None:
    entry = {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}],
    }
    obj = {"message": {"role": "assistant", "content": "Hi"}, "logprobs": [entry]} | DONE
    out = replies.chat_response(obj, model="m", response_id="x", created=1)
    assert out["choices"][0]["logprobs"] == {"content": [entry], "refusal": None}


def test_completion_response() -> None:
    obj = {
        "response": "Hello world",
        "done_reason": "length",
        "logprobs": [
            {"token": "Hello", "logprob": -1.0},
            {
                "token": " world",
                "logprob": -2.0,
                "top_logprobs": [{"token": " world", "logprob": -2.0}],
            },
        ],
    } | DONE
    out = replies.completion_response(obj, model="public", response_id="cmpl-1", created=3)
    assert out["object"] == "text_completion"
    assert out["model"] == "public"
    assert out["choices"] == [
        {
            "index": 0,
            "text": "Hello world",
            "logprobs": {
                "tokens": ["Hello", " world"],
                "token_logprobs": [-1.0, -2.0],
                "top_logprobs": [{}, {" world": -2.0}],
                "text_offset": [0, 5],
            },
            "finish_reason": "length",
        }
    ]


@pytest.mark.parametrize("encoding", [None, "float", "base64"])
def test_embeddings_response(encoding: str | None) -> None:
    vectors = [[0.5, -0.25], [1.0, 0.0]]
    out = replies.embeddings_response(
        {"embeddings": vectors, "prompt_eval_count": 8}, model="public", encoding_format=encoding
    )
    assert out["object"] == "list" and out["model"] == "public"
    assert out["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    got = []
    for index, item in enumerate(out["data"]):
        assert item["object"] == "embedding" and item["index"] == index
        value = item["embedding"]
        if encoding == "base64":
            raw = base64.b64decode(value)
            value = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        got.append(value)
    assert got == vectors


# --- streams -------------------------------------------------------------------------------


def events(raw: bytes) -> list[Any]:
    """The SSE events in ``raw``: parsed JSON, or the string ``[DONE]``."""
    assert raw.endswith(b"\n\n")
    out: list[Any] = []
    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block
        data = block[len(b"data: ") :]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def translator(
    kind: Any = "chat", include_usage: bool = False, **kwargs: Any
) -> replies.StreamTranslator:
    return replies.StreamTranslator(
        kind,
        model="public",
        response_id="chatcmpl-9",
        created=5,
        include_usage=include_usage,
        **kwargs,
    )


def chat_line(content: str, **message: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2:3b",
        "message": {"role": "assistant", "content": content, **message},
        "done": False,
    }


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream(include_usage: bool) -> None:
    t = translator(include_usage=include_usage)
    raw = b"".join(t.line(obj) for obj in [chat_line("The"), chat_line(""), chat_line(" sky")])
    raw += t.line({"message": {"role": "assistant", "content": ""}, "done_reason": "stop"} | DONE)
    raw += t.end()
    got = events(raw)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    for chunk in chunks:
        assert chunk["id"] == "chatcmpl-9" and chunk["model"] == "public" and chunk["created"] == 5
        assert chunk["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "The"}
    assert chunks[1]["choices"][0]["delta"] == {"content": " sky"}
    assert chunks[2]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:2])
    if include_usage:
        assert chunks[3]["choices"] == []
        assert chunks[3]["usage"] == {
            "prompt_tokens": 26,
            "completion_tokens": 100,
            "total_tokens": 126,
        }
        assert len(chunks) == 4
    else:
        assert len(chunks) == 3
    assert t.final is not None and t.final["eval_count"] == 100


def test_chat_stream_tool_calls_and_length() -> None:
    t = translator()
    call = {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
    raw = t.line(chat_line("", tool_calls=[call])) + t.line(chat_line("", tool_calls=[call]))
    raw += t.line({"done_reason": "length"} | DONE) + t.end()
    chunks = events(raw)[:-1]
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert [c["index"] for c in first["tool_calls"]] == [0]
    assert first["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Tokyo"}',
    }
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["index"] == 1
    assert chunks[2]["choices"][0]["finish_reason"] == "tool_calls"

    single = translator(max_tool_calls=1)
    raw = single.line(chat_line("", tool_calls=[call, call])) + single.line(
        chat_line("", tool_calls=[call])
    )
    assert len(events(raw)) == 1


def test_chat_stream_role_only_when_first_line_is_empty() -> None:
    t = translator()
    got = events(t.line(chat_line("")) + t.line(chat_line("x", thinking="because")))
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert got[1]["choices"][0]["delta"] == {"reasoning": "because", "content": "x"}


def test_completion_stream() -> None:
    t = translator("completions", include_usage=True)
    raw = t.line({"response": "Once", "done": False}) + t.line({"response": " upon", "done": False})
    raw += t.line({"response": "", "done_reason": "stop"} | DONE) + t.end()
    chunks = events(raw)[:-1]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["Once", " upon", ""]
    assert chunks[0]["object"] == "text_completion"
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["usage"]["completion_tokens"] == 100


def test_stream_error_line_and_missing_done() -> None:
    t = translator()
    t.line(chat_line("partial"))
    with pytest.raises(UpstreamError, match="an error was encountered") as caught:
        t.line({"error": "an error was encountered while running the model"})
    assert caught.value.status == 502 and not caught.value.retryable
    with pytest.raises(UpstreamError, match="before its final 'done'"):
        translator().end()


# --- framing -------------------------------------------------------------------------------

LINES = [b'{"a":1}', b'{"b":"x\\ny"}', b'{"c":3}']


def split_all(reads: list[bytes]) -> list[bytes]:
    splitter = replies.NDJSONLines()
    out = [line for read in reads for line in splitter.feed(read)]
    out.append(splitter.flush())
    return [line for line in out if line.strip()]


@pytest.mark.parametrize(
    "reads",
    [
        [b"\n".join(LINES) + b"\n"],  # many lines in one read
        [b'{"a"', b":1}\n" + LINES[1] + b"\n", LINES[2] + b"\n"],  # a line split in two reads
        [bytes([b]) for b in b"\n".join(LINES) + b"\n"],  # one byte per read
        [b"\n".join(LINES)],  # last line without a newline
        [LINES[0] + b"\r\n\n", LINES[1] + b"\n\n" + LINES[2]],  # CRLF and blank lines
    ],
    ids=["many per read", "split line", "byte by byte", "no trailing newline", "blank and CRLF"],
)
def test_ndjson_framing(reads: list[bytes]) -> None:
    assert [orjson.loads(line) for line in split_all(reads)] == [
        orjson.loads(line) for line in LINES
    ]


def test_ndjson_line_limit() -> None:
    splitter = replies.NDJSONLines(max_line=8)
    splitter.feed(b"12345")
    with pytest.raises(UpstreamError, match="longer than 8 bytes"):
        splitter.feed(b"67890")


@pytest.mark.parametrize(
    ("line", "expected"),
    [(b"", None), (b"  \r", None), (b'{"a": 1}\r', {"a": 1})],
)
def test_parse_line(line: bytes, expected: Any) -> None:
    assert replies.parse_line(line) == expected


@pytest.mark.parametrize("line", [b"{nope", b"[1, 2]", b'"text"'])
def test_parse_line_refuses_what_is_not_an_object(line: bytes) -> None:
    with pytest.raises(UpstreamError) as caught:
        replies.parse_line(line)
    assert caught.value.status == 502
