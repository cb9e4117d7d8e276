"""MATRIX_MULTIPLICATION's arithmetic and result fields, without HTTP."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from proxy.errors import BadRequest
from proxy.node.challenge import Budget, matrices, multiply
from proxy.node.merkle import BLOCK, merkle_root, spelled


def sha(text: str) -> str:
    return "0x" + hashlib.sha256(text.encode()).hexdigest()


def test_merkle_root_spells_values_as_go_does() -> None:
    product = np.array([[-0.0, 1e20], [1 / 3, -2.5]])
    assert merkle_root(product) == sha(
        "-0.000000" "100000000000000000000.000000" "0.333333" "-2.500000"
    )
    assert merkle_root(np.array([[np.inf, -np.inf, np.nan]])) == sha("+Inf-InfNaN")


def test_gpu_result_is_labelled_and_a_failing_gpu_falls_back_to_the_cpu() -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    b = np.ones((3, 2))
    info = {"name": "Test GPU", "computeCapability": "9.0", "memoryGB": 141.0, "cudaCores": 0}
    answer = multiply(a, b, (np.matmul, info))
    assert answer["backend"] == "cuda" and answer["device"] == "Test GPU"
    assert answer["deviceInfo"] == info and answer["C"] == [[3.0, 3.0], [12.0, 12.0]]

    def broken(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA out of memory")

    answer = multiply(a, b, (broken, info))
    assert answer["backend"] == "cpu" and answer["device"] == "CPU"
    assert answer["C"] == [[3.0, 3.0], [12.0, 12.0]]
    assert answer["matrixSize"] == 2 and answer["flops"] == 16  # rows of A, as the node counts


def test_payload_precedence_and_limits() -> None:
    a, b, backend = matrices({"size": 3, "A": [[1]], "B": [[1]], "backend": "GPU"}, Budget(8))
    assert a.shape == b.shape == (3, 3) and backend == "gpu"
    assert ((a >= 0) & (a < 1)).all()
    a, _, backend = matrices({"matrixA": [[2]], "A": [[9]], "B": [[1]]}, Budget(8))
    assert a.tolist() == [[2.0]] and backend == "auto"
    with pytest.raises(BadRequest, match="more than 2 columns"):
        matrices({"A": [[1, 2, 3]], "B": [[1], [1], [1]]}, Budget(2))
    with pytest.raises(BadRequest, match="at most 2 rows"):
        matrices({"A": [[1], [1], [1]], "B": [[1]]}, Budget(2))
    with pytest.raises(BadRequest, match="backend must be a string"):
        matrices({"size": 2, "backend": 1}, Budget(8))


def printf(values: np.ndarray) -> bytes:
    """What the merkle root hashes, spelled one value at a time by Python's ``%.6f``."""
    return "".join(f"{v:.6f}" for v in values.ravel().tolist()).encode()


def test_values_are_spelled_as_printf_spells_them() -> None:
    rng = np.random.default_rng(7)
    halves = (np.arange(100_000) + 0.5) / 1e6  # the doubles nearest to a tie
    cases = [
        rng.random((300, 300)) @ rng.random((300, 300)),
        (rng.random(50_000) - 0.5) * 1e9,
        rng.standard_normal(50_000) * 10.0 ** rng.integers(-9, 9, 50_000),
        np.arange(-4000, 4000) / 128,  # exact ties, broken to even
        halves, np.nextafter(halves, 0), np.nextafter(halves, 1),
        np.array([0.0, -0.0, 5e-7, -5e-7, 2.5e-6, -1e-9, 1e-310, 0.9999995, 4503599627.3704]),
    ]
    for values in cases:
        assert spelled(values.ravel()) == printf(values)
    big = rng.random((3, BLOCK)) * 1000
    assert merkle_root(big) == "0x" + hashlib.sha256(printf(big)).hexdigest()


def test_the_budget_bounds_elements_and_flops_not_only_sides() -> None:
    tall, wide = [[1.0]] * 4096, [[1.0] * 4096]
    with pytest.raises(BadRequest, match="16777216 elements") as caught:
        matrices({"A": tall, "B": wide}, Budget(4096))
    assert caught.value.code == "matrix_too_large"
    with pytest.raises(BadRequest, match="flops"):
        matrices({"size": 64}, Budget(64, elements=64 * 64, flops=2 * 63**3))
    with pytest.raises(BadRequest, match="max_matrix_elements"):
        matrices({"size": 4096}, Budget(4096))
    a, b, _ = matrices({"A": wide, "B": tall}, Budget(4096))  # 1 x 4096 by 4096 x 1: cheap
    assert multiply(a, b)["C"] == [[4096.0]]
