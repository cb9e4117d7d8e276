"""The Function Network around a node: its signing clients and its chain, as fakes.

``send_request_headers`` signs as the network's ``cmd/send_request`` (``fxnclient``) does,
written here from the scheme, not with ``proxy.auth.signing``: SHA-256 of the body in hex,
``.timestamp.nonce``, EIP-191 prefix, keccak256, secp256k1 (libsecp256k1 through coincurve),
``v + 27``, plain lower-case hex. ``FakeChain`` is a JSON-RPC endpoint answering ``eth_call``
for a Router and its GatewayRegistry with ABI-encoded results.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import coincurve
from aiohttp import web
from Crypto.Hash import keccak as _keccak
from eth_abi.abi import encode


def keccak256(data: bytes) -> bytes:
    return _keccak.new(digest_bits=256, data=data).digest()


def checksum(address_hex: str) -> str:
    """EIP-55 spelling of 40 hex digits."""
    lower = address_hex.lower()
    digest = keccak256(lower.encode()).hex()
    pairs = zip(lower, digest[:40], strict=True)
    return "0x" + "".join(c.upper() if int(d, 16) >= 8 else c for c, d in pairs)


def address_of(private_key_hex: str) -> str:
    public = coincurve.PrivateKey(bytes.fromhex(private_key_hex)).public_key.format(False)
    return checksum(keccak256(public[1:])[-20:].hex())


def send_request_headers(
    private_key_hex: str, body: bytes, timestamp: str | None = None, nonce: str | None = None
) -> dict[str, str]:
    # A second ahead, as a gateway's clock may well be: a signature from the very second the
    # proxy started may predate its start, and is refused (before_start).
    timestamp = timestamp or str(int(time.time()) + 1)
    nonce = nonce or f"{random.getrandbits(63):x}"
    message = f"{hashlib.sha256(body).hexdigest()}.{timestamp}.{nonce}"
    prefixed = f"\x19Ethereum Signed Message:\n{len(message)}{message}".encode()
    key = coincurve.PrivateKey(bytes.fromhex(private_key_hex))
    signature = key.sign_recoverable(keccak256(prefixed), hasher=None)
    signature = signature[:64] + bytes([signature[64] + 27])
    return {
        "Content-Type": "application/json",
        "X-Address": address_of(private_key_hex),
        "X-Timestamp": timestamp,
        "X-Nonce": nonce,
        "X-Signature": signature.hex(),
    }


def selector(signature: str) -> str:
    return "0x" + keccak256(signature.encode()).hex()[:8]


@dataclass
class Entry:
    owner: str
    id: bytes
    paused: bool = False
    registered_at: int = 1_700_000_000
    metadata: str = "{}"


@dataclass
class FakeChain:
    """Router at ``router`` pointing to a GatewayRegistry at ``registry``.

    ``mode`` breaks it on purpose: ``ok``, ``http_error`` (503), ``rpc_error`` (a JSON-RPC
    error object), ``bad_hex``, ``bad_abi`` (a result that does not decode), ``not_json``.
    ``live_filters_paused`` mirrors the contract's ``...Live`` reading (paused ones left out);
    off, paused entries are returned with ``paused: true``. ``registry_answer``, when set, is
    the registry's return data as it is (``aliased_gateways`` builds a hostile one);
    ``registry_answers`` counts the registry reads answered.
    """

    router: str = "0x7C8e239F9A26D7fd081Db72A2A23F4E9CA35E16b"
    registry: str = "0x1111111111111111111111111111111111111111"
    gateways: list[Entry] = field(default_factory=list)
    mode: str = "ok"
    live_filters_paused: bool = True
    calls: list[tuple[str, str]] = field(default_factory=list)
    registry_answer: bytes | None = None
    registry_answers: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._rpc)
        return app

    async def _rpc(self, request: web.Request) -> web.Response:
        message: dict[str, Any] = await request.json()
        assert message["jsonrpc"] == "2.0" and message["method"] == "eth_call"
        call, block = message["params"]
        assert block == "latest"
        self.calls.append((call["to"].lower(), call["data"]))
        if self.mode == "http_error":
            return web.Response(status=503, text="upstream node is syncing")
        if self.mode == "not_json":
            return web.Response(text="<html>gateway timeout</html>")
        if self.mode == "rpc_error":
            error = {"code": -32000, "message": "execution reverted"}
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "error": error})
        result = self._answer(call["to"].lower(), call["data"])
        if self.mode == "bad_hex":
            result = "0xnot-hex"
        elif self.mode == "bad_abi":
            result = "0x" + "ff" * 40
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

    def _answer(self, to: str, data: str) -> str:
        if to == self.router.lower() and data == selector("gatewayRegistry()"):
            return "0x" + encode(["address"], [self.registry]).hex()
        if to == self.registry.lower() and data == selector("getActiveGatewaysLive()"):
            self.registry_answers += 1
            if self.registry_answer is not None:
                return "0x" + self.registry_answer.hex()
            rows = [
                (g.owner, g.id, g.registered_at, g.metadata, g.paused)
                for g in self.gateways
                if not (self.live_filters_paused and g.paused)
            ]
            return "0x" + encode([GATEWAY_TUPLE], [rows]).hex()
        return "0x"  # no such function: empty return data, as a node answers it


def aliased_gateways(count: int, entry: Entry) -> bytes:
    """``getActiveGatewaysLive()`` return data listing ``entry`` ``count`` times, each element
    offset pointing at the one encoding of it: megabytes that decode as ``count`` entries."""
    one = encode([GATEWAY_TUPLE[:-2]],
                 [(entry.owner, entry.id, entry.registered_at, entry.metadata, entry.paused)])
    tail = one[32:]  # the tuple without its own top-level offset

    def word(value: int) -> bytes:
        return value.to_bytes(32, "big")

    return word(32) + word(count) + word(count * 32) * count + tail


GATEWAY_TUPLE = "(address,bytes,uint256,string,bool)[]"
