"""Which of a model's URLs a request goes to first, in the ``prefix`` and ``session`` modes.

Stateless by design, so that every proxy replica chooses alike without sharing anything:
the choice is a pure function of the request's key, the set of ready URLs and their loads.

- **Key.** ``prefix``: a hash of the prompt's leading bytes. For chat, the messages up to and
  including the first user turn (a system prompt and the conversation's opening), rendered
  canonically (``[role, content]`` pairs, keys sorted) and cut at ``balance.prefix_bytes``:
  every later turn of a conversation starts with them, so a conversation stays where its
  prefix is cached, and a long shared system prompt keys alike whatever follows it. For
  completions, the prompt's first ``prefix_bytes``. ``session``: the session header, else the
  OpenAI ``user`` field, else the prefix key.
- **Order.** Rendezvous hashing (highest random weight): each URL's weight is a hash of the
  key and of the URL itself (:func:`weight`), not of its position, so adding or removing a
  URL moves only the keys that URL wins or held, about ``1/n`` of them.
- **Bounded loads** (Mirrokni, Thorup and Zadimoghaddam, 2016): walking that order, the first
  URL whose load is under ``ceil((1 + epsilon) * (total + 1) / n)`` (or under ``min_bound``,
  so that a few requests in flight do not move a prefix) and whose own queue is not over
  ``max_waiting`` takes the request; one always is under the bound unless queues
  block them all, and then the least loaded takes it. The rest follow in hash order, for
  failover.

A URL's load is what it reports (vLLM's waiting plus running requests) or, when that cannot
be read, the proxy's own count of attempts in flight on it; between two reads the proxy's
count is a floor (``max`` of the two), so a burst does not pile onto a URL that looked idle.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson

from proxy.upstream.signals import Signals

if TYPE_CHECKING:
    from proxy.adapters.base import Job
    from proxy.config import BalanceSection

_MASK = (1 << 64) - 1


class Candidate(Protocol):
    """What the router reads of an upstream (``proxy.upstream.pipeline.Upstream``)."""

    @property
    def seed(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def signals(self) -> Signals: ...


C = TypeVar("C", bound=Candidate)


def digest(data: bytes) -> int:
    """A request's key: a hash of ``data``, the same in every process (unlike ``hash()``).

    CRC-32: a key needs no more than 32 bits (two prefixes that collide share a URL, no
    more), it costs a quarter of a cryptographic hash on a prompt's kilobytes, and
    :func:`weight` mixes it with each URL's 64-bit seed."""
    return zlib.crc32(data)


def url_seed(url: str) -> int:
    """A URL's own seed in the rendezvous weights: 64 bits of its hash, odd (computed once,
    when the URL is built)."""
    return int.from_bytes(blake2b(url.encode(), digest_size=8).digest(), "little") | 1


def weight(key: int, seed: int) -> int:
    """The rendezvous weight of a URL (``seed``) for ``key``: multiplicative hashing,
    ``(key + 1) * seed`` modulo 2**64, compared by its high bits. Two URLs' weights never tie
    (their seeds are odd and differ), and over keys every URL comes first, and second, as
    often as any other (``tests/upstream/test_balance.py``). :func:`rank` has it inline:
    a function call costs more than the arithmetic."""
    return ((key + 1) * seed) & _MASK


def load(upstream: Candidate) -> float:
    """The load the bound compares: reported, with the proxy's own count as a floor."""
    signals = upstream.signals
    if signals.readable:
        return max(signals.waiting + signals.running, upstream.active)
    return upstream.active


def rank(upstreams: Sequence[C], key: int, options: BalanceSection) -> list[C]:
    """``upstreams`` (the ready ones) in the order to try for ``key``.

    On the request path: :func:`weight` and :func:`load` are written out inline."""
    scored: list[tuple[int, float, C]] = []
    total = 0.0
    key += 1
    for u in upstreams:
        signals = u.signals
        busy: float = u.active
        if signals.readable and signals.waiting + signals.running > busy:
            busy = signals.waiting + signals.running
        total += busy
        scored.append(((key * u.seed) & _MASK, busy, u))
    scored.sort(key=_weight_of, reverse=True)
    if len(scored) < 2:
        return [u for _, _, u in scored]
    cap = max(math.ceil((1 + options.epsilon) * (total + 1) / len(scored)), options.min_bound)
    limit = options.max_waiting
    chosen = -1
    for i, (_, busy, u) in enumerate(scored):
        signals = u.signals
        if busy < cap and not (signals.readable and signals.waiting > limit):
            chosen = i
            break
    if chosen < 0:  # every queue is over its threshold: the least loaded, in hash order
        chosen = min(range(len(scored)), key=lambda j: scored[j][1])
    if chosen:
        scored.insert(0, scored.pop(chosen))
    return [u for _, _, u in scored]


def _weight_of(item: tuple[int, float, object]) -> int:
    return item[0]


def key(job: Job, options: BalanceSection, session: bool) -> int:
    """The request's routing key: its session (``session`` mode) or its prompt's prefix."""
    payload = job.payload or {}
    if session:
        named = job.session or payload.get("user")
        if isinstance(named, str) and named:
            return digest(b"session\0" + named.encode("utf-8", "replace")[:1024])
    return digest(prefix(payload, options.prefix_bytes) or job.body[: options.prefix_bytes])


def prefix(payload: Mapping[str, Any], size: int) -> bytes:
    """The prompt's leading ``size`` bytes, canonically rendered (``b""``: no prompt)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        return _chat_prefix(messages, size)
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0] if not isinstance(prompt[0], int) else prompt[: size // 4]
    if isinstance(prompt, str):
        return prompt[:size].encode("utf-8", "replace")[:size]
    if isinstance(prompt, list):  # token ids, or a batch's first one
        return orjson.dumps(prompt[: size // 4])[:size]
    return b""


def _chat_prefix(messages: list[Any], size: int) -> bytes:
    pairs: list[Any] = []
    for message in messages:
        if not isinstance(message, dict):
            pairs.append(message)
            continue
        content = message.get("content")
        if isinstance(content, str) and len(content) > size:
            content = content[:size]  # the rest cannot reach the hashed bytes
        role = message.get("role")
        pairs.append([role, content])
        if role == "user":
            break
    try:
        rendered = orjson.dumps(pairs, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # pragma: no cover - a parsed JSON body always renders
        return b""
    return rendered[:size]
