"""Token counts as an upstream reports them, checked before anything adds them up.

An upstream's ``usage`` is its word, not a fact: a count is kept when it is a JSON integer
(``true`` is not one) from 0 to :data:`MAX_TOKENS`; anything else (negative, huge, a string,
a list, an object) is not counted, and the answer that carried it is served all the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The largest count believed: 2**31 - 1, far above any model's context, and what a signed
#: 32-bit counter (many servers' own type) holds.
MAX_TOKENS = 2**31 - 1


def token_count(value: Any) -> int | None:
    """``value`` as a count, or ``None`` when it is not one."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    return None


def counts(usage: Mapping[str, Any], keys: Sequence[str]) -> tuple[list[int | None], bool]:
    """The counts under ``keys`` (``None`` where absent or not a count), and whether any was
    present but not a count."""
    out: list[int | None] = []
    invalid = False
    for key in keys:
        value = usage.get(key)
        count = token_count(value)
        if count is None and value is not None:
            invalid = True
        out.append(count)
    return out, invalid
