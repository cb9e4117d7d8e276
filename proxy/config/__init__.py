"""``model_backend.yaml``: its shape, and reading it.

The shape is frozen pydantic models, one variant per provider (:mod:`.providers`), built on
:mod:`.base` and the sections of :mod:`.sections`, :mod:`.auth`, :mod:`.node` and
:mod:`.engine`; several models make a :mod:`.build` ``ModelSetConfig``. Every key is accepted
in snake_case and camelCase (Function Network's node has used both); sections are optional
and default to what a node operator would pick; unknown keys are errors. Validators are pure
functions of what they are given: reading the file, the environment, ``*_file`` secrets and
the installed entry points is :mod:`.load`'s one step before validation, and
:mod:`.describe` turns what pydantic found into one line per problem.
"""

from proxy.config.auth import AuthSection, FxnSignaturesSection
from proxy.config.base import SECRET_KEYS, BaseConfig
from proxy.config.build import (
    INHERITED,
    PER_MODEL,
    TOP_LEVEL_ONLY,
    VARIANTS,
    ModelSetConfig,
    ProxyConfig,
    build_config,
)
from proxy.config.engine import PROXY_OWNED_SERVE_OPTIONS, EngineSection
from proxy.config.load import default_path, load_config, read_bounded
from proxy.config.node import ChainSection, FxnSection, NodeSection
from proxy.config.providers import (
    BUILTIN_PROVIDERS,
    ENTRY_POINT_GROUP,
    CustomConfig,
    FxnConfig,
    MockConfig,
    ModelConfig,
    OllamaConfig,
    PluginConfig,
    VllmConfig,
    adapter_entry_points,
)
from proxy.config.sections import (
    BalanceSection,
    CircuitSection,
    DeterminismSection,
    LimitsSection,
    LoggingSection,
    MetricsSection,
    ModelSection,
    OllamaSection,
    PassthroughSection,
    PricingSection,
    RequestLimits,
    RetriesSection,
    Section,
    ServerSection,
    TimeoutsSection,
)
from proxy.config.yamlfile import parse_yaml

__all__ = [
    "BUILTIN_PROVIDERS", "ENTRY_POINT_GROUP", "INHERITED", "PER_MODEL",
    "PROXY_OWNED_SERVE_OPTIONS", "SECRET_KEYS", "TOP_LEVEL_ONLY", "VARIANTS", "AuthSection",
    "BalanceSection", "BaseConfig", "ChainSection", "CircuitSection", "CustomConfig",
    "DeterminismSection", "EngineSection", "FxnConfig", "FxnSection", "FxnSignaturesSection",
    "LimitsSection", "LoggingSection", "MetricsSection", "MockConfig", "ModelConfig",
    "ModelSection", "ModelSetConfig", "NodeSection", "OllamaConfig", "OllamaSection",
    "PassthroughSection", "PluginConfig", "PricingSection", "ProxyConfig", "RequestLimits",
    "RetriesSection", "Section", "ServerSection", "TimeoutsSection", "VllmConfig",
    "adapter_entry_points", "build_config", "default_path", "load_config", "parse_yaml",
    "read_bounded",
]
