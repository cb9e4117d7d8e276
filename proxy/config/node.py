"""``node:`` (facing the Function Network as a node: its key, the chain) and ``fxn:`` (the key
that signs outbound requests).
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    field_validator,
)

from proxy.config.auth import _address_text
from proxy.config.sections import PositiveSeconds, Section


class FxnSection(Section):
    #: Key that signs outbound requests to the Function Network: 64 hex digits, or (through
    #: ``private_key_file``) a file with them or a ``model-proxy keygen`` / node key JSON.
    private_key: SecretStr | None = None

    @field_validator("private_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from proxy.auth.signing import Signer  # eth-account loads only for fxn configs

            Signer.from_text(value.get_secret_value())  # its errors never quote the key
        return value


class ChainSection(Section):
    """Where node mode reads the network's gateways: JSON-RPC ``eth_call`` on the Router."""

    rpc_url: str
    router_address: str
    #: Seconds between two reads of the gateway registry; the last good list stays meanwhile.
    refresh: PositiveSeconds = 60.0
    #: Seconds one JSON-RPC call may take.
    timeout: PositiveSeconds = 10.0

    @field_validator("rpc_url")
    @classmethod
    def _rpc_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// JSON-RPC URL")
        return value

    @field_validator("router_address", mode="before")
    @classmethod
    def _router(cls, value: Any) -> Any:
        return _address_text(value)


class NodeSection(Section):
    """Node mode: answer the Function Network as its node does (``proxy.node``).

    Serves ``POST /challenge`` (scheduler-signed) and ``GET /health``, and accepts signed
    ``/v1/*`` requests from the scheduler and from the gateways the chain lists (besides any
    ``auth.fxn_signatures.allowed_addresses``).
    """

    #: The node's identity: a key file in ``nodekey.json`` layout (``model-proxy keygen``).
    key_file: str = Field(min_length=1)
    scheduler_address: str
    #: Without it only the scheduler and ``auth.fxn_signatures.allowed_addresses`` are trusted.
    chain: ChainSection | None = None
    #: The public IP that IDENTITY reports: an address, or an http(s) URL answering it as text
    #: (behind NAT the node cannot see it itself). The reference node asks api.ipify.org.
    public_ip: str = "https://api.ipify.org"
    #: Largest matrix dimension MATRIX_MULTIPLICATION accepts; larger is a 400.
    max_matrix_size: int = Field(4096, ge=1, le=16384)
    #: Most elements in each of A, B and the product (2048 x 2048); more is a 400.
    max_matrix_elements: int = Field(2048 * 2048, ge=1, le=16384 * 16384)
    #: Most flops (2 x rows x inner x columns) one multiplication may take (2 x 2048^3, about
    #: a second on two CPU cores); more is a 400. Raise both on a node with a GPU.
    max_matrix_flops: int = Field(2 * 2048**3, ge=1, le=2 * 16384**3)

    @field_validator("scheduler_address", mode="before")
    @classmethod
    def _scheduler(cls, value: Any) -> Any:
        return _address_text(value)

    @field_validator("public_ip")
    @classmethod
    def _public_ip(cls, value: str) -> str:
        if value.startswith(("http://", "https://")):
            if not urlsplit(value).hostname:
                raise ValueError("the URL has no host")
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                "must be an IP address or an http(s):// URL that answers one"
            ) from None
        return value
