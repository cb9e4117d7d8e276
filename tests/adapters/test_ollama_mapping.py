"""Table tests of the pure OpenAI <-> Ollama mapping: requests, answers, streams, framing."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest

from proxy.adapters import ollama_replies as replies
from proxy.adapters import ollama_wire as wire
from proxy.errors import BadRequest, UpstreamError
from tests.fakes.openapi import problems

USER = [{"role": "user", "content": "hi"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
PNG = "iVBORw0KGgo="


def chat(payload: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"options": {}, "keep_alive": None, "stream": False} | kwargs
    body = wire.chat_request({"messages": USER} | payload, "llama3.2:3b", **args)
    assert problems(body, "ChatRequest") == []
    return body


# --- requests ------------------------------------------------------------------------------

CHAT_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("temperature", {"temperature": 0.2}, {"options": {"temperature": 0.2}}),
    ("top_p", {"top_p": 0.9}, {"options": {"top_p": 0.9}}),
    ("seed", {"seed": 42}, {"options": {"seed": 42}}),
    ("stop string", {"stop": "\n"}, {"options": {"stop": ["\n"]}}),
    ("stop list", {"stop": ["a", "b"]}, {"options": {"stop": ["a", "b"]}}),
    ("max_tokens", {"max_tokens": 64}, {"options": {"num_predict": 64}}),
    (
        "max_completion_tokens wins",
        {"max_completion_tokens": 32, "max_tokens": 64},
        {"options": {"num_predict": 32}},
    ),
    ("presence_penalty", {"presence_penalty": 0.5}, {"options": {"presence_penalty": 0.5}}),
    ("frequency_penalty", {"frequency_penalty": 1.0}, {"options": {"frequency_penalty": 1.0}}),
    ("vLLM-style top_k", {"top_k": 20}, {"options": {"top_k": 20}}),
    (
        "json_object",
        {"response_format": {"type": "json_object"}},
        {"format": "json", "options": {}},
    ),
    ("text format", {"response_format": {"type": "text"}}, {"options": {}}),
    (
        "json_schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "required": ["a"]}},
            }
        },
        {"format": {"type": "object", "required": ["a"]}, "options": {}},
    ),
    ("stream flag", {}, {"stream": False}),
    ("reasoning effort", {"reasoning_effort": "high"}, {"think": "high", "options": {}}),
    ("reasoning none", {"reasoning_effort": "none"}, {"think": False, "options": {}}),
    ("logprobs", {"logprobs": True, "top_logprobs": 3}, {"logprobs": True, "top_logprobs": 3}),
    ("user is dropped", {"user": "u-1", "metadata": {"a": "b"}}, {"options": {}}),
    ("n=1 is fine", {"n": 1}, {"options": {}}),
]


@pytest.mark.parametrize(
    ("payload", "expected"), [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES]
)
def test_chat_request_fields(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    body = chat(payload)
    for key, value in expected.items():
        assert body[key] == value
    assert body["model"] == "llama3.2:3b"
    for absent in ("user", "metadata", "n", "response_format", "max_tokens"):
        assert absent not in body


def test_config_options_sit_under_the_request_and_keep_alive_is_sent() -> None:
    body = chat(
        {"temperature": 0.1},
        options={"num_ctx": 8192, "temperature": 0.7},
        keep_alive=300,
    )
    assert body["options"] == {"num_ctx": 8192, "temperature": 0.1}
    assert body["keep_alive"] == "300s"
    assert chat({}, keep_alive="10m")["keep_alive"] == "10m"
    assert "keep_alive" not in chat({})


def test_messages_of_every_role() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "no emoji"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is"},
                {"type": "text", "text": "in this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "11 degrees"},
        {"role": "assistant", "content": "It is 11 degrees."},
    ]
    body = chat({"messages": messages})
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "no emoji"},
        {"role": "user", "content": "what is\nin this picture?", "images": [PNG]},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"},
        {"role": "assistant", "content": "It is 11 degrees."},
    ]


def test_image_url_as_plain_string_data_uri() -> None:
    message = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": f"data:image/jpeg;base64,{PNG}"}],
    }
    assert chat({"messages": [message]})["messages"][0]["images"] == [PNG]


@pytest.mark.parametrize(
    ("payload", "expected_tools"),
    [
        ({"tools": [TOOL]}, [TOOL]),
        ({"tools": [TOOL], "tool_choice": "auto"}, [TOOL]),
        ({"tools": [TOOL], "tool_choice": "none"}, None),
        ({"tools": []}, None),
        (
            {"tools": [{"type": "function", "function": {"name": "now"}}]},
            [
                {
                    "type": "function",
                    "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
                }
            ],
        ),
    ],
    ids=["tools", "auto", "none omits tools", "empty", "parameters default"],
)
def test_tools(payload: dict[str, Any], expected_tools: list[Any] | None) -> None:
    assert chat(payload).get("tools") == expected_tools


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("n > 1", {"n": 2}, "n"),
    ("logit_bias", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("tool_choice required", {"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
    (
        "forced function",
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        "tool_choice",
    ),
    ("audio out", {"modalities": ["text", "audio"]}, "modalities"),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("legacy functions", {"functions": [TOOL["function"]]}, "functions"),
    ("temperature type", {"temperature": "hot"}, "temperature"),
    ("max_tokens negative", {"max_tokens": -1}, "max_tokens"),
    ("stop type", {"stop": 3}, "stop"),
    ("response_format type", {"response_format": {"type": "yaml"}}, "response_format"),
    ("json_schema without schema", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("reasoning effort", {"reasoning_effort": "extreme"}, "reasoning_effort"),
    ("no messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    (
        "remote image",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                }
            ]
        },
        "messages",
    ),
    (
        "audio input",
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        "messages",
    ),
    (
        "bad tool arguments",
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
                    ],
                }
            ]
        },
        "messages",
    ),
    ("tool without name", {"tools": [{"type": "function", "function": {}}]}, "tools"),
]


@pytest.mark.parametrize(
    ("payload", "param"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_chat_refuses_what_ollama_cannot_honour(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        wire.chat_request(
            {"messages": USER} | payload, "m", options={}, keep_alive=None, stream=False
        )
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.message


def generate(payload: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"options": {}, "keep_alive": None, "stream": True} | kwargs
    body = wire.generate_request({"prompt": "Once"} | payload, "llama3.2", **args)
    assert problems(body, "GenerateRequest") == []
    return body


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({}, {"prompt": "Once", "stream": True, "options": {}}),
        ({"prompt": ["Twice"]}, {"prompt": "Twice"}),
        ({"suffix": "end."}, {"suffix": "end."}),
        (
            {"max_tokens": 5, "stop": "\n", "seed": 1},
            {"options": {"num_predict": 5, "stop": ["\n"], "seed": 1}},
        ),
        ({"response_format": {"type": "json_object"}}, {"format": "json"}),
        ({"logprobs": 2}, {"logprobs": True, "top_logprobs": 2}),
        ({"echo": False, "best_of": 1}, {"prompt": "Once"}),
    ],
    ids=["plain", "batch of one", "suffix", "sampling", "json", "logprobs", "harmless defaults"],
)
def test_generate_request(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    body = generate(payload)
    for key, value in expected.items():
        assert body[key] == value


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"n": 3}, "n"),
        ({"logit_bias": {"1": 1}}, "logit_bias"),
        ({"suffix": 5}, "suffix"),
    ],
    ids=["several prompts", "token ids", "echo", "best_of", "n", "logit_bias", "suffix type"],
)
def test_generate_refuses(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        wire.generate_request(
            {"prompt": "x"} | payload, "m", options={}, keep_alive=None, stream=False
        )
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"input": "hello"}, {"input": "hello"}),
        ({"input": ["a", "b"]}, {"input": ["a", "b"]}),
        ({"input": "x", "dimensions": 4}, {"dimensions": 4}),
        ({"input": "x", "encoding_format": "base64"}, {"input": "x"}),
    ],
    ids=["string", "list", "dimensions", "base64 is ours to encode"],
)
def test_embed_request(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    body = wire.embed_request(payload, "all-minilm", options={"num_ctx": 512}, keep_alive=60)
    assert problems(body, "EmbedRequest") == []
    assert body["model"] == "all-minilm"
    assert body["options"] == {"num_ctx": 512}
    assert body["keep_alive"] == "60s"
    assert "encoding_format" not in body
    for key, value in expected.items():
        assert body[key] == value


@pytest.mark.parametrize(
    "payload",
    [
        {"input": [1, 2]},
        {"input": [[1, 2]]},
        {"input": []},
        {},
        {"input": "x", "dimensions": 0},
        {"input": "x", "encoding_format": "int8"},
    ],
    ids=["tokens", "token arrays", "empty", "missing", "dimensions", "encoding"],
)
def test_embed_refuses(payload: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        wire.embed_request(payload, "m", options={}, keep_alive=None)


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
    assert message["reasoning_content"] == "hmm"
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
    assert got[1]["choices"][0]["delta"] == {"reasoning_content": "because", "content": "x"}


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
