"""The shape of ``model_backend.yaml``: frozen pydantic models, one variant per provider.

Every key is accepted in snake_case and camelCase (Function Network's node has used both).
Sections are optional and default to what a node operator would pick; unknown keys are
errors. ``proxy.configfile`` turns a file into a :data:`ProxyConfig` and its problems into
one line each.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import ipaddress
import os
import re
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

BUILTIN_PROVIDERS = ("fxn", "custom", "vllm", "ollama", "mock")
ENTRY_POINT_GROUP = "model_backend_proxy.adapters"
#: Config keys that hold secrets; each also has a ``<key>_file`` variant read by the loader.
SECRET_KEYS = ("api_key", "bearer_token", "private_key", "api_keys", "nonce_store")

PositiveSeconds = Annotated[float, Field(gt=0)]
_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]{40}")
_API_KEY = re.compile(r"[\x21-\x7e]{1,512}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PLAIN_PATH = re.compile(r"(/(?!\.\.?(/|$))[A-Za-z0-9._~!$&'()*+,;=:@-]+)+/?")


class Section(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
    )


class ServerSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Seconds in-flight requests get to finish after SIGTERM before they are ended.
    shutdown_grace: float = Field(30.0, ge=0)
    #: Seconds a connection may wait for its next request head, idle or trickling one in: after
    #: it opened, and after each answer. Bounds both idle keep-alive and slow headers.
    keepalive_timeout: PositiveSeconds = 15.0
    #: Seconds a client has to send a request body once its headers are in.
    body_timeout: PositiveSeconds = 30.0
    #: Client connections open at once; over it idle keep-alive connections are closed first,
    #: then new connections refused. Lowered at start to what the open-file limit allows.
    max_connections: int = Field(10_000, ge=1)


class ModelSection(Section):
    """The public face of the served model.

    With ``name`` set, only ``name`` and ``aliases`` are served (anything else is 404) and
    ``/v1/models`` lists ``name``; without it, any model a client names is passed on.
    """

    name: str | None = Field(None, min_length=1)
    aliases: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    context_length: int | None = Field(None, gt=0)
    #: Most tokens one answer may have (``max_output_length`` in the catalog).
    max_output_length: int | None = Field(None, gt=0)
    supported_features: tuple[str, ...] = ()
    #: Prices shown in the catalog, as OpenRouter writes them (USD per token, as strings).
    pricing: PricingSection | None = None
    #: From this day on the model leaves ``/v1/models``; it is served until removed.
    deprecation_date: datetime.date | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The public name and its aliases (empty when no name is fixed)."""
        return (self.name, *self.aliases) if self.name is not None else ()


class PricingSection(Section):
    """OpenRouter's ``pricing`` object; numbers are written out as strings."""

    prompt: str | None = None
    completion: str | None = None
    request: str | None = None
    image: str | None = None

    @field_validator("prompt", "completion", "request", "image", mode="before")
    @classmethod
    def _price(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a price (a number), not a boolean")
        if isinstance(value, int | float):
            value = format(Decimal(repr(value)), "f")  # 2e-07 -> 0.0000002, exactly
        if isinstance(value, str):
            try:
                if float(value) < 0:
                    raise ValueError("must not be negative")
            except ValueError as exc:
                raise ValueError(str(exc) if "negative" in str(exc) else
                                 "must be a number (USD per token)") from None
        return value


ModelSection.model_rebuild()


class DeterminismSection(Section):
    """Answers a quorum can compare: with ``enforce``, every request is sent with
    temperature 0, top_p 1, top_k off (where the backend has it) and ``seed``, whatever the
    client asked; each answer carries the SHA-256 of its text (``X-Output-SHA256``)."""

    enforce: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)


class TimeoutsSection(Section):
    connect: PositiveSeconds = 5.0
    first_byte: PositiveSeconds = 120.0
    #: Longest silence allowed between two chunks of a streamed answer.
    idle: PositiveSeconds = 60.0
    total: PositiveSeconds = 900.0


class RetriesSection(Section):
    """Retries of upstream errors and 429/502/503/504 answers, before the client sees a byte."""

    #: Attempts in all, the first included; 1 turns retries off.
    attempts: int = Field(3, ge=1, le=20)
    #: Backoff window before the first retry; it doubles each retry (full jitter), up to the max.
    backoff_initial: float = Field(0.2, ge=0)
    backoff_max: float = Field(5.0, ge=0)
    #: Budget for all attempts of one request, waits included.
    total: PositiveSeconds = 60.0
    #: Longest ``Retry-After`` the proxy honours before giving up instead.
    retry_after_cap: float = Field(10.0, ge=0)


class CircuitSection(Section):
    """The circuit breaker in front of the upstream.

    A failed attempt is an upstream error (refused, reset, timeout) or a 502/503/504 answer;
    any other answer counts as a success and resets the count.
    """

    #: Consecutive failed attempts that open the circuit; 0 turns the breaker off.
    failures: int = Field(default=5, ge=0)
    #: Seconds an open circuit answers 503 at once before it lets one probe request through.
    cooldown: PositiveSeconds = 10.0


class LimitsSection(Section):
    #: Upstream requests in flight at once; more wait in a queue of ``max_queue``, then 429.
    max_concurrency: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=0)
    #: Longest wait in the queue before the request is answered 429.
    queue_timeout: PositiveSeconds = 30.0
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(64, ge=2)
    max_messages: int = Field(4096, ge=1)
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    #: Largest non-streamed upstream answer the proxy holds in memory; over it, 502.
    max_response_bytes: int = Field(16 * 1024 * 1024, ge=1024)


def _address_text(value: Any) -> Any:
    """Refuse an address YAML has read as a number, saying why (validators run it first)."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            "write the address in quotes ('0x...'): unquoted, YAML reads 0x... as a number"
        )
    if isinstance(value, str) and not _ADDRESS.fullmatch(value):
        raise ValueError("must be 0x followed by 40 hex digits")
    return value


class FxnSignaturesSection(Section):
    """Inbound Function Network request signatures (``proxy.auth.signing``)."""

    #: Addresses of the gateways/schedulers whose signed requests are accepted (any case).
    #: Required unless ``node:`` is set (then the scheduler, and the chain's gateways, are
    #: allowed besides these).
    allowed_addresses: tuple[str, ...] = ()
    #: Accepted clock difference, in seconds, between the signer and this node; 0 checks no
    #: timestamp at all (the reference node's behaviour; the nonce cache alone stops replays).
    window: float = Field(300.0, ge=0)
    #: Most nonces remembered at once; when full, the accepted window narrows (no replays).
    #: For the ``memory`` store only.
    nonce_cache_size: int = Field(100_000, ge=1)
    #: Where used nonces are remembered: ``memory`` (this process, the default) or a Redis URL
    #: (``redis://``, ``rediss://``, ``unix://``) that every replica shares, so a signed job
    #: replayed to another replica is refused too (``proxy.auth.shared_nonces``). The URL may
    #: hold a password, so it is kept as a secret (``nonce_store_file`` reads it from a file).
    #: ``None`` means ``memory``.
    nonce_store: SecretStr | None = None

    @field_validator("nonce_store", mode="before")
    @classmethod
    def _memory_is_default(cls, value: Any) -> Any:
        return None if value == "memory" else value

    @field_validator("nonce_store")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = value.get_secret_value().partition("://")[0].lower()
            if scheme not in ("redis", "rediss", "unix"):  # the message never quotes the URL
                raise ValueError("must be memory or a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("allowed_addresses", mode="before")
    @classmethod
    def _addresses(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            for i, address in enumerate(value):
                try:
                    _address_text(address)
                except ValueError as exc:
                    raise ValueError(f"[{i}] {exc}") from None
        return value

    @property
    def window_seconds(self) -> float:
        """The window as the verifier takes it: ``math.inf`` for ``window: 0``."""
        return self.window or float("inf")


class AuthSection(Section):
    mode: Literal["any", "all"] = "any"
    api_keys: tuple[SecretStr, ...] = ()
    fxn_signatures: FxnSignaturesSection | None = None
    allow_unauthenticated: bool = False

    @field_validator("api_keys")
    @classmethod
    def _header_safe(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for i, key in enumerate(value):  # the message names the position, never the key
            if not _API_KEY.fullmatch(key.get_secret_value()):
                raise ValueError(
                    f"[{i}] must be 1 to 512 printable ASCII characters without spaces"
                )
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or self.fxn_signatures is not None


class PassthroughSection(Section):
    """Forwarding of ``/v1/*`` paths the proxy has no route for (adapters that allow it)."""

    enabled: bool = True
    #: Path prefixes that may be forwarded, each under ``/v1/``; empty: every ``/v1/`` path.
    prefixes: tuple[str, ...] = ()

    @field_validator("prefixes")
    @classmethod
    def _under_v1(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, prefix in enumerate(value):
            if not prefix.startswith("/v1/") or not _PLAIN_PATH.fullmatch(prefix):
                raise ValueError(
                    f"[{i}] must be a path under /v1/ without dot segments, %, ? or #"
                )
        return value


class MetricsSection(Section):
    enabled: bool = True


class LoggingSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: ``auto``: text when stderr is a terminal, JSON lines otherwise (``proxy.server.logs``).
    format: Literal["auto", "text", "json"] = "auto"
    access_log: bool = True
    #: Put the request body (the prompt) and the answer, up to 64 KiB each, in JSON access
    #: lines. Off by default: prompts and answers are the network's users' data.
    include_bodies: bool = False


#: A Go duration, as Ollama parses ``keep_alive`` strings (``time.ParseDuration``).
_GO_DURATION = re.compile(r"[-+]?(0|((\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h))+)")


class OllamaSection(Section):
    #: Ollama model options (``num_ctx``, …) sent with every request under the request's own.
    options: dict[str, Any] = Field(default_factory=dict)
    #: Seconds (a number) or a Go duration (``"10m"``, ``"1h30m"``); negative: stay loaded.
    keep_alive: str | int | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: str | int | None) -> str | int | None:
        # Ollama refuses a bare number in a string ("30": no unit) on every request, so it is
        # settled here: seconds, as a bare number means; anything else must parse as Ollama
        # parses it.
        if not isinstance(value, str):
            return value
        text = value.strip()
        if re.fullmatch(r"[-+]?\d+", text):
            return int(text)
        if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)", text):
            return f"{text}s"
        if not _GO_DURATION.fullmatch(text):
            raise ValueError(
                f"{value!r} is not a duration: give seconds (300) or a duration such as "
                '"5m" or "1h30m" (negative keeps the model loaded)'
            )
        return text


class FxnSection(Section):
    #: Key that signs outbound requests to the Function Network: 64 hex digits, or (through
    #: ``private_key_file``) a file with them or a ``model-proxy keygen`` / node key JSON.
    private_key: SecretStr | None = None

    @field_validator("private_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from proxy.auth.signing import Signer  # eth-account loads only for fxn configs

            Signer.from_text(value.get_secret_value())  # its errors never quote the key
        return value


class ChainSection(Section):
    """Where node mode reads the network's gateways: JSON-RPC ``eth_call`` on the Router."""

    rpc_url: str
    router_address: str
    #: Seconds between two reads of the gateway registry; the last good list stays meanwhile.
    refresh: PositiveSeconds = 60.0
    #: Seconds one JSON-RPC call may take.
    timeout: PositiveSeconds = 10.0

    @field_validator("rpc_url")
    @classmethod
    def _rpc_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// JSON-RPC URL")
        return value

    @field_validator("router_address", mode="before")
    @classmethod
    def _router(cls, value: Any) -> Any:
        return _address_text(value)


class NodeSection(Section):
    """Node mode: answer the Function Network as its node does (``proxy.node``).

    Serves ``POST /challenge`` (scheduler-signed) and ``GET /health``, and accepts signed
    ``/v1/*`` requests from the scheduler and from the gateways the chain lists (besides any
    ``auth.fxn_signatures.allowed_addresses``).
    """

    #: The node's identity: a key file in ``nodekey.json`` layout (``model-proxy keygen``).
    key_file: str = Field(min_length=1)
    scheduler_address: str
    #: Without it only the scheduler and ``auth.fxn_signatures.allowed_addresses`` are trusted.
    chain: ChainSection | None = None
    #: The public IP that IDENTITY reports: an address, or an http(s) URL answering it as text
    #: (behind NAT the node cannot see it itself). The reference node asks api.ipify.org.
    public_ip: str = "https://api.ipify.org"
    #: Largest matrix dimension MATRIX_MULTIPLICATION accepts; larger is a 400.
    max_matrix_size: int = Field(4096, ge=1, le=16384)
    #: Most elements in each of A, B and the product (2048 x 2048); more is a 400.
    max_matrix_elements: int = Field(2048 * 2048, ge=1, le=16384 * 16384)
    #: Most flops (2 x rows x inner x columns) one multiplication may take (2 x 2048^3, about
    #: a second on two CPU cores); more is a 400. Raise both on a node with a GPU.
    max_matrix_flops: int = Field(2 * 2048**3, ge=1, le=2 * 16384**3)

    @field_validator("scheduler_address", mode="before")
    @classmethod
    def _scheduler(cls, value: Any) -> Any:
        return _address_text(value)

    @field_validator("public_ip")
    @classmethod
    def _public_ip(cls, value: str) -> str:
        if value.startswith(("http://", "https://")):
            if not urlsplit(value).hostname:
                raise ValueError("the URL has no host")
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                "must be an IP address or an http(s):// URL that answers one"
            ) from None
        return value

    @field_validator("key_file")
    @classmethod
    def _usable_key(cls, value: str) -> str:
        from proxy.auth.signing import Signer  # eth-account loads only for node configs

        Signer.from_file(value)  # names the file, never quotes the key
        return value


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

    @field_validator("chat_template")
    @classmethod
    def _template_or_file(cls, value: str | None) -> str | None:
        if value is not None and not any(mark in value for mark in ("{{", "{%", "\n")):
            from pathlib import Path

            if not Path(value).is_file():
                raise ValueError(f"no such file {value[:200]!r} (give a template file or "
                                 "the template text itself)")
        return value

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


class BaseConfig(Section):
    backend_provider: str
    #: The upstream's base URL, or a list of them (the same model behind each; see ``routing``).
    url: str | tuple[str, ...] | None = None
    #: How requests spread over several ``url``s: in turn, or to the one with fewest in flight.
    routing: Literal["round_robin", "least_busy"] = "round_robin"
    #: The HTTP client that talks to ``url``: the lean HTTP/1.1 pool (``proxy.adapters.lean``),
    #: or aiohttp's ``ClientSession`` (the fallback). A config that names none takes
    #: ``$MODEL_PROXY_UPSTREAM_CLIENT``, else ``lean``.
    upstream_client: Literal["aiohttp", "lean"] = Field(
        default_factory=lambda: os.environ.get("MODEL_PROXY_UPSTREAM_CLIENT", "lean"),
        validate_default=True,
    )
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
    auth: AuthSection = AuthSection()
    metrics: MetricsSection = MetricsSection()
    passthrough: PassthroughSection = PassthroughSection()
    logging: LoggingSection = LoggingSection()
    node: NodeSection | None = None

    #: The header ``api_key`` travels in unless ``api_key_header`` says otherwise.
    default_api_key_header: ClassVar[str] = "x-api-key"
    #: Whether ``bearer_token`` is sent when ``api_key`` is too (the node sends one, not both).
    bearer_with_api_key: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _node_verifies_signatures(cls, data: Any) -> Any:
        # Node mode always checks signatures on /v1/*; its section may be left out.
        if not isinstance(data, dict) or not isinstance(data.get("node"), dict):
            return data
        auth = data.get("auth", {})
        if not isinstance(auth, dict) or "fxn_signatures" in auth or "fxnSignatures" in auth:
            return data
        return {**data, "auth": {**auth, "fxn_signatures": {}}}

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
    def _known_provider(self) -> PluginConfig:
        value = self.backend_provider
        if ":" in value or value in adapter_entry_points() or value in self.plugins:
            return self
        from difflib import get_close_matches

        known = [*BUILTIN_PROVIDERS, *adapter_entry_points(), *self.plugins]
        close = get_close_matches(value, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"backend_provider: unknown provider {value!r}{hint}; expected one of "
            f"{', '.join(known)} or a module:Class path"
        )


def adapter_entry_points() -> dict[str, str]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in eps}


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

#: Keys that belong to the whole proxy and are given only at the top level of ``models:``.
TOP_LEVEL_ONLY = ("server", "auth", "metrics", "logging", "watch", "limits", "models",
                  "plugins", "node")
#: Sections a ``models:`` entry takes from the top level when it does not give its own.
INHERITED = ("timeouts", "retries", "circuit", "limits", "plugins", "determinism",
             "upstream_client")
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


def build_config(data: dict[str, Any]) -> ProxyConfig:
    """Validate a plain mapping (already interpolated) into a config; raises ValidationError."""
    return CONFIG_ADAPTER.validate_python(data)
