"""Reading the network's contracts: JSON-RPC ``eth_call``, ABI-encoded with eth-abi.

Only what node mode reads is described here, as function signatures (facts of the deployed
contracts, from the network's published ABIs)::

    Router.gatewayRegistry() -> address
    GatewayRegistry.getActiveGatewaysLive()
        -> (address owner, bytes id, uint256 registeredAt, string metadata, bool paused)[]

Every failure (transport, timeout, a JSON-RPC error, an answer that does not decode) is a
``ChainError`` whose message names what failed and never quotes more than a bounded excerpt.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import aiohttp
import orjson

#: Four-byte selectors: keccak256 of the signature, first four bytes (checked in the tests).
GATEWAY_REGISTRY_SELECTOR = bytes.fromhex("d693452e")  # gatewayRegistry()
ACTIVE_GATEWAYS_SELECTOR = bytes.fromhex("7404af6a")  # getActiveGatewaysLive()
GATEWAY_TUPLE = "(address,bytes,uint256,string,bool)[]"
#: A registry answer larger than this is refused rather than decoded.
MAX_ANSWER_BYTES = 8 * 1024 * 1024


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
            message = f"JSON-RPC unreachable: {type(exc).__name__}"
            raise ChainError(message, reason="unreachable") from exc
        if raw is None:
            raise ChainError("JSON-RPC answer is too large", reason="malformed")
        return _result(raw)

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
        from eth_abi.abi import decode

        data = await self.call(registry, ACTIVE_GATEWAYS_SELECTOR)
        try:
            (rows,) = decode([GATEWAY_TUPLE], data)
            return [Gateway(str(o), bytes(i), int(r), str(m), bool(p)) for o, i, r, m, p in rows]
        except Exception as exc:
            raise ChainError(
                "GatewayRegistry.getActiveGatewaysLive() did not decode", reason="malformed"
            ) from exc


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
        if text[:2] in ("0x", "0X"):
            try:
                bytes.fromhex(text[2:])
            except ValueError:
                return None
            return text
    return None
