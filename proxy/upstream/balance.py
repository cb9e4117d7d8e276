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
  key and the URL itself, not its position, so adding or removing a URL moves only the keys
  that URL wins or held, about ``1/n`` of them.
- **Bounded loads** (Mirrokni, Thorup and Zadimoghaddam, 2016): walking that order, the first
  URL whose load is under ``ceil((1 + epsilon) * (total + 1) / n)`` and whose own queue is
  not over ``max_waiting`` takes the request; one always is under the bound unless queues
  block them all, and then the least loaded takes it. The rest follow in hash order, for
  failover.

A URL's load is what it reports (vLLM's waiting plus running requests) or, when that cannot
be read, the proxy's own count of attempts in flight on it; between two reads the proxy's
count is a floor (``max`` of the two), so a burst does not pile onto a URL that looked idle.
"""

from __future__ import annotations

import math
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
    """A 64-bit hash of ``data``, the same in every process (unlike ``hash()``)."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


def url_seed(url: str) -> int:
    """A URL's own seed in the rendezvous weights."""
    return digest(url.encode())


def weight(key: int, seed: int) -> int:
    """The rendezvous weight of a URL (``seed``) for ``key``: a 64-bit mix of the two
    (SplitMix64's finaliser over their XOR; both are blake2b hashes already)."""
    x = key ^ seed
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def load(upstream: Candidate) -> float:
    """The load the bound compares: reported, with the proxy's own count as a floor."""
    signals = upstream.signals
    if signals.readable:
        return max(signals.waiting + signals.running, upstream.active)
    return upstream.active


def rank(upstreams: Sequence[C], key: int, options: BalanceSection) -> list[C]:
    """``upstreams`` (the ready ones) in the order to try for ``key``."""
    order = sorted(upstreams, key=lambda u: weight(key, u.seed), reverse=True)
    if len(order) < 2:
        return order
    loads = [load(u) for u in order]
    cap = math.ceil((1 + options.epsilon) * (sum(loads) + 1) / len(order))
    limit = options.max_waiting
    chosen = -1
    for i, upstream in enumerate(order):
        signals = upstream.signals
        if loads[i] < cap and not (signals.readable and signals.waiting > limit):
            chosen = i
            break
    if chosen == -1:  # every queue is over its threshold: the least loaded, in hash order
        chosen = min(range(len(order)), key=loads.__getitem__)
    if chosen:
        order.insert(0, order.pop(chosen))
    return order


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
