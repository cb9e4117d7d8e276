"""The replay cache behind inbound signature verification, bounded in time and in memory."""

from __future__ import annotations

import heapq


class NonceCache:
    """Remembers ``(address, nonce)`` pairs until their signed timestamp leaves the window.

    Bounded in time: an entry is kept while ``timestamp + window`` has not passed; after that
    the timestamp check alone rejects a replay. Bounded in memory: at ``max_entries`` the entry
    with the oldest timestamp is dropped and that timestamp becomes the *horizon*; a message
    whose timestamp is not newer than the horizon is refused (``replay_cache_full``), which
    covers every forgotten entry. So a full cache narrows the accepted window instead of
    opening a replay hole.

    Entries are kept by signed timestamp rather than by expiry so that ``window`` and
    ``max_entries`` can change (a reloaded config) without forgetting what was seen.

    Kept in memory: a restarted process has forgotten every nonce, unless a journal kept them
    (``proxy.auth.journal``, the default store). Without one, ``not_before`` (the process's
    start, as the proxy builds it) closes that hole: a message signed at or before it may have
    been accepted by the previous process, so it is refused (``before_start``).
    """

    __slots__ = ("_heap", "_seen", "horizon", "max_entries", "not_before", "window")

    #: Whether what it remembers outlives the process (a journal's does).
    lasting = False

    def __init__(
        self, window: float, max_entries: int, *, not_before: float = float("-inf")
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self.horizon = float("-inf")
        self.not_before = not_before
        self._seen: set[tuple[str, str]] = set()
        self._heap: list[tuple[int, tuple[str, str]]] = []
        self.retune(window, max_entries)

    def close(self) -> None:
        """Let go of what it holds beyond memory (nothing, here)."""

    def retune(self, window: float, max_entries: int) -> None:
        """Adopt new limits, keeping every entry (a smaller size takes effect on next add)."""
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.window = window
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._seen

    def expire(self, now: float) -> None:
        """Forget entries whose timestamp the window no longer accepts."""
        heap, oldest_kept = self._heap, now - self.window
        while heap and heap[0][0] < oldest_kept:
            _, key = heapq.heappop(heap)
            self._seen.discard(key)

    def covers(self, timestamp: int) -> bool:
        """Whether a message with ``timestamp`` can still be told apart from a replay."""
        return timestamp > self.horizon

    def add(self, key: tuple[str, str], timestamp: int) -> None:
        while len(self._seen) >= self.max_entries:
            dropped, old = heapq.heappop(self._heap)
            self._seen.discard(old)
            self.horizon = max(self.horizon, dropped)
        self._seen.add(key)
        heapq.heappush(self._heap, (timestamp, key))
