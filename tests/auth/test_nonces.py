"""The replay cache on its own: bounded in time and memory, horizon, new limits."""

from __future__ import annotations

import pytest

from proxy.auth.nonces import NonceCache


def test_nonce_cache_unit_bounds() -> None:
    cache = NonceCache(window=10, max_entries=2)
    cache.add(("a", "1"), 100)
    cache.add(("a", "2"), 105)
    cache.add(("a", "3"), 103)
    assert len(cache) == 2 and ("a", "1") not in cache
    assert cache.horizon == 100
    assert not cache.covers(100) and cache.covers(101)
    cache.expire(113.5)
    assert len(cache) == 1 and ("a", "2") in cache
    cache.expire(115.5)
    assert len(cache) == 0
    with pytest.raises(ValueError, match="at least 1"):
        NonceCache(window=10, max_entries=0)


def test_new_limits_keep_entries() -> None:
    cache = NonceCache(window=10, max_entries=5)
    cache.add(("a", "1"), 100)
    cache.retune(window=100, max_entries=1)
    cache.expire(150)  # outside the old window, inside the new one: still remembered
    assert ("a", "1") in cache
    cache.add(("a", "2"), 150)  # the smaller size applies from the next entry on
    assert len(cache) == 1 and cache.horizon == 100
    with pytest.raises(ValueError, match="at least 1"):
        cache.retune(window=10, max_entries=0)
