"""What every model's config has, whatever its provider: ``BaseConfig``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from proxy.config.auth import AuthSection
from proxy.config.node import NodeSection
from proxy.config.sections import (
    _CONTROL,
    _TOKEN,
    BalanceSection,
    CircuitSection,
    DeterminismSection,
    LimitsSection,
    LoggingSection,
    MetricsSection,
    ModelSection,
    PassthroughSection,
    RetriesSection,
    Section,
    ServerSection,
    TimeoutsSection,
)

#: Config keys that hold secrets; each also has a ``<key>_file`` variant read by the loader.
SECRET_KEYS = ("api_key", "bearer_token", "private_key", "api_keys", "nonce_store")


def _check_url(url: str | None) -> str | None:
    if url is None:
        return None
    if _CONTROL.search(url) or " " in url:
        raise ValueError("must not contain spaces or control characters (a newline, CR, ...)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:11434"
        )
    if parts.path.rstrip("/").endswith("/v1"):
        raise ValueError("give the base URL without /v1; the proxy adds the path itself")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if parts.username is not None or parts.password is not None:
        # The URL is shown in messages and `check` output, and aiohttp refuses URL credentials
        # next to an Authorization header: credentials belong in the secret keys.
        raise ValueError(
            "must not carry credentials (user:password@); use api_key or bearer_token"
        )
    return url.rstrip("/")


def with_node_signatures(data: Any) -> Any:
    """``data`` with the (empty) ``auth.fxn_signatures`` section node mode checks signatures by,
    where a node config leaves it out: node mode always checks signatures on /v1/*. The model
    and the loader (which anchors the section's journal directory) both go by it."""
    if not isinstance(data, dict) or not isinstance(data.get("node"), dict):
        return data
    auth = data.get("auth", {})
    if not isinstance(auth, dict) or "fxn_signatures" in auth or "fxnSignatures" in auth:
        return data
    return {**data, "auth": {**auth, "fxn_signatures": {}}}


class BaseConfig(Section):
    backend_provider: str
    #: The upstream's base URL, or a list of them (the same model behind each; see ``routing``).
    url: str | tuple[str, ...] | None = None
    #: How requests spread over several ``url``s: in turn, to the one with fewest in flight, by
    #: the prompt's leading bytes, or by the conversation (``balance`` tunes the last two).
    routing: Literal["round_robin", "least_busy", "prefix", "session"] = "round_robin"
    fxn_id: str | None = Field(None, min_length=1)
    api_key: SecretStr | None = None
    #: Header that carries ``api_key`` upstream; the provider's default when unset.
    api_key_header: str | None = Field(None, min_length=1)
    bearer_token: SecretStr | None = None
    model_name_alias: str | None = Field(None, min_length=1)
    #: Reload when the file changes (SIGHUP always reloads).
    watch: bool = False
    #: Adapter classes registered under a provider name of the operator's choosing, after
    #: the built-ins and entry points (``model-proxy backends add`` writes them here).
    plugins: dict[str, str] = Field(default_factory=dict)
    server: ServerSection = ServerSection()
    model: ModelSection = ModelSection()
    determinism: DeterminismSection = DeterminismSection()
    timeouts: TimeoutsSection = TimeoutsSection()
    retries: RetriesSection = RetriesSection()
    limits: LimitsSection = LimitsSection()
    circuit: CircuitSection = CircuitSection()
    balance: BalanceSection = BalanceSection()
    auth: AuthSection = AuthSection()
    metrics: MetricsSection = MetricsSection()
    passthrough: PassthroughSection = PassthroughSection()
    logging: LoggingSection = LoggingSection()
    node: NodeSection | None = None

    #: The ``*_file`` secrets this config was read with (set by ``proxy.config.load``): a
    #: watching reload looks at them as at the config file, so that a rotated secret applies.
    _secret_files: tuple[str, ...] = PrivateAttr(default=())

    #: The header ``api_key`` travels in unless ``api_key_header`` says otherwise.
    default_api_key_header: ClassVar[str] = "x-api-key"
    #: Whether ``bearer_token`` is sent when ``api_key`` is too (the node sends one, not both).
    bearer_with_api_key: ClassVar[bool] = True

    @property
    def secret_files(self) -> tuple[str, ...]:
        """The paths of the ``*_file`` secrets the loader read into this config."""
        return self._secret_files

    @model_validator(mode="before")
    @classmethod
    def _node_verifies_signatures(cls, data: Any) -> Any:
        return with_node_signatures(data)

    @model_validator(mode="after")
    def _someone_may_sign(self) -> BaseConfig:
        signatures = self.auth.fxn_signatures
        if signatures is not None and not signatures.allowed_addresses and self.node is None:
            raise ValueError(
                "auth.fxn_signatures.allowed_addresses: is required (at least one address) "
                "unless node: is set"
            )
        return self

    @field_validator("plugins")
    @classmethod
    def _plugin_paths(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            module, _, attr = path.partition(":")
            if not (module and attr):
                raise ValueError(f"{name}: must be a module:Class path, not {path!r}")
        return value

    @field_validator("url")
    @classmethod
    def _url_is_base(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        if isinstance(value, tuple):
            if not value:
                raise ValueError("must name at least one URL")
            urls: list[str] = []
            for i, url in enumerate(value):
                try:
                    urls.append(str(_check_url(url)))
                except ValueError as exc:
                    raise ValueError(f"[{i}] {exc}") from None
            if len(set(urls)) < len(urls):
                raise ValueError("names the same URL twice")
            return urls[0] if len(urls) == 1 else tuple(urls)
        return _check_url(value)

    @field_validator("api_key", "bearer_token", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str):
            # A header value has no surrounding whitespace (RFC 9110 5.5), and an env var or
            # file often ends in a newline: strip it rather than send a broken header.
            value = value.strip()
        # `api_key: ${KEY:-}` with KEY unset means "no key", not "send an empty one"
        return None if value == "" else value

    @field_validator("api_key", "bearer_token")
    @classmethod
    def _header_value(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and _CONTROL.search(value.get_secret_value()):
            # never quote the secret
            raise ValueError("must not contain control characters (a newline, CR, tab, ...)")
        return value

    @field_validator("api_key_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is not None and not _TOKEN.fullmatch(value):
            raise ValueError("must be an HTTP header name: letters, digits and -, no spaces")
        return value

    @model_validator(mode="after")
    def _credentials_do_not_collide(self) -> BaseConfig:
        header = self.api_key_header_name.lower()
        if self.api_key and self.bearer_token and header == "authorization":
            raise ValueError(
                "api_key and bearer_token would both be sent as Authorization; "
                "keep one, or set api_key_header"
            )
        return self

    @property
    def urls(self) -> tuple[str, ...]:
        """Every upstream base URL (none for upstreams without one)."""
        url = self.url
        if url is None:
            return ()
        return (url,) if isinstance(url, str) else url

    def for_url(self, url: str) -> BaseConfig:
        """This config with ``url`` as its one upstream (what each upstream's adapter gets)."""
        return self.model_copy(update={"url": url})

    @property
    def entries(self) -> tuple[BaseConfig, ...]:
        """The served models: this config itself, or each entry of ``models:``."""
        return (self,)

    @property
    def api_key_header_name(self) -> str:
        return self.api_key_header or self.default_api_key_header

    @property
    def public_name(self) -> str | None:
        """The model id clients see, if the operator fixed one."""
        return self.model.name

    @property
    def upstream_name(self) -> str | None:
        """The model name sent upstream, if fixed; ``None`` passes the client's name on."""
        return self.model_name_alias or self.model.name

    def is_loopback(self) -> bool:
        host = self.server.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
