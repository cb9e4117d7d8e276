"""The scheduler's challenges, answered as the reference node answers them.

A challenge is ``{"type": ..., "payload": ...}``; the answer is the result object itself:

``IDENTITY``
    payload ignored; see ``proxy.node.identity``.
``MATRIX_MULTIPLICATION``
    payload ``{"size": n}`` (two random n x n matrices, uniform in [0, 1)), or
    ``{"matrixA": [[...]], "matrixB": [[...]]}`` / ``{"A": ..., "B": ...}`` (``size`` wins
    when both are given; ``matrixA`` wins over ``A``); optional ``backend`` (``auto``, ``cpu``,
    ``gpu``/``cuda``/``metal``) and ``precision`` (accepted, float64 is used). Result::

        {"computationTimeMs", "gflops", "backend": "cpu" | "cuda", "device", "deviceInfo":
         {"name", "computeCapability", "memoryGB", "cudaCores"[, "cudaVersion",
          "driverVersion"]}, "matrixSize", "merkleRoot", "resultSamples": [{"row", "col",
         "value"}], "flops"[, "C" when matrixSize <= 100]}

    ``matrixSize`` is the row count of A and the flop count is ``2 * matrixSize**3``, as
    the node computes them; ``merkleRoot`` is ``0x`` + SHA-256 of every product value
    formatted ``%.6f``, row by row (``proxy.node.merkle``); the samples are C[0][0] and
    C[rows/2][cols/2]. numpy on the CPU; the GPU (torch or cupy, where importable and a device
    is present) for ``backend: gpu`` or ``auto`` from 100 rows, in float64. One multiplication
    runs at a time, off the event loop. Its cost is bounded (:class:`Budget`) by side, by
    elements of each of A, B and C (a 4096x1 by 1x4096 product has 16M), and by the flops
    ``2 * rows * inner * columns`` it takes: over any, a 400 ``matrix_too_large``.
``ENDPOINT_REACHABLE``
    payload: a URL string. ``{"reachable": true}`` for a 2xx answer to a GET, ``false`` for any
    other status; an unreachable URL is a 500, as on the node. Bounded: a timeout, no body
    read, no credentials of this node sent, http(s) only.

Unknown types answer 400 ``unknown challenge type: <type>``; a body that is not a JSON
object, 400 ``Invalid request body``. Bad payloads are 400 here (the node answers 500).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson

from proxy.errors import BadRequest, ProxyError, reason
from proxy.node.identity import Identity
from proxy.node.merkle import merkle_root

log = logging.getLogger("model_proxy")

TYPES = ("IDENTITY", "MATRIX_MULTIPLICATION", "ENDPOINT_REACHABLE")
#: Products up to this size also return the whole matrix ``C`` (the node's rule).
FULL_RESULT_MAX = 100
#: ``backend: auto`` tries the GPU from this many rows of A (the node's rule).
GPU_AUTO_MIN = 100
REACHABLE_TIMEOUT = 10.0
GPU_BACKENDS = frozenset({"gpu", "cuda", "metal"})

#: The default budget of one multiplication: 2048 x 2048 factors and product, ~17 GFLOP,
#: about a second of numpy on two CPU cores, hashing included.
MAX_ELEMENTS = 2048 * 2048
MAX_FLOPS = 2 * 2048**3

Matmul = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class Budget:
    """What one multiplication may cost: ``side``, the largest dimension; ``elements``, the
    most elements in each of A, B and the product; ``flops``, ``2 * rows * inner * columns``
    at most."""

    side: int
    elements: int = MAX_ELEMENTS
    flops: int = MAX_FLOPS

    def check(self, rows: int, inner: int, columns: int) -> None:
        """``BadRequest`` (``matrix_too_large``) when a rows x inner by inner x columns
        product is over the budget."""
        shape = f"a {rows}x{inner} by {inner}x{columns} product"
        largest = max(rows * inner, inner * columns, rows * columns)
        if largest > self.elements:
            raise BadRequest(f"{shape} has matrices of {largest} elements; this node's limit "
                             f"is {self.elements} (node.max_matrix_elements)",
                             code="matrix_too_large")
        flops = 2 * rows * inner * columns
        if flops > self.flops:
            raise BadRequest(f"{shape} takes {flops} flops; this node's limit is {self.flops} "
                             "(node.max_matrix_flops)", code="matrix_too_large")


class Challenges:
    """Answers challenges for one node; ``answer(body)`` returns ``(type, result)`` or raises
    ``BadRequest`` (400) / ``ProxyError`` (500) with the node's message."""

    def __init__(self, identity: Identity, *, budget: Budget) -> None:
        self.identity = identity
        self.budget = budget
        self._matrix_turn = asyncio.Semaphore(1)
        self._gpu: tuple[Matmul, dict[str, Any]] | bool | None = False  # False: not probed

    async def answer(self, body: bytes, session: aiohttp.ClientSession) -> tuple[str, Any]:
        try:
            challenge = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("Invalid request body", code="invalid_challenge") from None
        if not isinstance(challenge, dict):
            raise BadRequest("Invalid request body", code="invalid_challenge")
        kind = challenge.get("type")
        payload = challenge.get("payload")
        handlers: dict[str, Callable[[Any, aiohttp.ClientSession], Awaitable[Any]]] = {
            "IDENTITY": self._identity,
            "MATRIX_MULTIPLICATION": self._matrix,
            "ENDPOINT_REACHABLE": self._reachable,
        }
        handler = handlers.get(kind) if isinstance(kind, str) else None
        if handler is None or not isinstance(kind, str):
            shown = kind[:100] if isinstance(kind, str) else ""
            raise BadRequest(f"unknown challenge type: {shown}", code="unknown_challenge_type")
        return kind, await handler(payload, session)

    async def _identity(self, payload: Any, session: aiohttp.ClientSession) -> Any:
        return await self.identity.answer(session)

    async def _reachable(self, payload: Any, session: aiohttp.ClientSession) -> Any:
        if not isinstance(payload, str) or not payload.startswith(("http://", "https://")):
            raise BadRequest("invalid payload for endpoint reachability challenge")
        try:
            # A bare session request: none of this node's credentials or headers go along.
            async with session.get(
                payload, timeout=aiohttp.ClientTimeout(total=REACHABLE_TIMEOUT),
                allow_redirects=True, max_redirects=5,
            ) as response:
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise ProxyError(
                f"failed to reach endpoint: {reason(exc)}", code="endpoint_unreachable"
            ) from exc
        return {"reachable": 200 <= status < 300}

    async def _matrix(self, payload: Any, session: aiohttp.ClientSession) -> Any:
        async with self._matrix_turn:
            # Even reading the matrices is numpy work on up to limits.max_body_bytes of JSON.
            a, b, backend = await asyncio.to_thread(matrices, payload, self.budget)
            gpu = None
            if backend in GPU_BACKENDS or (backend == "auto" and a.shape[0] >= GPU_AUTO_MIN):
                gpu = await asyncio.to_thread(self._probe_gpu)
            return await asyncio.to_thread(multiply, a, b, gpu)

    def _probe_gpu(self) -> tuple[Matmul, dict[str, Any]] | None:
        if self._gpu is False:
            self._gpu = _find_gpu()
        return self._gpu if isinstance(self._gpu, tuple) else None


def matrices(payload: Any, budget: Budget) -> tuple[np.ndarray, np.ndarray, str]:
    """The two factors a payload asks for, and the backend it prefers; ``BadRequest`` if it
    is malformed or over ``budget``."""
    limit = budget.side
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise BadRequest("invalid payload for matrix multiplication challenge")
    backend = payload.get("backend") or "auto"
    if not isinstance(backend, str):
        raise BadRequest("backend must be a string")
    size = payload.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int):
        raise BadRequest("size must be an integer")
    if size > 0:
        if size > limit:
            raise BadRequest(f"size {size} is over this node's limit of {limit}")
        budget.check(size, size, size)
        rng = np.random.default_rng()
        return rng.random((size, size)), rng.random((size, size)), backend.lower()
    given_a = payload.get("matrixA") or payload.get("A")
    given_b = payload.get("matrixB") or payload.get("B")
    if not given_a or not given_b:
        raise BadRequest("either 'size' or both 'A' and 'B' matrices must be provided")
    a, b = _matrix(given_a, "A", limit), _matrix(given_b, "B", limit)
    if a.shape[1] != b.shape[0]:
        raise BadRequest("matrix dimensions are not compatible for multiplication")
    budget.check(a.shape[0], a.shape[1], b.shape[1])
    return a, b, backend.lower()


def _matrix(value: Any, name: str, limit: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) > limit:
        raise BadRequest(f"{name} must be a list of at most {limit} rows")
    try:
        array = np.array(value)
    except ValueError:  # ragged rows
        raise BadRequest(f"the rows of {name} must all have the same length") from None
    if array.ndim != 2 or array.shape[1] == 0 or array.dtype.kind not in "iuf":
        raise BadRequest(f"{name} must be a non-empty list of rows of numbers")
    if array.shape[1] > limit:
        raise BadRequest(f"{name} has more than {limit} columns")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise BadRequest(f"{name} must hold finite numbers")
    return array


def multiply(
    a: np.ndarray, b: np.ndarray, gpu: tuple[Matmul, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """C = A x B and the node's result fields (blocking; run it off the event loop)."""
    device = {"name": "CPU", "computeCapability": "N/A", "memoryGB": 0, "cudaCores": 0}
    backend = "cpu"
    start = time.perf_counter()
    product: np.ndarray | None = None
    if gpu is not None:
        try:
            product = gpu[0](a, b)
            backend, device = "cuda", gpu[1]
        except Exception as exc:  # the node falls back to the CPU too
            log.warning("node: GPU multiplication failed (%s); using the CPU", reason(exc))
            start = time.perf_counter()
    if product is None:
        product = a @ b
    elapsed_ms = max((time.perf_counter() - start) * 1000.0, 1e-6)
    n = a.shape[0]
    operations = 2 * n * n * n
    rows, cols = product.shape
    answer: dict[str, Any] = {
        "computationTimeMs": elapsed_ms,
        "gflops": operations / 1e9 / (elapsed_ms / 1000.0),
        "backend": backend,
        "device": device["name"],
        "deviceInfo": device,
        "matrixSize": n,
        "merkleRoot": merkle_root(product),
        "resultSamples": [
            {"row": r, "col": c, "value": float(product[r, c])}
            for r, c in ((0, 0), (rows // 2, cols // 2))
        ],
        "flops": operations,
    }
    if n <= FULL_RESULT_MAX:
        answer["C"] = product.tolist()
    return answer


def _find_gpu() -> tuple[Matmul, dict[str, Any]] | None:
    """A float64 GPU multiplication and its device description, or ``None``."""
    if not os.path.exists("/dev/nvidiactl"):
        return None  # no NVIDIA driver: do not import a GPU stack (torch is large) to learn it
    for finder in (_torch_gpu, _cupy_gpu):
        try:
            found = finder()
        except Exception as exc:  # an installed but broken GPU stack: the CPU it is
            log.info("node: GPU not usable (%s)", reason(exc))
            found = None
        if found is not None:
            return found
    return None


def _torch_gpu() -> tuple[Matmul, dict[str, Any]] | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)

    def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        result = torch.from_numpy(a).cuda() @ torch.from_numpy(b).cuda()
        return result.cpu().numpy()

    return matmul, {
        "name": props.name,
        "computeCapability": f"{props.major}.{props.minor}",
        "memoryGB": props.total_memory / 1024**3,
        "cudaCores": 0,
        "cudaVersion": str(torch.version.cuda),
    }


def _cupy_gpu() -> tuple[Matmul, dict[str, Any]] | None:
    if importlib.util.find_spec("cupy") is None:
        return None
    import cupy  # type: ignore[import-not-found]

    if cupy.cuda.runtime.getDeviceCount() < 1:
        return None
    props = cupy.cuda.runtime.getDeviceProperties(0)

    def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return cupy.asnumpy(cupy.asarray(a) @ cupy.asarray(b))  # type: ignore[no-any-return]

    name = props["name"]
    return matmul, {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "computeCapability": f"{props['major']}.{props['minor']}",
        "memoryGB": props["totalGlobalMem"] / 1024**3,
        "cudaCores": 0,
    }
