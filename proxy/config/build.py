"""Several models behind one proxy (``models:``), and :func:`build_config`, which validates a
plain mapping into whichever config it describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Tag,
    TypeAdapter,
    model_validator,
)

from proxy.config.base import BaseConfig
from proxy.config.providers import (
    CustomConfig,
    FxnConfig,
    MockConfig,
    ModelConfig,
    OllamaConfig,
    PluginConfig,
    VllmConfig,
    _provider_tag,
    adapter_entry_points,
)

#: Keys that belong to the whole proxy and are given only at the top level of ``models:``.
TOP_LEVEL_ONLY = ("server", "auth", "metrics", "logging", "watch", "limits", "models",
                  "plugins", "node")


#: Sections a ``models:`` entry takes from the top level when it does not give its own.
INHERITED = ("timeouts", "retries", "circuit", "limits", "plugins", "determinism", "balance")


#: Keys that describe one model, given in each ``models:`` entry instead of the top level.
PER_MODEL = ("backend_provider", "url", "routing", "fxn_id", "api_key", "api_key_header",
             "bearer_token", "model_name_alias", "model", "ollama", "engine", "fxn", "options")


class ModelSetConfig(BaseConfig):
    """Several models behind one proxy (``models:``): each entry is a whole single-model
    config (``backend_provider``, ``url``, ``model``, ...) without the proxy-wide sections
    (``server``, ``auth``, ``limits``, ``metrics``, ``logging``), which stay at the top level.
    An entry without its own ``timeouts``, ``retries`` or ``circuit`` uses the top level's.
    Requests are routed by their ``model`` to the entry whose ``model.name`` or alias it is.
    """

    backend_provider: Literal["models"] = "models"
    models: tuple[ModelConfig, ...]

    @model_validator(mode="before")
    @classmethod
    def _share_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        top = {_snake(k): k for k in data}
        for key in PER_MODEL:
            if key in top:
                raise ValueError(
                    f"{key} belongs in each entry of models: (not at the top level with it)"
                )
        entries = data.get(top.get("models", "models"))
        if not isinstance(entries, list | tuple):
            return data
        if not entries:
            raise ValueError("models must list at least one model")
        shared = {key: data[top[key]] for key in INHERITED if key in top}
        merged = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                merged.append(entry)
                continue
            keys = {_snake(k) for k in entry}
            for key in TOP_LEVEL_ONLY:
                if key in keys:
                    raise ValueError(
                        f"models[{i}].{key}: is set for the whole proxy, at the top level"
                    )
            merged.append({**{k: v for k, v in shared.items() if k not in keys}, **entry})
        return {**data, top.get("models", "models"): merged}

    @model_validator(mode="after")
    def _names_route(self) -> ModelSetConfig:
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.models):
            names = entry.model.names or ((entry.public_name,) if entry.public_name else ())
            if not names:
                raise ValueError(
                    f"models[{i}].model.name: is required: the name clients ask for"
                )
            for name in names:
                if name in seen:
                    raise ValueError(
                        f"models[{i}].model: {name!r} is already served by models[{seen[name]}]"
                    )
                seen[name] = i
        return self

    @property
    def entries(self) -> tuple[BaseConfig, ...]:
        return self.models


def _snake(key: Any) -> str:
    from pydantic.alias_generators import to_snake

    return to_snake(key) if isinstance(key, str) else str(key)


def _top_tag(value: Any) -> str:
    if isinstance(value, dict):
        return "models" if "models" in value else _provider_tag(value)
    return "models" if isinstance(value, ModelSetConfig) else _provider_tag(value)


ProxyConfig = Annotated[
    Annotated[MockConfig, Tag("mock")]
    | Annotated[CustomConfig, Tag("custom")]
    | Annotated[VllmConfig, Tag("vllm")]
    | Annotated[OllamaConfig, Tag("ollama")]
    | Annotated[FxnConfig, Tag("fxn")]
    | Annotated[PluginConfig, Tag("plugin")]
    | Annotated[ModelSetConfig, Tag("models")],
    Discriminator(_top_tag),
]


CONFIG_ADAPTER: TypeAdapter[ProxyConfig] = TypeAdapter(ProxyConfig)


VARIANTS: dict[str, type[BaseConfig]] = {
    "mock": MockConfig,
    "custom": CustomConfig,
    "vllm": VllmConfig,
    "ollama": OllamaConfig,
    "fxn": FxnConfig,
    "plugin": PluginConfig,
    "models": ModelSetConfig,
}


def build_config(
    data: dict[str, Any], *, entry_points: Mapping[str, str] | None = None
) -> ProxyConfig:
    """Validate a plain mapping (already interpolated) into a config; raises ValidationError.

    The validators read nothing but what they are given: the installed adapters' entry points
    (``entry_points``, looked up here unless given) come with the mapping.
    """
    if entry_points is None:
        entry_points = adapter_entry_points()
    return CONFIG_ADAPTER.validate_python(data, context={"entry_points": entry_points})
