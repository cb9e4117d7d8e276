"""One config class per provider, and the registry of providers that the config and
``proxy.adapters`` both read: built-in names, entry points, ``module:Class`` paths.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    model_validator,
)

from proxy.config.base import BaseConfig
from proxy.config.engine import EngineSection
from proxy.config.node import FxnSection
from proxy.config.sections import OllamaSection
from proxy.errors import ConfigError

#: The built-in providers: name -> the adapter's ``module:Class``, imported only when chosen
#: (``proxy.adapters.load_adapter_class``), so optional heavy dependencies (vLLM) cost nothing
#: unless a config names them. ``vllm-engine`` is ``vllm`` without ``url``.
BUILTINS: dict[str, str] = {
    "mock": "proxy.adapters.mock:MockAdapter",
    "custom": "proxy.adapters.openai:OpenAIAdapter",
    "vllm": "proxy.adapters.openai:VllmServerAdapter",
    "vllm-engine": "proxy.adapters.vllm.engine:VllmEngineAdapter",
    "ollama": "proxy.adapters.ollama.adapter:OllamaAdapter",
    "fxn": "proxy.adapters.fxn:FxnAdapter",
}
#: The provider names a config may give for a built-in adapter.
BUILTIN_PROVIDERS = ("fxn", "custom", "vllm", "ollama", "mock")
#: Where installed packages register adapters of their own.
ENTRY_POINT_GROUP = "model_backend_proxy.adapters"
_SOURCES = {"built-in": "built-in", "entry point": "entry point", "yaml": "plugins: entry"}


class _NeedsUrl(BaseConfig):
    @model_validator(mode="after")
    def _url_required(self) -> _NeedsUrl:
        if self.url is None:
            raise ValueError(f"url is required for backend_provider {self.backend_provider}")
        return self


class MockConfig(BaseConfig):
    backend_provider: Literal["mock"]


class CustomConfig(_NeedsUrl):
    backend_provider: Literal["custom"]


class OllamaConfig(_NeedsUrl):
    backend_provider: Literal["ollama"]
    ollama: OllamaSection = OllamaSection()
    default_api_key_header: ClassVar[str] = "Authorization"


class FxnConfig(_NeedsUrl):
    backend_provider: Literal["fxn"]
    fxn_id: str = Field(min_length=1)
    fxn: FxnSection = FxnSection()

    #: The node sends ``x-api-key`` when it has an api key, else ``Authorization: Bearer``.
    bearer_with_api_key: ClassVar[bool] = False

    @property
    def upstream_name(self) -> str:
        # As the node: model_name_alias replaces the model; without it the network's id goes.
        return self.model_name_alias or self.fxn_id

    @property
    def public_name(self) -> str:
        return self.model.name or self.fxn_id


class VllmConfig(BaseConfig):
    backend_provider: Literal["vllm"]
    engine: EngineSection | None = None
    default_api_key_header: ClassVar[str] = "Authorization"

    @model_validator(mode="before")
    @classmethod
    def _prefix_over_several_urls(cls, data: Any) -> Any:
        # Several vLLM servers: unless told otherwise, a prompt goes where its prefix is
        # cached (docs/routing.md: measured against round_robin on real vllm serve replicas).
        if (isinstance(data, dict) and "routing" not in data
                and isinstance(data.get("url"), list | tuple) and len(data["url"]) > 1):
            return {**data, "routing": "prefix"}
        return data

    @model_validator(mode="after")
    def _url_or_engine(self) -> VllmConfig:
        if self.url is None and self.engine is None:
            raise ValueError(
                "backend_provider vllm needs url (a vLLM server) or an engine section "
                "with engine.model (in-process)"
            )
        if self.url is not None and self.engine is not None:
            raise ValueError("engine is only used without url (in-process mode); remove one")
        return self


class PluginConfig(BaseConfig):
    """A third-party adapter: an entry-point name or a ``module:Class`` path."""

    #: The adapter's own settings, handed to it as they are.
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_provider(self, info: ValidationInfo) -> PluginConfig:
        # the installed entry points come with the validation (build_config looks them up)
        entry_points: Mapping[str, str] = (info.context or {}).get("entry_points", {})
        value = self.backend_provider
        if ":" in value or value in entry_points or value in self.plugins:
            return self
        from difflib import get_close_matches

        known = [*BUILTIN_PROVIDERS, *entry_points, *self.plugins]
        close = get_close_matches(value, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"backend_provider: unknown provider {value!r}{hint}; expected one of "
            f"{', '.join(known)} or a module:Class path"
        )


def adapter_entry_points() -> dict[str, str]:
    """The adapters installed packages register: name -> ``module:Class``."""
    import importlib.metadata  # here: reading every package's metadata is for plugins only

    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in eps}


class InstalledEntryPoints(Mapping[str, str]):
    """:func:`adapter_entry_points`, looked up the first time it is read: a config naming a
    built-in provider never reads it, so the installed packages' metadata is not scanned (nor
    ``importlib.metadata`` imported) for it."""

    def __init__(self) -> None:
        self._found: dict[str, str] | None = None

    def _eps(self) -> dict[str, str]:
        if self._found is None:
            self._found = adapter_entry_points()
        return self._found

    def __getitem__(self, name: str) -> str:
        return self._eps()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._eps())

    def __len__(self) -> int:
        return len(self._eps())


@dataclass(frozen=True, slots=True)
class Registered:
    """One provider name the registry knows, and where it came from."""

    name: str
    path: str
    source: Literal["built-in", "entry point", "yaml"]


def registry(plugins: Mapping[str, str] | None = None) -> dict[str, Registered]:
    """Every provider name: built-ins, then entry points, then the YAML's ``plugins:``.

    A name registered twice is an error (``ConfigError``), never a silent override.
    """
    known = {name: Registered(name, path, "built-in") for name, path in BUILTINS.items()}
    later = [(name, path, "entry point") for name, path in adapter_entry_points().items()]
    later += [(name, path, "yaml") for name, path in (plugins or {}).items()]
    for name, path, source in later:
        if name in known:
            first = known[name]
            raise ConfigError([
                f"backend_provider: {_SOURCES[source]} {name!r} ({path}) clashes with the "
                f"{_SOURCES[first.source]} of that name ({first.path}); rename one"
            ])
        known[name] = Registered(name, path, source)  # type: ignore[arg-type]
    return known


def adapter_path(config: BaseConfig) -> str:
    """The ``module:Class`` that serves ``config``."""
    provider = config.backend_provider
    if provider == "vllm" and config.url is None:
        return BUILTINS["vllm-engine"]
    if provider in BUILTINS and not config.plugins:
        return BUILTINS[provider]  # the usual case: no entry points need reading
    known = registry(config.plugins)
    return known[provider].path if provider in known else provider


def _provider_tag(value: Any) -> str:
    if isinstance(value, dict):
        provider = value.get("backend_provider", value.get("backendProvider"))
    else:
        provider = getattr(value, "backend_provider", None)
    return provider if provider in BUILTIN_PROVIDERS else "plugin"


#: One model's config: the single-model file, or one entry of ``models:``.
ModelConfig = Annotated[
    Annotated[MockConfig, Tag("mock")]
    | Annotated[CustomConfig, Tag("custom")]
    | Annotated[VllmConfig, Tag("vllm")]
    | Annotated[OllamaConfig, Tag("ollama")]
    | Annotated[FxnConfig, Tag("fxn")]
    | Annotated[PluginConfig, Tag("plugin")],
    Discriminator(_provider_tag),
]
