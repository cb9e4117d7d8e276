"""The seam between the proxy and an upstream: one job in, one lazily read response out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import orjson

if TYPE_CHECKING:
    import aiohttp

    from proxy.config import BaseConfig
    from proxy.wire.relayed import Relayed

Endpoint = Literal["chat", "completions", "embeddings", "passthrough"]

#: The sampling parameters of OpenAI's API, which OpenAI-compatible upstreams pass on.
OPENAI_SAMPLING = ("temperature", "top_p", "max_tokens", "stop", "seed", "frequency_penalty",
                   "presence_penalty", "logit_bias", "logprobs", "top_logprobs")
#: ...and those vLLM adds.
VLLM_SAMPLING = (*OPENAI_SAMPLING, "top_k", "min_p", "repetition_penalty")

JSON_HEADERS: Mapping[str, str] = {"Content-Type": "application/json"}
SSE_HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
}


@dataclass(slots=True, kw_only=True)
class Job:
    """One inbound request, authenticated and resolved, ready for an upstream; built once by
    the route, read (never written) by adapters.

    ``body`` is the exact bytes to send for OpenAI-compatible upstreams (``model`` already
    rewritten); ``payload`` is the parsed JSON object (``None`` for pass-through requests that
    carry no JSON). ``model`` is the public name the client asked for, ``upstream_model`` the
    name the upstream knows. ``headers`` is already the allow-listed set of client headers
    that may travel upstream (``proxy.headers.request_headers``, applied where the job is
    built): an adapter can forward it as it is and never leaks the client's credentials.
    ``request_id`` is the request's id (the client's ``X-Request-ID`` when it is fit for logs,
    else one the proxy made; also in ``headers``). ``usage_asked``: the proxy asked the
    upstream for the stream's usage event on its own behalf (``stream_options.include_usage``),
    so the event is read and not relayed. ``session``: the client's session header, kept
for the router when a model routes by session.

    What the request learns on the way (timings, attempts, usage) is not here but on its
    :class:`proxy.upstream.exchange.Exchange`.
    """

    endpoint: Endpoint
    method: str
    path: str
    query: str = ""
    body: bytes
    payload: dict[str, Any] | None = None
    model: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    headers: Mapping[str, str]
    request_id: str
    usage_asked: bool = False
    #: The conversation's id from the configured session header, for ``routing: session``
    #: over several URLs (read by the router, never sent upstream by this field).
    session: str | None = None


@dataclass(slots=True)
class Usage:
    """What an answer cost, filled in by the adapter as the body is produced (for metrics).

    Counts are checked ones (``proxy.wire.tokens``); ``invalid``: the upstream reported a count
    that was not one, and it is left out."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    extra: dict[str, float] = field(default_factory=dict)
    invalid: bool = False


class UpstreamResponse:
    """An upstream answer whose body is produced lazily.

    ``chunks()`` yields body bytes as they arrive and may raise a ``ProxyError`` part-way
    (the relay turns that into a final SSE error event once bytes have been sent).
    ``release()`` frees the upstream connection or engine request; it is idempotent and the
    relay always calls it, also when the client has gone.
    """

    __slots__ = ("_chunks", "_release", "_usage", "body", "counted", "headers", "status",
                 "stream")

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        chunks: AsyncIterator[bytes] | None = None,
        *,
        stream: bool,
        release: Callable[[], Awaitable[None] | None] | None = None,
        body: bytes | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.stream = stream
        self._usage: Usage | None = None
        #: The whole body, when it is known (given, or read by :meth:`buffer`).
        self.body = body
        self._chunks = chunks
        self._release = release
        #: For a relayed OpenAI-compatible answer: what it reported, read on the way.
        self.counted: Relayed | None = None

    @property
    def usage(self) -> Usage:
        """What the answer cost; made on first use, as pass-through answers never fill it."""
        if self._usage is None:
            self._usage = Usage()
        return self._usage

    @usage.setter
    def usage(self, usage: Usage) -> None:
        self._usage = usage

    def reported_usage(self) -> Usage | None:
        """The usage an adapter filled in or a relayed answer reported, if any (for metrics)."""
        counted = self.counted
        if self._usage is None and counted is not None and counted.usage is not None:
            prompt, completion, extra, invalid = counted.tokens()
            self._usage = Usage(prompt, completion, extra, invalid)
        return self._usage

    def usage_missing(self) -> bool:
        """Whether a relayed answer that was read to its end reported no usage."""
        counted = self.counted
        return counted is not None and counted.complete and counted.usage is None

    def chunks(self) -> AsyncIterator[bytes]:
        if self.body is not None:
            return _once(self.body)
        assert self._chunks is not None, "an UpstreamResponse needs chunks or a body"
        return self._chunks

    async def read(self) -> bytes:
        if self.body is not None:
            return self.body
        parts = [chunk async for chunk in self.chunks()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def buffer(self) -> bytes:
        """Read the whole body now (and release the upstream); later reads use ``body``."""
        if self.body is None:
            try:
                self.body = await self.read()
            finally:
                await self.release()
        return self.body

    def map_chunks(self, wrap: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]) -> None:
        """Pass the body through ``wrap`` from now on (a layer that rewrites it as it goes)."""
        self._chunks = wrap(self.chunks())
        self.body = None

    def swap_release(
        self, release: Callable[[], Awaitable[None] | None] | None
    ) -> Callable[[], Awaitable[None] | None] | None:
        """Put ``release`` in place of the current release hook; returns the one replaced
        (a layer that wraps it calls it from its own)."""
        previous, self._release = self._release, release
        return previous

    async def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            result = release()
            if result is not None:
                await result

    @classmethod
    def from_json(cls, obj: Any, status: int = 200) -> UpstreamResponse:
        return cls(status, JSON_HEADERS, stream=False, body=orjson.dumps(obj))

    @classmethod
    def from_sse(
        cls,
        events: AsyncIterator[bytes],
        release: Callable[[], Awaitable[None] | None] | None = None,
    ) -> UpstreamResponse:
        return cls(200, SSE_HEADERS, events, stream=True, release=release)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Adapter(ABC):
    """Talks to one upstream on behalf of one configuration.

    The registry builds it as ``cls(config, session)``; ``session`` is the proxy's shared
    ``aiohttp.ClientSession`` (keep-alive pool). ``start`` runs once before the first request
    (load an engine, check a key), ``close`` once after the last. ``send`` is called once per
    attempt: a retry layer may call it again for the same job, so per-attempt work (request
    signatures, fresh nonces) belongs inside it. Adapters raise only ``proxy.errors`` types,
    chained to the cause, and know nothing of aiohttp.web, retries or metrics.
    """

    name: ClassVar[str] = ""
    #: Whether streams are relayed as the upstream sends them and their usage is read from
    #: the upstream's usage event, which the proxy then asks for (``Job.usage_asked``).
    asks_usage: ClassVar[bool] = False
    #: Whether ``/v1/*`` paths the proxy does not know are forwarded to this upstream unchanged.
    passthrough: ClassVar[bool] = False
    #: The sampling parameters the upstream honours (the catalog's
    #: ``supported_sampling_parameters``).
    sampling: ClassVar[tuple[str, ...]] = OPENAI_SAMPLING
    #: The ``top_k`` that turns top-k sampling off, for upstreams whose requests have one
    #: (``determinism: {enforce: true}`` sends it); ``None``: the upstream takes no ``top_k``.
    top_k_off: ClassVar[int | None] = None

    def __init__(self, config: BaseConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session

    async def start(self) -> None:
        """Acquire what the adapter needs before serving; raise ``ProxyError`` if it cannot."""

    async def close(self) -> None:
        """Release everything ``start`` acquired; called once, after the last request."""

    def take_over(self, previous: Adapter) -> None:
        """On reload, before ``start``: adopt what ``previous`` (the adapter being replaced)
        holds and this one can use as it is (a loaded engine), instead of acquiring it again.

        ``previous`` is still closed once its last request has left, so whatever is shared
        must count its users.
        """

    async def until_started(self) -> None:
        """Wait for work ``start`` left running in the background (loading an engine); raise
        ``ProxyError`` if it failed. At first start the proxy serves meanwhile (``/readyz``
        says why it is not ready); a reload swaps the adapter in only after this returns.
        """

    @abstractmethod
    async def send(self, job: Job) -> UpstreamResponse:
        """Start one attempt at ``job`` and return as soon as the status is known."""

    async def models(self) -> list[dict[str, Any]]:
        """The upstream's own model objects (OpenAI ``/v1/models`` shape), if it has a list."""
        return []

    async def facts(self) -> dict[str, Any]:
        """What the upstream can tell of the configured model, for the catalog: any of
        ``context_length``, ``max_output_length``, ``supported_features``,
        ``input_modalities`` and ``model_type``, in OpenRouter's vocabulary.

        Called in the background, never for a request; raise ``ProxyError`` when the upstream
        cannot say. By default, read from the upstream's model list (``models()``): a vLLM
        server's and the in-process engine's ``max_model_len``, or a ``context_length``.
        """
        items = await self.models()
        wanted = self.config.upstream_name
        item = next((m for m in items if m.get("id") == wanted), None)
        if item is None and len(items) == 1:
            item = items[0]
        facts: dict[str, Any] = {}
        if item is not None:
            for key in ("max_model_len", "context_length", "context_window"):
                value = item.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    facts["context_length"] = value
                    break
        return facts

    async def check_ready(self) -> None:
        """Raise ``UpstreamError`` with a reason when the upstream cannot serve right now."""

    def stats(self) -> Mapping[str, float]:
        """Gauges about the upstream (e.g. an engine's running requests), exported as metrics."""
        return {}

    def metric_families(self) -> Iterable[Any]:
        """Metric families the upstream keeps under its own names (an in-process engine's
        ``vllm:*``), exported beside the proxy's as they are."""
        return ()
