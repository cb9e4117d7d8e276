"""Table tests of the request mapping (OpenAI to Ollama) and of the 400s for what Ollama cannot do.

Answers, streams and NDJSON framing are in test_replies.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.adapters.ollama import requests as wire
from proxy.config import LimitsSection, RequestLimits, ServerSection
from proxy.errors import BadRequest
from proxy.wire.checks import check_request
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
#: What Ollama's own /v1 layer sends when the request and the operator leave them out.
DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


def checked(endpoint: str, payload: dict[str, Any]) -> None:
    """The request-field rules every request passes before an adapter sees it."""
    check_request(endpoint, payload, orjson.dumps(payload),
                  RequestLimits.of(LimitsSection(), ServerSection()))


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
        assert body[key] == ({**DEFAULTS, **value} if key == "options" else value)
    assert body["model"] == "llama3.2:3b"
    for absent in ("user", "metadata", "n", "response_format", "max_tokens"):
        assert absent not in body


def test_config_options_sit_under_the_request_and_keep_alive_is_sent() -> None:
    body = chat(
        {"temperature": 0.1},
        options={"num_ctx": 8192, "temperature": 0.7},
        keep_alive=300,
    )
    assert body["options"] == {"num_ctx": 8192, "temperature": 0.1, "top_p": 1.0}
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
            "tool_calls": [{"id": "call_1",
                            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "11 degrees", "tool_name": "get_weather",
         "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 11 degrees."},
    ]


def test_sampling_defaults_are_openais_as_ollamas_v1_sends_them() -> None:
    """Ollama's openai/openai.go sends temperature and top_p 1.0 when a request has none;
    the operator's options still come first, the request's own fields before both."""
    assert chat({})["options"] == {"temperature": 1.0, "top_p": 1.0}
    assert generate({})["options"] == {"temperature": 1.0, "top_p": 1.0}
    assert chat({}, options={"temperature": 0.3})["options"] == {"temperature": 0.3, "top_p": 1.0}
    assert chat({"top_p": 0.5, "temperature": 0})["options"] == {"temperature": 0, "top_p": 0.5}


def test_prior_reasoning_goes_back_as_thinking() -> None:
    for name in ("reasoning", "reasoning_content"):
        messages = [*USER, {"role": "assistant", "content": "4", name: "2 and 2"}, *USER]
        sent = chat({"messages": messages})["messages"]
        assert sent[1] == {"role": "assistant", "content": "4", "thinking": "2 and 2"}


@pytest.mark.parametrize(("effort", "think"), [
    ("none", False), ("minimal", "low"), ("low", "low"), ("medium", "medium"), ("high", "high"),
    ("max", "max"), ("xhigh", "max"), ("ultra", "max"),
])
def test_every_reasoning_effort_ollama_takes(effort: str, think: bool | str) -> None:
    assert chat({"reasoning_effort": effort})["think"] == think
    assert chat({"reasoning": {"effort": effort}})["think"] == think


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
    """Refused on the way in: by the request-field rules, or by the Ollama mapping."""
    request = {"model": "m", "messages": USER} | payload
    with pytest.raises(BadRequest) as caught:
        checked("chat", request)
        wire.chat_request(request, "m", options={}, keep_alive=None, stream=False)
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
        assert body[key] == ({**DEFAULTS, **value} if key == "options" else value)


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
    request = {"model": "m"} | payload
    with pytest.raises(BadRequest):
        if "input" in request:
            checked("embeddings", request)
        wire.embed_request(request, "m", options={}, keep_alive=None)
