"""The replay cache behind inbound signature verification, bounded in time and in memory."""

from __future__ import annotations

import heapq


class NonceCache:
    """Remembers ``(address, nonce)`` pairs until their signed timestamp leaves the window.

    Bounded in time: an entry is kept until ``timestamp + window``, after which the timestamp
    check alone rejects a replay. Bounded in memory: at ``max_entries`` the entry closest to
    expiry is dropped and its expiry becomes the *horizon*; any message whose own expiry is not
    past the horizon is refused (``replay_cache_full``), which covers every forgotten entry. So a
    full cache narrows the accepted window instead of opening a replay hole.
    """

    __slots__ = ("_expiry", "_heap", "horizon", "max_entries", "window")

    def __init__(self, window: float, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.window = window
        self.max_entries = max_entries
        self.horizon = float("-inf")
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._expiry

    def expire(self, now: float) -> None:
        """Forget entries whose timestamp the window no longer accepts."""
        heap = self._heap
        while heap and heap[0][0] < now:
            _, key = heapq.heappop(heap)
            del self._expiry[key]

    def covers(self, timestamp: int) -> bool:
        """Whether a message with ``timestamp`` can still be told apart from a replay."""
        return timestamp + self.window > self.horizon

    def add(self, key: tuple[str, str], timestamp: int) -> None:
        expiry = timestamp + self.window
        while len(self._expiry) >= self.max_entries:
            dropped, old = heapq.heappop(self._heap)
            del self._expiry[old]
            self.horizon = max(self.horizon, dropped)
        self._expiry[key] = expiry
        heapq.heappush(self._heap, (expiry, key))
