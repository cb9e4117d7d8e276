"""The merkle root of a challenge's product: ``0x`` + SHA-256 of every value as Go's ``%.6f``
spells it, row by row.

Spelling millions of floats one by one in Python holds the interpreter lock for seconds and
builds a string as large as the product many times over, so the values are spelled by numpy,
a block at a time, and hashed as they go: memory stays at one block, and the lock is let go
between numpy's steps. A value's six decimals are its exact binary value rounded half to even,
as ``printf`` rounds: ``v * 1e6`` is computed exactly as the sum of two doubles (Dekker's split
of ``v``; 1e6 has 14 significant bits, so each part's product is exact) and that sum is rounded
with its error accounted for. Values too large for that (``|v| >= 2**52 / 1e6``) or not finite
are spelled by Python, as before.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

#: Values spelled per block: about 2 MB of working arrays.
BLOCK = 1 << 16
#: Beyond this magnitude ``v * 1e6`` needs more than 52 bits: spelled by Python.
_EXACT_BELOW = 2.0**52 / 1e6
_SPLIT = 134217729.0  # 2**27 + 1, Dekker's splitter for doubles
#: "000" to "999" as ASCII digits, indexed by their value.
_THREE = np.frombuffer("".join(f"{i:03d}" for i in range(1000)).encode(),
                       dtype=np.uint8).reshape(1000, 3)


def merkle_root(product: np.ndarray) -> str:
    """``0x`` + SHA-256 of every value of ``product`` as ``%.6f`` (Go's spelling of values
    that are not finite), row by row."""
    digest = hashlib.sha256()
    values = np.ascontiguousarray(product, dtype=np.float64).ravel()
    for start in range(0, values.size, BLOCK):
        digest.update(spelled(values[start:start + BLOCK]))
    return "0x" + digest.hexdigest()


def spelled(values: np.ndarray) -> bytes:
    """``values`` (one dimension, float64) as ``%.6f`` each, one after another."""
    magnitude = np.abs(values)
    if not (magnitude < _EXACT_BELOW).all():  # NaN compares false: spelled by Python too
        return "".join(map(_go_float, values.tolist())).encode("ascii")
    whole, fraction = np.divmod(_micros(magnitude), 1_000_000)
    # Digits three at a time from a table; only as many integer digits as the block needs.
    groups = max(1, (len(str(int(whole.max()))) + 2) // 3) if values.size else 1
    digits = 3 * groups
    table = np.empty((values.size, 1 + digits + 1 + 6), dtype=np.uint8)
    table[:, 0] = ord("-")
    rest = whole
    for group in range(groups - 1, -1, -1):
        rest, three = np.divmod(rest, 1000)
        table[:, 1 + 3 * group:4 + 3 * group] = _THREE[three]
    table[:, 1 + digits] = ord(".")
    high, low = np.divmod(fraction, 1000)
    table[:, -6:-3] = _THREE[high]
    table[:, -3:] = _THREE[low]
    keep = np.ones(table.shape, dtype=bool)
    keep[:, 0] = np.signbit(values)
    # integer digits from the first that is not 0; the units digit always
    keep[:, 1:digits] = whole[:, None] >= 10 ** np.arange(digits - 1, 0, -1, dtype=np.int64)
    spelt: bytes = table[keep].tobytes()
    return spelt


def _micros(magnitude: np.ndarray) -> np.ndarray:
    """``round(magnitude * 1e6)`` of each value's exact binary value, ties to even."""
    scaled = magnitude * _SPLIT
    high = scaled - (scaled - magnitude)
    low = magnitude - high
    first, second = high * 1e6, low * 1e6  # both exact
    total = first + second
    back = total - first
    error = (first - (total - back)) + (second - back)  # total + error == first + second
    nearest = np.rint(total)
    off = total - nearest  # exact: |off| <= 0.5
    # Only a tie in ``total`` can be broken by its error: the exact value lies past it.
    past = (np.abs(off) == 0.5) & (error != 0) & (np.sign(error) == np.sign(off))
    rounded: np.ndarray = (nearest + np.where(past, 2 * off, 0.0)).astype(np.int64)
    return rounded


def _go_float(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.6f}"
