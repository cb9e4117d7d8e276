"""An example backend adapter: answers every chat completion with the last user message.

Installed (``pip install -e examples/plugin``), it registers the provider ``echo`` through the
``model_backend_proxy.adapters`` entry point, so a config can say ``backend_provider: echo``.
``options.prefix`` (the plugin's own settings) is put before each answer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from proxy.adapters.base import Adapter, Job, UpstreamResponse
from proxy.config import PluginConfig
from proxy.errors import BadRequest
from proxy.wire import answers


class EchoAdapter(Adapter):
    """Answers with the last user message, whole or one word per chunk."""

    name = "echo"

    def __init__(self, config: Any, session: Any) -> None:
        super().__init__(config, session)
        options = config.options if isinstance(config, PluginConfig) else {}
        self.prefix = str(options.get("prefix", ""))

    async def send(self, job: Job) -> UpstreamResponse:
        if job.endpoint != "chat" or job.payload is None:
            raise BadRequest("the echo backend answers chat completions only")
        text = self.prefix + _last_user_text(job.payload.get("messages") or [])
        model = job.model or "echo"
        words = text.split(" ")
        counts = answers.usage(len(words), len(words))
        if not job.stream:
            message = {"role": "assistant", "content": text}
            return UpstreamResponse.from_json(answers.completion(
                "chat", answers.new_id("chat"), int(time.time()), model,
                [answers.chat_choice(message, "stop")], counts))
        chunks = answers.Chunks("chat", answers.new_id("chat"), int(time.time()), model)

        async def events() -> AsyncIterator[bytes]:
            for i, word in enumerate(words):
                yield chunks.content({"content": word if i == 0 else " " + word})
            yield chunks.finish("stop")
            yield answers.DONE

        return UpstreamResponse.from_sse(events())

    async def models(self) -> list[dict[str, Any]]:
        return [{"id": "echo", "object": "model", "created": 0, "owned_by": "example"}]


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""
