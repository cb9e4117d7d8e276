"""``auth:``: inbound API keys and Function Network request signatures.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
)

from proxy.config.sections import _API_KEY, Seconds, Section

_ADDRESS = re.compile(r"0[xX][0-9a-fA-F]{40}")


def _address_text(value: Any) -> Any:
    """Refuse an address YAML has read as a number, saying why (validators run it first)."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            "write the address in quotes ('0x...'): unquoted, YAML reads 0x... as a number"
        )
    if isinstance(value, str) and not _ADDRESS.fullmatch(value):
        raise ValueError("must be 0x followed by 40 hex digits")
    return value


class FxnSignaturesSection(Section):
    """Inbound Function Network request signatures (``proxy.auth.signing``)."""

    #: Addresses of the gateways/schedulers whose signed requests are accepted (any case).
    #: Required unless ``node:`` is set (then the scheduler, and the chain's gateways, are
    #: allowed besides these).
    allowed_addresses: tuple[str, ...] = ()
    #: Accepted clock difference, in seconds, between the signer and this node; 0 checks no
    #: timestamp at all (the reference node's behaviour; the nonce cache alone stops replays).
    window: Seconds = 300.0
    #: Most nonces remembered at once; when full, the accepted window narrows (no replays).
    #: For the ``memory`` store only.
    nonce_cache_size: int = Field(100_000, ge=1)
    #: Where used nonces are remembered: ``journal`` (the default: memory, and a file in
    #: ``state_dir`` that a restart reads back, ``proxy.auth.journal``), ``memory`` (this
    #: process only: a restart refuses what was signed before it) or a Redis URL
    #: (``redis://``, ``rediss://``, ``unix://``) that every replica shares, so a signed job
    #: replayed to another replica is refused too (``proxy.auth.shared_nonces``). The URL may
    #: hold a password, so it is kept as a secret (``nonce_store_file`` reads it from a file).
    #: ``None`` means ``journal``.
    nonce_store: SecretStr | None = None
    #: The directory of the nonce journal. Unset: ``$MODEL_PROXY_STATE_DIR`` (the image sets
    #: /var/lib/model-proxy), else the directory of the config file.
    state_dir: str | None = Field(None, min_length=1)

    @field_validator("nonce_store", mode="before")
    @classmethod
    def _journal_is_default(cls, value: Any) -> Any:
        return None if value == "journal" else value

    @field_validator("nonce_store")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() != "memory":
            scheme = value.get_secret_value().partition("://")[0].lower()
            if scheme not in ("redis", "rediss", "unix"):  # the message never quotes the URL
                raise ValueError(
                    "must be journal, memory or a redis://, rediss:// or unix:// URL")
        return value

    @property
    def redis_url(self) -> str | None:
        """The shared store's URL, if the nonces are kept in Redis."""
        store = self.nonce_store
        url = None if store is None else store.get_secret_value()
        return None if url in (None, "memory") else url

    @property
    def journaled(self) -> bool:
        """Whether the nonces are kept in a journal (``nonce_store: journal``, the default)."""
        return self.nonce_store is None

    @field_validator("allowed_addresses", mode="before")
    @classmethod
    def _addresses(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            for i, address in enumerate(value):
                try:
                    _address_text(address)
                except ValueError as exc:
                    raise ValueError(f"[{i}] {exc}") from None
        return value

    @property
    def window_seconds(self) -> float:
        """The window as the verifier takes it: ``math.inf`` for ``window: 0``."""
        return self.window or float("inf")


class AuthSection(Section):
    mode: Literal["any", "all"] = "any"
    api_keys: tuple[SecretStr, ...] = ()
    fxn_signatures: FxnSignaturesSection | None = None
    allow_unauthenticated: bool = False

    @field_validator("api_keys")
    @classmethod
    def _header_safe(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for i, key in enumerate(value):  # the message names the position, never the key
            if not _API_KEY.fullmatch(key.get_secret_value()):
                raise ValueError(
                    f"[{i}] must be 1 to 512 printable ASCII characters without spaces"
                )
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or self.fxn_signatures is not None
