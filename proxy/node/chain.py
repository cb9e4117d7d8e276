"""Reading the network's contracts: JSON-RPC ``eth_call``, ABI-encoded with eth-abi.

Only what node mode reads is described here, as function signatures (facts of the deployed
contracts, from the network's published ABIs)::

    Router.gatewayRegistry() -> address
    GatewayRegistry.getActiveGatewaysLive()
        -> (address owner, bytes id, uint256 registeredAt, string metadata, bool paused)[]

Every failure (transport, timeout, a JSON-RPC error, an answer that does not decode) is a
``ChainError`` whose message names what failed and never quotes more than a bounded excerpt.
A large answer is decoded off the event loop: ABI offsets may alias one entry many times, so
a few megabytes can hold a hundred thousand entries, seconds of pure-Python decoding.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import aiohttp
import orjson

from proxy.errors import reason

#: Four-byte selectors: keccak256 of the signature, first four bytes (checked in the tests).
GATEWAY_REGISTRY_SELECTOR = bytes.fromhex("d693452e")  # gatewayRegistry()
ACTIVE_GATEWAYS_SELECTOR = bytes.fromhex("7404af6a")  # getActiveGatewaysLive()
GATEWAY_TUPLE = "(address,bytes,uint256,string,bool)[]"
#: A registry answer larger than this is refused rather than decoded.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
#: Answers larger than this are parsed and decoded in a worker thread.
OFF_LOOP_BYTES = 64 * 1024
_ADDRESS_TEXT = re.compile(r"0[xX][0-9a-fA-F]{40}")
T = TypeVar("T")


class ChainError(Exception):
    """A contract read failed; ``reason`` is a fixed word, safe as a metric label."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Gateway(NamedTuple):
    owner: str
    id: bytes
    registered_at: int
    metadata: str
    paused: bool


class Chain:
    """``eth_call`` against one JSON-RPC endpoint, through the application's client session."""

    def __init__(self, session: aiohttp.ClientSession, rpc_url: str, *, timeout: float) -> None:
        self._session = session
        self._url = rpc_url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._id = 0

    async def call(self, to: str, data: bytes) -> bytes:
        """The return data of ``eth_call`` at the latest block."""
        self._id += 1
        request = {
            "jsonrpc": "2.0",
            "id": self._id,
            "method": "eth_call",
            "params": [{"to": to, "data": "0x" + data.hex()}, "latest"],
        }
        try:
            async with self._session.post(
                self._url,
                data=orjson.dumps(request),
                headers={"Content-Type": "application/json"},
                timeout=self._timeout,
            ) as response:
                if response.status != 200:
                    raise ChainError(f"JSON-RPC answered HTTP {response.status}", reason="http")
                raw = await read_capped(response, MAX_ANSWER_BYTES)
        except TimeoutError as exc:  # before OSError, of which it is a subclass
            raise ChainError("JSON-RPC timed out", reason="timeout") from exc
        except (aiohttp.ClientError, OSError) as exc:
            message = f"JSON-RPC unreachable: {reason(exc)}"
            raise ChainError(message, reason="unreachable") from exc
        if raw is None:
            raise ChainError("JSON-RPC answer is too large", reason="malformed")
        return await _off_loop(_result, raw, len(raw))

    async def gateway_registry(self, router: str) -> str:
        """The GatewayRegistry address the Router points to."""
        from eth_abi.abi import decode

        data = await self.call(router, GATEWAY_REGISTRY_SELECTOR)
        try:
            (address,) = decode(["address"], data)
        except Exception as exc:  # eth-abi raises several unrelated types for bad data
            raise ChainError("Router.gatewayRegistry() did not decode", reason="malformed") from exc
        return str(address)

    async def active_gateways(self, registry: str) -> list[Gateway]:
        data = await self.call(registry, ACTIVE_GATEWAYS_SELECTOR)
        return await _off_loop(_decode_gateways, data, len(data))


def _decode_gateways(data: bytes) -> list[Gateway]:
    from eth_abi.abi import decode

    try:
        (rows,) = decode([GATEWAY_TUPLE], data)
        return [Gateway(str(o), bytes(i), int(r), str(m), bool(p)) for o, i, r, m, p in rows]
    except Exception as exc:
        raise ChainError(
            "GatewayRegistry.getActiveGatewaysLive() did not decode", reason="malformed"
        ) from exc


async def _off_loop(work: Callable[[bytes], T], data: bytes, size: int) -> T:
    """``work(data)``, in a worker thread when ``size`` is large enough to stall the loop."""
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(work, data)
    return work(data)


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or ``None`` as soon as it is known to exceed ``limit`` bytes."""
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _result(raw: bytes) -> bytes:
    try:
        answer: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ChainError("JSON-RPC answer is not JSON", reason="malformed") from exc
    if not isinstance(answer, dict):
        raise ChainError("JSON-RPC answer is not an object", reason="malformed")
    error = answer.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else None
        text = message[:200] if isinstance(message, str) else "no message"
        raise ChainError(f"JSON-RPC error: {text}", reason="rpc_error")
    result = answer.get("result")
    if not isinstance(result, str) or not result.startswith("0x"):
        raise ChainError("JSON-RPC result is not 0x-prefixed hex", reason="malformed")
    try:
        return bytes.fromhex(result[2:])
    except ValueError as exc:
        raise ChainError("JSON-RPC result is not hex", reason="malformed") from exc


def gateway_address(gateway: Gateway) -> str | None:
    """The signer address a registry entry vouches for, or ``None``.

    The reference node trusts a caller whose ``X-Address`` equals the entry's ``id`` read as
    text, so ids are the gateways' addresses as ``0x...`` text; a raw 20-byte id is read as
    an address too. Any other id names no signer. Paused entries vouch for no one.
    """
    if gateway.paused:
        return None
    raw = gateway.id
    if len(raw) == 20:
        return "0x" + raw.hex()
    if len(raw) == 42:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        # exactly 0x and 40 hex digits (bytes.fromhex would let whitespace through)
        if _ADDRESS_TEXT.fullmatch(text):
            return text
    return None
