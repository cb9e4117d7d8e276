"""The sections every config may have: server, model, timeouts, retries, circuit, limits,
passthrough, metrics, logging, determinism, Ollama's options; and the base of them all.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)
from pydantic.alias_generators import to_camel

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NOT_SECONDS = ("must be seconds (a number) or a duration such as 30s, 5m, 1h or 1h30m "
                "(units: ms, s, m, h)")


def _seconds(value: Any) -> Any:
    """A duration as seconds: ``30s``, ``5m``, ``1h``, ``1h30m``, ``250ms``; a bare number is
    seconds already. What is neither is refused with the units it may have."""
    if isinstance(value, bool):  # YAML's yes/no/on/off: not a length of time
        raise ValueError(_NOT_SECONDS)
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text.replace(" ", ""))
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(_NOT_SECONDS)
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


#: Seconds, given as a number or a duration (``30s``, ``5m``, ``1h``): every timeout-like field.
Seconds = Annotated[float, BeforeValidator(_seconds), Field(ge=0)]
PositiveSeconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0)]


_API_KEY = re.compile(r"[\x21-\x7e]{1,512}")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


_PLAIN_PATH = re.compile(r"(/(?!\.\.?(/|$))[A-Za-z0-9._~!$&'()*+,;=:@-]+)+/?")


class Section(BaseModel):
    model_config = ConfigDict(
        # built when first used: a file is validated through build_config's union, which holds
        # its own copy of every schema, so building each class on its own too cost 0.75 MB
        defer_build=True,
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
    shutdown_grace: Seconds = 30.0
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
    backoff_initial: Seconds = 0.2
    backoff_max: Seconds = 5.0
    #: Budget for all attempts of one request, waits included.
    total: PositiveSeconds = 60.0
    #: Longest ``Retry-After`` the proxy honours before giving up instead.
    retry_after_cap: Seconds = 10.0


class CircuitSection(Section):
    """The circuit breaker in front of the upstream.

    A failed attempt is an upstream error (refused, reset, timeout) or a 502/503/504 answer;
    any other answer counts as a success and resets the count.
    """

    #: Consecutive failed attempts that open the circuit; 0 turns the breaker off.
    failures: int = Field(default=5, ge=0)
    #: Seconds an open circuit answers 503 at once before it lets one probe request through.
    cooldown: PositiveSeconds = 10.0


class BalanceSection(Section):
    """How a model's several ``url``s are told apart (``routing``): what the proxy reads from
    each of them, and the rule that keeps affinity from piling work on one."""

    #: Seconds between two reads of each URL's load (vLLM's ``/metrics``, Ollama's ``/api/ps``).
    interval: PositiveSeconds = 0.25
    #: Seconds one read may take before it counts as unreadable.
    timeout: PositiveSeconds = 1.0
    #: Largest answer read from ``/metrics`` or ``/v1/models``; a longer one is unreadable.
    max_bytes: int = Field(default=4 << 20, ge=1024)
    #: Seconds between two reads of each URL's ``/v1/models`` (which models and LoRA adapters
    #: it serves).
    models_interval: PositiveSeconds = 10.0
    #: Bounded loads: a URL above ``(1 + epsilon)`` times the mean load passes a request on.
    epsilon: float = Field(default=0.25, gt=0, le=10)
    #: ...but never below this many requests: a few in flight are no load worth moving a
    #: prefix from its cache for (and a replica's reading a moment older than another's
    #: would move it).
    min_bound: int = Field(default=4, ge=1)
    #: A URL whose own queue (``vllm:num_requests_waiting``) is over this passes a request on.
    max_waiting: int = Field(default=8, ge=0)
    #: ``routing: prefix`` hashes this many leading bytes of the prompt.
    prefix_bytes: int = Field(default=2048, ge=16, le=1 << 20)
    #: ``routing: session`` reads the conversation's id from this header (else ``user``).
    session_header: str = Field(default="X-Session-ID", min_length=1)

    @field_validator("session_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _TOKEN.fullmatch(value):
            raise ValueError("must be an HTTP header name: letters, digits and -, no spaces")
        return value


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


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The limits every request is checked against (``limits:`` and ``server.body_timeout``),
    copied out of the config once: a pydantic model's attribute reads cost about ten times a
    slot's (its ``__getattr__`` hook), and each request reads these."""

    max_body_bytes: int
    max_header_bytes: int
    max_json_depth: int
    max_messages: int
    body_timeout: float

    @classmethod
    def of(cls, limits: LimitsSection, server: ServerSection) -> RequestLimits:
        return cls(limits.max_body_bytes, limits.max_header_bytes, limits.max_json_depth,
                   limits.max_messages, server.body_timeout)


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
