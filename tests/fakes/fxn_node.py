"""A fake Function Network node (or gateway) for tests: OpenAI format in, signatures checked.

It verifies request signatures with its own code path (its own message layout and EIP-191
prefixing, pycryptodome's Keccak, eth-keys' raw recovery) and never imports ``proxy.auth.signing``,
so a test that passes against it shows the proxy speaks the network's format, not merely that
the proxy agrees with itself. ``gateway_headers`` signs the same way for tests of the proxy's
inbound verification.

Build one with ``create_fake_node(...)`` and serve it with ``aiohttp_server``; the
:class:`FakeNode` under ``app[FAKE_NODE]`` records every request and can be told to answer the
first ``fail_first`` signed requests with 503 (to see that retries are signed afresh).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from Crypto.Hash import keccak
from eth_keys.datatypes import PrivateKey, Signature


def eip191_digest(text: bytes) -> bytes:
    prefixed = b"\x19Ethereum Signed Message:\n" + str(len(text)).encode() + text
    return keccak.new(data=prefixed, digest_bits=256).digest()


def _message(body: bytes, timestamp: str, nonce: str) -> bytes:
    return b".".join(
        (hashlib.sha256(body).hexdigest().encode(), timestamp.encode(), nonce.encode())
    )


def recover_signer(body: bytes, timestamp: str, nonce: str, signature_hex: str) -> str:
    """The checksummed address that signed ``body``; raises ``ValueError`` when none did."""
    raw = bytes.fromhex(signature_hex.removeprefix("0x"))
    if len(raw) != 65 or raw[64] not in (27, 28):
        raise ValueError("signature must be 65 bytes with v 27 or 28")
    vrs = (
        raw[64] - 27,
        int.from_bytes(raw[:32], "big"),
        int.from_bytes(raw[32:64], "big"),
    )
    public_key = Signature(vrs=vrs).recover_public_key_from_msg_hash(
        eip191_digest(_message(body, timestamp, nonce))
    )
    return str(public_key.to_checksum_address())


def gateway_headers(
    private_key: bytes,
    body: bytes,
    *,
    timestamp: str | None = None,
    nonce: str = "gw-nonce-1",
) -> dict[str, str]:
    """Signature headers as a network gateway sends them, made without ``proxy.auth.signing``."""
    key = PrivateKey(private_key)
    # A second ahead, as a gateway's clock may well be: a signature from the very second the
    # proxy started may predate its start, and is refused (before_start).
    ts = str(int(time.time()) + 1) if timestamp is None else timestamp
    signature = key.sign_msg_hash(eip191_digest(_message(body, ts, nonce)))
    v, r, s = signature.vrs
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v + 27])
    return {
        "X-Address": str(key.public_key.to_checksum_address()),
        "X-Signature": raw.hex(),
        "X-Timestamp": ts,
        "X-Nonce": nonce,
    }


@dataclass(slots=True)
class Received:
    """One request as the fake node saw it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    signer: str | None
    status: int = 0


@dataclass(slots=True)
class FakeNode:
    """What the fake node checks and remembers; tests change the fields between requests."""

    allowed: frozenset[str] | None = None
    require_signature: bool = True
    fail_first: int = 0
    #: Seconds to wait before answering a verified request (to provoke timeouts).
    delay: float = 0.0
    window: int = 300
    stream_chunks: int = 3
    received: list[Received] = field(default_factory=list)
    nonces: set[tuple[str, str]] = field(default_factory=set)

    def check(self, request_headers: dict[str, str], body: bytes) -> str | None:
        """The signer, or ``None`` when unsigned and not required; else ``PermissionError``."""
        names = ("X-Address", "X-Signature", "X-Timestamp", "X-Nonce")
        present = [request_headers.get(name) for name in names]
        if not any(present) and not self.require_signature:
            return None
        if not all(present):
            raise PermissionError("missing signature header")
        address, signature, timestamp, nonce = (str(value) for value in present)
        try:
            signer = recover_signer(body, timestamp, nonce, signature)
        except ValueError as exc:
            raise PermissionError(f"bad signature: {exc}") from exc
        if signer.lower() != address.lower():
            raise PermissionError("signature does not match X-Address")
        if self.allowed is not None and signer.lower() not in self.allowed:
            raise PermissionError("signer not allowed")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.window:
            raise PermissionError("timestamp outside the window")
        if (signer.lower(), nonce) in self.nonces:
            raise PermissionError("nonce replayed")
        self.nonces.add((signer.lower(), nonce))
        return signer


FAKE_NODE = web.AppKey("fake_node", FakeNode)


def _completion(endpoint: str, model: str, text: str) -> dict[str, Any]:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    if endpoint == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
    choice = {"index": 0, "text": text, "finish_reason": "stop"}
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def _chunk(endpoint: str, model: str, piece: str) -> bytes:
    if endpoint == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": piece},
            "finish_reason": None,
        }
        obj = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [choice],
        }
    else:
        obj = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "text": piece, "finish_reason": None}],
        }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _error(status: int, message: str, code: str) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": "fake_node_error",
            "param": None,
            "code": code,
        }
    }
    return web.json_response(body, status=status, dumps=lambda obj: orjson.dumps(obj).decode())


@web.middleware
async def _gate(request: web.Request, handler: Any) -> web.StreamResponse:
    node = request.app[FAKE_NODE]
    body = await request.read()
    record = Received(request.method, request.path, dict(request.headers), body, None)
    node.received.append(record)
    try:
        record.signer = node.check(dict(request.headers), body)
    except PermissionError as exc:
        record.status = 401
        return _error(401, str(exc), "unauthorized")
    if node.delay:
        await asyncio.sleep(node.delay)
    if node.fail_first > 0:
        node.fail_first -= 1
        record.status = 503
        return _error(503, "fake node is busy", "unavailable")
    response: web.StreamResponse = await handler(request)
    record.status = response.status
    return response


async def _generate(request: web.Request) -> web.StreamResponse:
    endpoint = "chat" if request.path.endswith("/chat/completions") else "completions"
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid JSON", "bad_request")
    if not isinstance(payload, dict):
        return _error(400, "body must be an object", "bad_request")
    model = str(payload.get("model", ""))
    pieces = [f"fake {i} " for i in range(request.app[FAKE_NODE].stream_chunks)]
    if not payload.get("stream"):
        return web.Response(
            body=orjson.dumps(_completion(endpoint, model, "".join(pieces))),
            content_type="application/json",
        )
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for piece in pieces:
        await response.write(_chunk(endpoint, model, piece))
        await asyncio.sleep(0)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _embeddings(request: web.Request) -> web.Response:
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid JSON", "bad_request")
    raw_input = payload.get("input", "")
    items = raw_input if isinstance(raw_input, list) else [raw_input]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.0, 0.5, 1.0]} for i in range(len(items))
    ]
    body = {
        "object": "list",
        "data": data,
        "model": payload.get("model"),
        "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _models(request: web.Request) -> web.Response:
    body = {
        "object": "list",
        "data": [{"id": "fxn-model-1", "object": "model", "created": 0, "owned_by": "fxn"}],
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def create_fake_node(
    *,
    allowed: Iterable[str] | None = None,
    require_signature: bool = True,
    fail_first: int = 0,
    stream_chunks: int = 3,
) -> web.Application:
    """A fake node that accepts requests signed by any of ``allowed`` (any valid signer if None)."""
    app = web.Application(middlewares=[_gate])
    app[FAKE_NODE] = FakeNode(
        allowed=None if allowed is None else frozenset(a.lower() for a in allowed),
        require_signature=require_signature,
        fail_first=fail_first,
        stream_chunks=stream_chunks,
    )
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_post("/v1/completions", _generate)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    return app
