"""MATRIX_MULTIPLICATION's arithmetic and result fields, without HTTP."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from proxy.errors import BadRequest
from proxy.node.challenge import matrices, merkle_root, multiply


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
    a, b, backend = matrices({"size": 3, "A": [[1]], "B": [[1]], "backend": "GPU"}, 8)
    assert a.shape == b.shape == (3, 3) and backend == "gpu"
    assert ((a >= 0) & (a < 1)).all()
    a, _, backend = matrices({"matrixA": [[2]], "A": [[9]], "B": [[1]]}, 8)
    assert a.tolist() == [[2.0]] and backend == "auto"
    with pytest.raises(BadRequest, match="more than 2 columns"):
        matrices({"A": [[1, 2, 3]], "B": [[1], [1], [1]]}, 2)
    with pytest.raises(BadRequest, match="at most 2 rows"):
        matrices({"A": [[1], [1], [1]], "B": [[1]]}, 2)
    with pytest.raises(BadRequest, match="backend must be a string"):
        matrices({"size": 2, "backend": 1}, 8)
