"""OpenAI requests as Ollama's native API requests: pure functions, no I/O.

Requests only: :func:`chat_request` (``/api/chat``), :func:`generate_request`
(``/api/generate``) and :func:`embed_request` (``/api/embed``) turn a parsed OpenAI body into
Ollama's, or raise ``BadRequest`` for what Ollama cannot honour. Answers are mapped back in
:mod:`proxy.adapters.ollama.replies`.

Parameters that do not change the output (``user``, ``metadata``, ``store``, ``service_tier``,
``parallel_tool_calls: true``, ...) are accepted and dropped. Parameters that would change it
and that Ollama has no way to honour are refused, so a client never gets silently different
output from what it asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.errors import BadRequest

# OpenAI sampling fields that are Ollama model options under the same name. top_k, min_p and
# repeat_penalty are not OpenAI fields, but vLLM-style clients send them and Ollama has them.
_SAME_NAME_OPTIONS = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repeat_penalty",
)

# As Ollama's own OpenAI layer maps them (openai/openai.go, thinkFromReasoningEffort): OpenAI's
# scale clamped to Ollama's tiers, "ultra" (a tier clients add) included.
_THINK_LEVELS: Mapping[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}
#: Sampling defaults when neither the request nor the operator's options set them: OpenAI's
#: documented defaults, which Ollama's own /v1 layer sends too (rather than Ollama's native
#: temperature 0.8 / top_p 0.9).
_OPENAI_DEFAULTS: Mapping[str, float] = {"temperature": 1.0, "top_p": 1.0}


# --- requests ------------------------------------------------------------------------------


def chat_request(
    payload: Mapping[str, Any],
    model: str,
    *,
    options: Mapping[str, Any],
    keep_alive: str | int | None,
    stream: bool,
) -> dict[str, Any]:
    """The ``/api/chat`` body for an OpenAI chat completion request.

    ``options`` are the operator's Ollama options; the request's own sampling fields override
    them key by key. Raises ``BadRequest`` naming the field Ollama cannot honour.
    """
    _refuse_unsupported(payload, "chat")
    body: dict[str, Any] = {
        "model": model,
        "messages": _messages(payload["messages"]),
        "stream": stream,
        "options": _options(payload, options),
    }
    tools = _tools(payload)
    if tools:
        body["tools"] = tools
    _common(body, payload, keep_alive)
    return body


def generate_request(
    payload: Mapping[str, Any],
    model: str,
    *,
    options: Mapping[str, Any],
    keep_alive: str | int | None,
    stream: bool,
) -> dict[str, Any]:
    """The ``/api/generate`` body for an OpenAI (legacy) completion request."""
    _refuse_unsupported(payload, "completions")
    prompt = payload.get("prompt")
    # OpenAI allows a batch of prompts; Ollama answers one, so only a batch of one passes.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest(
            "'prompt' must be one string: Ollama does not take token ids or several prompts",
            param="prompt",
        )
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "stream": stream,
        "options": _options(payload, options),
    }
    suffix = payload.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise BadRequest("'suffix' must be a string", param="suffix")
        body["suffix"] = suffix
    _common(body, payload, keep_alive)
    return body


def embed_request(
    payload: Mapping[str, Any],
    model: str,
    *,
    options: Mapping[str, Any],
    keep_alive: str | int | None,
) -> dict[str, Any]:
    """The ``/api/embed`` body for an OpenAI embeddings request (string or list of strings)."""
    text = payload.get("input")
    if isinstance(text, list) and all(isinstance(item, str) for item in text) and text:
        pass
    elif not isinstance(text, str):
        raise BadRequest(
            "'input' must be a string or a non-empty list of strings: Ollama does not embed "
            "token ids",
            param="input",
        )
    # Ollama reads "" as no input (zero embeddings); OpenAI embeds it: send it as a list of one
    body: dict[str, Any] = {"model": model, "input": [text] if text == "" else text}
    dimensions = payload.get("dimensions")
    if dimensions is not None:
        body["dimensions"] = dimensions
    if options:
        body["options"] = dict(options)
    if keep_alive is not None:
        body["keep_alive"] = _keep_alive(keep_alive)
    return body


def _refuse_unsupported(payload: Mapping[str, Any], endpoint: str) -> None:
    n = payload.get("n")
    if n is not None and n != 1:
        raise BadRequest("Ollama returns one choice per request; 'n' must be 1", param="n")
    if payload.get("logit_bias"):
        raise BadRequest("Ollama does not support 'logit_bias'", param="logit_bias")
    if endpoint == "completions":
        best_of = payload.get("best_of")
        if best_of is not None and best_of != 1:
            raise BadRequest("Ollama does not support 'best_of' above 1", param="best_of")
        if payload.get("echo"):
            raise BadRequest("Ollama does not support 'echo'", param="echo")
    else:
        if payload.get("audio") is not None or any(
            m != "text" for m in payload.get("modalities") or ()
        ):
            raise BadRequest("Ollama answers with text only", param="modalities")
        if payload.get("prediction") is not None:
            raise BadRequest("Ollama does not support 'prediction'", param="prediction")
        if payload.get("functions") is not None or payload.get("function_call") is not None:
            raise BadRequest(
                "'functions' is deprecated and not supported; send 'tools' instead",
                param="functions",
            )


def _options(payload: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    options = {**_OPENAI_DEFAULTS, **base}
    # Types and ranges were checked with the request (proxy.wire.checks).
    for key in _SAME_NAME_OPTIONS:
        value = payload.get(key)
        if value is not None:
            options[key] = value
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if value is not None:
            options["num_predict"] = value
            break
    stop = payload.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif stop:
        options["stop"] = stop
    return options


def _common(body: dict[str, Any], payload: Mapping[str, Any], keep_alive: str | int | None) -> None:
    """Fields /api/chat and /api/generate share: format, think, logprobs, keep_alive."""
    fmt = _format(payload.get("response_format"))
    if fmt is not None:
        body["format"] = fmt
    effort = payload.get("reasoning_effort")
    reasoning = payload.get("reasoning")
    if effort is None and isinstance(reasoning, Mapping):
        effort = reasoning.get("effort")
    if effort is not None:
        if effort not in _THINK_LEVELS:
            raise BadRequest(f"unknown reasoning effort {effort!r}", param="reasoning_effort")
        body["think"] = _THINK_LEVELS[effort]
    logprobs = payload.get("logprobs")
    top = payload.get("top_logprobs")
    # Chat says logprobs: true (+ top_logprobs: k); completions says logprobs: k.
    if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs >= 0:
        top, logprobs = logprobs, True
    if logprobs:
        body["logprobs"] = True
        if isinstance(top, int) and top > 0:
            body["top_logprobs"] = top
    if keep_alive is not None:
        body["keep_alive"] = _keep_alive(keep_alive)


def _keep_alive(value: str | int) -> str | int:
    # /api/embed documents keep_alive as a string, and Ollama reads a bare number string as
    # a duration without unit (an error), so seconds are sent with their unit everywhere.
    return f"{value}s" if isinstance(value, int) else value


def _format(response_format: Any) -> str | dict[str, Any] | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise BadRequest(
                "'response_format.json_schema.schema' must be a JSON schema object",
                param="response_format",
            )
        return dict(schema)
    raise BadRequest(
        "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
        param="response_format",
    )


def _tools(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    if not tools or choice == "none":
        return []
    if choice not in (None, "auto"):
        # Ollama lets the model decide; it has no way to force a call, so saying it can would
        # hand the client an answer that breaks its contract.
        raise BadRequest(
            "Ollama cannot force a tool call; 'tool_choice' must be 'auto' or 'none'",
            param="tool_choice",
        )
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", param="tools")
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if tool.get("type") != "function" or not isinstance(fn, Mapping) or not fn.get("name"):
            raise BadRequest("each tool must be a function with a name", param="tools")
        spec: dict[str, Any] = {
            "name": fn["name"],
            "parameters": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            spec["description"] = fn["description"]
        out.append({"type": "function", "function": spec})
    return out


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for role "tool" replies
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(f"messages[{index}] must be an object", param="messages")
        role = message.get("role")
        if role == "developer":
            role = "system"
        text, images = _content(message.get("content"), index)
        item: dict[str, Any] = {"role": role, "content": text}
        if images:
            item["images"] = images
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls:
                item["tool_calls"] = [_tool_call_out(call, index, call_names) for call in calls]
            # the model's earlier reasoning, under either name clients send it back with
            thinking = message.get("reasoning") or message.get("reasoning_content")
            if isinstance(thinking, str) and thinking:
                item["thinking"] = thinking
        elif role in ("tool", "function"):
            item["role"] = "tool"
            call_id = message.get("tool_call_id")
            name = message.get("name") or call_names.get(call_id or "")
            if name:
                item["tool_name"] = name
            if isinstance(call_id, str) and call_id:
                item["tool_call_id"] = call_id  # templates match results to calls by id
        elif role not in ("system", "user"):
            raise BadRequest(f"messages[{index}] has an unknown role {role!r}", param="messages")
        out.append(item)
    return out


def _content(content: Any, index: int) -> tuple[str, list[str]]:
    if content is None:
        return "", []  # an assistant turn that only calls tools
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest(f"messages[{index}].content must be a string or a list", param="messages")
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            texts.append(part.get("text") or "")
        elif kind == "image_url":
            images.append(_image(part.get("image_url"), index))
        else:
            raise BadRequest(
                f"messages[{index}] has a {kind!r} part; Ollama takes text and images",
                param="messages",
            )
    return "\n".join(texts), images


def _image(image_url: Any, index: int) -> str:
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if isinstance(url, str) and url.startswith("data:"):
        header, _, data = url.partition(",")
        if header.endswith(";base64") and data:
            return data
    # Ollama cannot fetch URLs, and fetching them here would let clients reach the node's network.
    raise BadRequest(
        f"messages[{index}]: images must be data: URIs with base64 content", param="messages"
    )


def _tool_call_out(call: Any, index: int, call_names: dict[str, str]) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not fn.get("name"):
        raise BadRequest(f"messages[{index}].tool_calls needs function names", param="messages")
    arguments = fn.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(
                f"messages[{index}].tool_calls arguments are not valid JSON", param="messages"
            ) from exc
    out: dict[str, Any] = {"function": {"name": fn["name"], "arguments": arguments}}
    ident = call.get("id")
    if isinstance(ident, str) and ident:
        call_names[ident] = fn["name"]
        out["id"] = ident
    return out
