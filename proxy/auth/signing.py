"""Function Network request signatures: sign outbound jobs, verify inbound ones.

The scheme, as the network's nodes and gateways use it::

    message   = hex(sha256(body)) + "." + timestamp + "." + nonce
    signature = EIP-191 personal-sign(message), secp256k1, 65 bytes r || s || v, v in {27, 28}

carried in four headers: ``X-Address`` (checksummed address of the signer), ``X-Signature``,
``X-Timestamp`` (Unix seconds, decimal) and ``X-Nonce`` (a random string). The body hash is
lower-case hex of the exact bytes on the wire.

Wire details, matched to the network's reference node: the signature is emitted as 130
lower-case hex digits **without** a ``0x`` prefix (the reference verifier decodes plain hex
and would refuse a prefix); on input both forms are accepted. ``v`` must be 27 or 28 (the
reference verifier also takes the raw 0/1 form; no signer on the network emits it, so it is
refused here as ``bad_v`` rather than silently treated as equivalent).

All cryptography is eth-account's / eth-keys'. Key material is never put into a message,
repr or exception chain: errors about keys are raised ``from None`` on purpose, because the
library errors they replace can quote their input.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from multidict import MultiMapping

from proxy.auth.nonces import NonceCache
from proxy.errors import Unauthorized, reason

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

# eth-account and eth-keys take about a second to import, so they are imported where they
# are used: only configs that sign or verify pay for them, not every start of the CLI.

HEADER_ADDRESS = "X-Address"
HEADER_SIGNATURE = "X-Signature"
HEADER_TIMESTAMP = "X-Timestamp"
HEADER_NONCE = "X-Nonce"
#: The signature headers, in the order they are checked; never forwarded to a non-fxn upstream.
SIGNATURE_HEADERS: tuple[str, ...] = (
    HEADER_ADDRESS,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    HEADER_NONCE,
)

#: Every ``Unauthorized.code`` the verifier raises: a fixed set, safe as a metric label.
REASONS: frozenset[str] = frozenset(
    {
        "missing_header",
        "duplicate_header",
        "bad_address",
        "bad_timestamp",
        "bad_nonce",
        "bad_hex",
        "bad_length",
        "bad_v",
        "unknown_address",
        "bad_signature",
        "stale",
        "future",
        "replayed",
        "replay_cache_full",
        "before_start",
    }
)

_ADDRESS_RE = re.compile(r"0[xX][0-9a-fA-F]{40}")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")
_TIMESTAMP_RE = re.compile(r"[0-9]{1,15}")
# Printable ASCII without space: what random-string nonces are made of, and nothing that could
# smuggle control characters into logs. The cap bounds the replay cache's memory per entry.
_NONCE_RE = re.compile(r"[\x21-\x7e]{1,128}")
#: secp256k1's group order (SEC 2, section 2.4.1); checked against eth-keys in the tests.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N = SECP256K1_N // 2


def signing_message(body: bytes, timestamp: str, nonce: str) -> str:
    """The text that is personal-signed for ``body`` sent at ``timestamp`` with ``nonce``."""
    return f"{hashlib.sha256(body).hexdigest()}.{timestamp}.{nonce}"


def eip191_digest(message: str) -> bytes:
    """The 32-byte EIP-191 (personal-sign) hash of ``message``: what the key actually signs."""
    from eth_account.messages import defunct_hash_message

    return bytes(defunct_hash_message(text=message))


def _new_nonce() -> str:
    return secrets.token_hex(16)


class Signer:
    """Signs outbound requests with one secp256k1 key.

    ``headers(body)`` returns the four signature headers for exactly those body bytes, with a
    fresh timestamp and nonce on every call, so a retried attempt is never a replay. The key is
    held only inside the eth-account object; ``repr`` shows the address alone.
    """

    __slots__ = ("_account", "_clock")

    def __init__(self, private_key: str | bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._account = _load_account(private_key)
        self._clock = clock

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> Signer:
        """Load a key file: the JSON written by :func:`generate_key_file` (the reference node's
        ``nodekey.json`` layout, only ``private_key`` is read) or a file holding just the hex key.
        Raises ``ValueError`` naming the file, never quoting its content."""
        name = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read key file {name}: {reason(exc)}") from None
        try:
            return cls.from_text(text, clock=clock)
        except ValueError as exc:
            raise ValueError(f"key file {name}: {exc}") from None

    @classmethod
    def from_text(cls, text: str, *, clock: Callable[[], float] = time.time) -> Signer:
        """Load a key given as text: 64 hex digits (``0x`` optional) or a key file's JSON.
        Raises ``ValueError`` that never quotes the text."""
        text = text.strip()
        if text[:1] in ("{", "["):
            text = _key_from_json(text)
        return cls(text, clock=clock)

    @property
    def address(self) -> str:
        """The checksummed address that verifiers allow-list."""
        return str(self._account.address)

    @property
    def public_key(self) -> bytes:
        """The uncompressed public key, 65 bytes ``0x04 || X || Y``."""
        from eth_keys.datatypes import PrivateKey

        return b"\x04" + PrivateKey(bytes(self._account.key)).public_key.to_bytes()

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte hash as it is (no EIP-191 prefix): 65 bytes ``r || s || v``, v in
        {0, 1}, low s (what the reference node's IDENTITY answer carries)."""
        if len(digest) != 32:
            raise ValueError("the digest must be 32 bytes")
        from eth_keys.datatypes import PrivateKey

        signature = PrivateKey(bytes(self._account.key)).sign_msg_hash(digest)
        return bytes(signature.to_bytes())

    def headers(
        self, body: bytes, *, timestamp: str | None = None, nonce: str | None = None
    ) -> dict[str, str]:
        """The signature headers for ``body``; ``timestamp``/``nonce`` default to now / random."""
        ts = str(int(self._clock())) if timestamp is None else timestamp
        nc = _new_nonce() if nonce is None else nonce
        # Never emit what a verifier (ours included) is bound to refuse.
        if not _TIMESTAMP_RE.fullmatch(ts):
            raise ValueError("timestamp must be Unix seconds in decimal digits")
        if not _NONCE_RE.fullmatch(nc):
            raise ValueError("nonce must be 1 to 128 printable ASCII characters without spaces")
        from eth_account.messages import encode_defunct

        signed = self._account.sign_message(encode_defunct(text=signing_message(body, ts, nc)))
        return {
            HEADER_ADDRESS: self.address,
            HEADER_SIGNATURE: bytes(signed.signature).hex(),
            HEADER_TIMESTAMP: ts,
            HEADER_NONCE: nc,
        }

    def __repr__(self) -> str:
        return f"Signer(address={self.address})"

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would copy the key somewhere we cannot see (a process pool, a cache).
        raise TypeError("Signer holds a private key and cannot be pickled")


def _key_from_json(text: str) -> str:
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError("the key is not valid JSON") from None
    key = document.get("private_key") if isinstance(document, dict) else None
    if isinstance(key, str):
        return key
    raise ValueError('the key JSON has no "private_key" string')


def _load_account(private_key: str | bytes) -> LocalAccount:
    from eth_account import Account

    if isinstance(private_key, str):
        text = private_key.strip()
        text = text[2:] if text[:2] in ("0x", "0X") else text
        if len(text) != 64 or not _HEX_RE.fullmatch(text):
            raise ValueError("private key must be 32 bytes as 64 hex digits (0x prefix optional)")
        raw = bytes.fromhex(text)
    else:
        raw = bytes(private_key)
        if len(raw) != 32:
            raise ValueError("private key must be 32 bytes")
    if not 0 < int.from_bytes(raw, "big") < SECP256K1_N:
        raise ValueError("private key is out of range for secp256k1")
    # Validated above, so eth-account has nothing left to refuse (its messages could quote
    # the key if it did).
    account: LocalAccount = Account.from_key(raw)
    return account


def generate_key_file(path: str | os.PathLike[str]) -> str:
    """Write a new random key to ``path`` (mode 0600, JSON with ``address``, ``public_key`` and
    ``private_key``, as the reference node's ``nodekey.json``) and return its checksummed address.

    Refuses to overwrite or follow a symlink (``FileExistsError``); the file is created with its
    final permissions, so the key is never readable by others, not even for a moment.
    """
    from eth_account import Account
    from eth_keys.datatypes import PrivateKey

    account: LocalAccount = Account.create()
    public_key = PrivateKey(bytes(account.key)).public_key.to_bytes()
    document = {
        "public_key": "04" + public_key.hex(),
        "address": str(account.address),
        "private_key": bytes(account.key).hex(),
    }
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only remove bits; make the mode exact anyway
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            handle.write(json.dumps(document, indent=2) + "\n")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(path).unlink(missing_ok=True)
        raise
    return str(account.address)


class AllowList:
    """A set of signer addresses that can be replaced whole while verifiers use it.

    Node mode keeps its allow-lists here (the chain's gateways, the scheduler); a
    :class:`Verifier` given one as ``live`` sees every ``replace`` at once, with no lock: the
    new frozenset is swapped in by one assignment. Addresses are validated and kept lower-case.
    """

    __slots__ = ("addresses",)

    def __init__(self, addresses: Iterable[str] = ()) -> None:
        self.addresses: frozenset[str] = _normalised(addresses)

    def replace(self, addresses: Iterable[str]) -> None:
        self.addresses = _normalised(addresses)

    def __contains__(self, address: object) -> bool:
        return address in self.addresses

    def __len__(self) -> int:
        return len(self.addresses)

    def __iter__(self) -> Iterator[str]:
        return iter(self.addresses)


def _normalised(addresses: Iterable[str]) -> frozenset[str]:
    allowed: set[str] = set()
    for index, address in enumerate(addresses):
        if not isinstance(address, str) or not _ADDRESS_RE.fullmatch(address):
            raise ValueError(f"allowed address #{index} is not 0x followed by 40 hex digits")
        allowed.add(address.lower())
    return frozenset(allowed)


class Verifier:
    """Checks inbound signature headers against an allow-list of addresses.

    ``verify(headers, body)`` returns the signer's checksummed address or raises
    ``Unauthorized`` whose ``code`` is one of :data:`REASONS` (a fixed set, for metrics) and
    whose message says precisely what was wrong without echoing the request. ``body`` must be
    the exact bytes received. Cheap checks (presence, format, allow-list, window) run before the
    public-key recovery, and a nonce is remembered only once its signature has verified, so
    unsigned traffic can neither cost much nor fill the replay cache.

    ``addresses`` is a fixed list; ``live``, an :class:`AllowList` whose current content is
    read on every request besides it (node mode: the chain's gateways and the scheduler; it
    may be empty for a while). One of the two must be given.
    ``window`` is the accepted clock difference in seconds; ``math.inf`` checks no timestamp
    at all (the reference node's behaviour): replays are then refused by the nonce cache alone,
    which, once full, refuses timestamps older than what it forgot (``replay_cache_full``).
    """

    __slots__ = ("_allowed", "_clock", "_live", "_nonces", "window")

    def __init__(
        self,
        addresses: Iterable[str],
        *,
        live: AllowList | None = None,
        window: float = 300.0,
        max_nonces: int = 100_000,
        clock: Callable[[], float] = time.time,
        nonces: NonceCache | None = None,
    ) -> None:
        self._live = live
        self._allowed = _normalised(addresses)
        if live is None and not self._allowed:
            raise ValueError("the allow-list of signer addresses is empty")
        if not window > 0:
            raise ValueError("the timestamp window must be positive (math.inf: no window)")
        self.window = window
        if nonces is None:
            nonces = NonceCache(window, max_nonces)
        else:  # a reloaded config keeps what the old one saw, so nothing can be replayed
            nonces.retune(window, max_nonces)
        self._nonces = nonces
        self._clock = clock

    @property
    def nonces(self) -> NonceCache:
        return self._nonces

    def precheck(self, headers: Mapping[str, str]) -> None:
        """Run every check that needs no body (all but the signature itself), so a caller can
        refuse a request before reading its body. ``verify`` repeats them; this is optional."""
        self._claim(headers)

    def verify(self, headers: Mapping[str, str], body: bytes, *, remember: bool = True) -> str:
        """Authenticate one request; see the class docstring for the contract.

        ``remember=False`` leaves the nonce unrecorded, for a caller that claims it in a
        shared store itself (``proxy.auth.shared_nonces``) once this has returned."""
        claim = self._claim(headers)
        from eth_account import Account
        from eth_account.messages import encode_defunct
        from eth_keys.exceptions import BadSignature
        from eth_utils.exceptions import ValidationError

        message = encode_defunct(text=signing_message(body, claim.timestamp_text, claim.nonce))
        try:
            recovered = str(Account.recover_message(message, signature=claim.signature))
        except (BadSignature, ValidationError, ValueError) as exc:
            raise Unauthorized(
                f"{HEADER_SIGNATURE} does not recover to a public key",
                code="bad_signature",
            ) from exc
        if recovered.lower() != claim.address:
            raise Unauthorized(
                f"{HEADER_SIGNATURE} does not match {HEADER_ADDRESS} "
                "for this body, timestamp and nonce",
                code="bad_signature",
            )
        if remember:
            self._nonces.add((claim.address, claim.nonce), claim.timestamp)
        return recovered

    def _claim(self, headers: Mapping[str, str]) -> _Claim:
        address, timestamp_text, nonce, signature = _claimed(headers)
        address = address.lower()
        live = self._live
        if address not in self._allowed and (live is None or address not in live.addresses):
            raise Unauthorized(f"{HEADER_ADDRESS} is not an allowed signer", code="unknown_address")
        timestamp = int(timestamp_text)
        self._check_time(timestamp)
        if (address, nonce) in self._nonces:
            raise Unauthorized(f"{HEADER_NONCE} was already used by this signer", code="replayed")
        if not self._nonces.covers(timestamp):
            raise Unauthorized(
                f"{HEADER_TIMESTAMP} is older than the replay cache can vouch for "
                "while it is full; sign again with a current timestamp",
                code="replay_cache_full",
            )
        return _Claim(address, timestamp, timestamp_text, nonce, signature)

    def _check_time(self, timestamp: int) -> None:
        """Refuse a timestamp outside the window, or from before the replay cache begins."""
        now = self._clock()
        self._nonces.expire(now)
        if now - timestamp > self.window:  # never true for math.inf: no window
            raise Unauthorized(
                f"{HEADER_TIMESTAMP} is {int(now - timestamp)} s old; "
                f"the window is {self.window:g} s",
                code="stale",
            )
        if timestamp - now > self.window:
            raise Unauthorized(
                f"{HEADER_TIMESTAMP} is {int(timestamp - now)} s in the future; "
                f"the window is {self.window:g} s",
                code="future",
            )
        if timestamp < self._nonces.not_before:  # whole seconds: signed at or after it
            raise Unauthorized(
                f"{HEADER_TIMESTAMP} is from before this node started (its replay cache "
                "starts empty); sign again with a current timestamp",
                code="before_start",
            )


def _claimed(headers: Mapping[str, str]) -> tuple[str, str, str, bytes]:
    """The signature headers' address, timestamp, nonce and signature, checked for form."""
    values: dict[str, str] = {}
    for name in SIGNATURE_HEADERS:
        value = headers.get(name)
        if not value:
            raise Unauthorized(f"missing {name} header", code="missing_header")
        # Two copies of a header could be read differently by us and by whoever signed.
        if isinstance(headers, MultiMapping) and len(headers.getall(name, ())) > 1:
            raise Unauthorized(f"{name} is given more than once", code="duplicate_header")
        values[name] = value
    address, timestamp_text = values[HEADER_ADDRESS], values[HEADER_TIMESTAMP]
    nonce = values[HEADER_NONCE]
    if not _ADDRESS_RE.fullmatch(address):
        raise Unauthorized(
            f"{HEADER_ADDRESS} must be 0x followed by 40 hex digits",
            code="bad_address",
        )
    if not _TIMESTAMP_RE.fullmatch(timestamp_text):
        raise Unauthorized(
            f"{HEADER_TIMESTAMP} must be Unix seconds in decimal digits",
            code="bad_timestamp",
        )
    if not _NONCE_RE.fullmatch(nonce):
        raise Unauthorized(
            f"{HEADER_NONCE} must be 1 to 128 printable ASCII characters without spaces",
            code="bad_nonce",
        )
    return address, timestamp_text, nonce, _decode_signature(values[HEADER_SIGNATURE])


class _Claim(NamedTuple):
    """What the headers say, checked for form, allow-list, window and replay."""

    address: str  # lower-case
    timestamp: int
    timestamp_text: str
    nonce: str
    signature: bytes


def _decode_signature(text: str) -> bytes:
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    if not _HEX_RE.fullmatch(digits) or len(digits) % 2:
        raise Unauthorized(f"{HEADER_SIGNATURE} is not hex", code="bad_hex")
    if len(digits) != 130:
        raise Unauthorized(
            f"{HEADER_SIGNATURE} must be 65 bytes (130 hex digits), got {len(digits) // 2}",
            code="bad_length",
        )
    signature = bytes.fromhex(digits)
    if signature[64] not in (27, 28):
        raise Unauthorized(f"{HEADER_SIGNATURE} recovery byte v must be 27 or 28", code="bad_v")
    # A high-s twin of a valid signature verifies too; every honest signer emits low s
    # (EIP-2), so refusing the twin keeps one valid encoding per signed message.
    if int.from_bytes(signature[32:64], "big") > _HALF_N:
        raise Unauthorized(f"{HEADER_SIGNATURE} is not canonical (high s)", code="bad_signature")
    return signature
