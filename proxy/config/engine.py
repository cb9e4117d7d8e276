"""``engine:``: the in-process vLLM engine's settings (``backend_provider: vllm`` without ``url``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from proxy.config.sections import Section

#: ``vllm serve`` options that make no sense in-process: the proxy listens, authenticates
#: and logs requests itself. Refused in ``engine.args`` with the reason.
PROXY_OWNED_SERVE_OPTIONS: dict[str, str] = {
    **dict.fromkeys(("host", "port", "uds", "root_path", "ssl_keyfile", "ssl_certfile",
                     "ssl_ca_certs", "ssl_cert_reqs", "ssl_ciphers", "enable_ssl_refresh",
                     "uvicorn_log_level", "disable_uvicorn_access_log", "allowed_origins",
                     "allow_credentials", "allowed_methods", "allowed_headers", "middleware",
                     "h11_max_incomplete_event_size", "h11_max_header_count"),
                    "the proxy serves HTTP itself (server:)"),
    "api_key": "inbound keys are the proxy's (auth:)",
    **dict.fromkeys(("headless", "api_server_count", "grpc_port", "config", "model_tag"),
                    "not used in-process"),
}


_SERVE_OPTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*\Z")


def _names(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


class EngineSection(Section):
    """vLLM engine and frontend settings for in-process mode (``backend_provider: vllm``
    without ``url``): what ``vllm serve`` takes as flags, under the flags' own names."""

    model: str = Field(min_length=1)
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = Field(None, gt=0)
    kv_cache_memory_bytes: int | None = Field(None, gt=0)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None
    seed: int = 0
    #: Names the engine answers to (``--served-model-name``); the first is the ``model`` of
    #: its answers. Default: the name the proxy sends upstream, else ``model``.
    served_model_name: Annotated[
        tuple[Annotated[str, Field(min_length=1)], ...], BeforeValidator(_names)] = ()
    #: A chat template: a file, or the Jinja text itself (``--chat-template``).
    chat_template: str | None = Field(None, min_length=1)
    tool_call_parser: str | None = Field(None, min_length=1)
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = Field(None, min_length=1)
    #: Any other ``vllm serve`` option by its long name (``enforce_eager``, ``max_num_seqs``,
    #: ``quantization``, ``structured_outputs_config``, ...); checked against vLLM's own
    #: argument parser when the engine starts, before it loads.
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _args_pass_through(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            name = key.replace("-", "_")
            if name in cls.model_fields:
                raise ValueError(f"{key} has its own key in engine:; set it there, not in args")
            if name in PROXY_OWNED_SERVE_OPTIONS:
                raise ValueError(f"{key}: {PROXY_OWNED_SERVE_OPTIONS[name]}")
            if not _SERVE_OPTION.match(name):
                raise ValueError(f"{key[:100]!r} is not a vllm serve option name")
        return value

    @model_validator(mode="after")
    def _auto_tools_need_a_parser(self) -> EngineSection:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (which format the "
                             "model writes tool calls in, e.g. hermes)")
        return self
