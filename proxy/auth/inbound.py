"""Inbound authentication: API keys and Function Network request signatures, as one layer.

``auth.api_keys`` accepts ``Authorization: Bearer <key>`` or ``x-api-key: <key>``; keys are
kept only as SHA-256 digests and every configured key is compared in constant time, so
neither timing nor an early exit tells which key (or how much of one) was right.
``auth.fxn_signatures`` checks the network's request signatures (``proxy.auth.signing``).
``auth.mode`` says whether either kind suffices (``any``) or every configured kind is needed
(``all``). The server decides which paths need none (``Runtime.public_paths``).

Every refusal is ``Unauthorized`` whose ``code`` is a reason from a fixed set, counted in
``model_proxy_auth_failures{reason}``; messages never echo what the client sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from multidict import CIMultiDictProxy

from proxy.auth.nonces import NonceCache
from proxy.auth.shared_nonces import RedisNonces
from proxy.auth.signing import (
    HEADER_NONCE,
    HEADER_TIMESTAMP,
    SIGNATURE_HEADERS,
    AllowList,
    Verifier,
)
from proxy.auth.signing import REASONS as SIGNATURE_REASONS
from proxy.config import AuthSection, BaseConfig, FxnSignaturesSection
from proxy.errors import ConfigError, Unauthorized

log = logging.getLogger("model_proxy")

#: Every reason a refusal can carry (the ``reason`` label of the failure counter).
REASONS = SIGNATURE_REASONS | {"missing_credentials", "missing_api_key", "bad_api_key"}

class Authenticator:
    """Decides whether a request may pass, for one ``auth`` section.

    ``check(request)`` returns normally or raises ``Unauthorized`` (``code`` in
    :data:`REASONS`). The body is read (within ``limits.max_body_bytes``) only when a
    signature has to be verified, and only after the checks that need no body have passed.
    ``allowed`` (node mode's live allow-list) is trusted besides
    ``fxn_signatures.allowed_addresses``.
    """

    __slots__ = ("_accepted", "_digests", "mode", "shared", "verifier")

    def __init__(
        self,
        section: AuthSection,
        *,
        nonces: NonceCache | None = None,
        shared: RedisNonces | None = None,
        clock: Callable[[], float] = time.time,
        allowed: AllowList | None = None,
    ) -> None:
        self.mode = section.mode
        #: The nonce store every replica shares, if configured; else ``verifier``'s own cache.
        self.shared = shared
        self._digests = tuple(_digest(key.get_secret_value()) for key in section.api_keys)
        #: Keys that have matched (at most one per configured key), so that a client's next
        #: request skips the hashing. A dict lookup tells nothing of a key it does not hold:
        #: strings are compared only on equal (per-process keyed) hashes.
        self._accepted: set[str] = set()
        signatures = section.fxn_signatures
        self.verifier = (
            None
            if signatures is None
            else Verifier(
                signatures.allowed_addresses,
                live=allowed,
                window=signatures.window_seconds,
                max_nonces=signatures.nonce_cache_size,
                clock=clock,
                nonces=nonces,
            )
        )

    async def check(
        self, headers: CIMultiDictProxy[str], body: Callable[[], Awaitable[bytes]]
    ) -> None:
        failures: list[Unauthorized] = []
        if self._digests:
            try:
                self._check_api_key(headers)
            except Unauthorized as exc:
                if self.mode == "all":
                    raise
                failures.append(exc)
            else:
                if self.mode == "any":
                    return
        if self.verifier is not None:
            try:
                self.verifier.precheck(headers)
                shared = self.shared
                if shared is None:
                    self.verifier.verify(headers, await body())
                else:
                    signer = self.verifier.verify(headers, await body(), remember=False)
                    # Unavailable (Redis down) is not a credential failure: it goes past
                    # mode any's alternatives to the client as a 503
                    if not await shared.claim(signer.lower(), headers[HEADER_NONCE],
                                              int(headers[HEADER_TIMESTAMP]),
                                              self.verifier.window):
                        raise Unauthorized(f"{HEADER_NONCE} was already used by this signer",
                                           code="replayed")
            except Unauthorized as exc:
                failures.append(exc)
            else:
                return
        if not failures:
            return
        raise _most_telling(failures, headers)

    def check_keys(self, headers: CIMultiDictProxy[str]) -> None:
        """The whole check when only API keys are configured (no body needed)."""
        self._check_api_key(headers)

    def _check_api_key(self, headers: CIMultiDictProxy[str]) -> None:
        # The usual request: one "Authorization: Bearer <a key already accepted>" and no
        # x-api-key. Anything else (spacing, case, both headers, a key not seen yet) takes
        # the whole way below, which would accept it too.
        authorization = headers.getall("Authorization", ())
        if (len(authorization) == 1 and authorization[0].startswith("Bearer ")
                and authorization[0][7:] in self._accepted and "x-api-key" not in headers):
            return
        presented: list[str] = []
        for name in ("Authorization", "x-api-key"):
            values = headers.getall(name, ())
            if not values:
                continue
            if len(values) > 1:
                raise Unauthorized(f"{name} is given more than once", code="duplicate_header")
            if name == "Authorization":
                scheme, _, token = values[0].partition(" ")
                token = token.strip()
                if token and scheme.lower() == "bearer":
                    presented.append(token)
            else:
                presented.append(values[0])
        if not presented:
            raise Unauthorized(
                "missing API key: send Authorization: Bearer <key> or x-api-key: <key>",
                code="missing_api_key",
            )
        accepted = self._accepted
        for token in presented:
            if token in accepted:
                return
        matched = False
        for token in presented:
            digest = _digest(token)
            hit = False
            for known in self._digests:  # no early exit: every key costs the same
                hit |= hmac.compare_digest(digest, known)
            if hit and len(accepted) < len(self._digests):
                accepted.add(token)
            matched |= hit
        if not matched:
            raise Unauthorized("invalid API key", code="bad_api_key")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _most_telling(failures: list[Unauthorized], headers: Mapping[str, str]) -> Unauthorized:
    """With ``mode: any`` and everything failed: the failure of what the client tried."""
    if any(name in headers for name in SIGNATURE_HEADERS):
        signature = [f for f in failures if f.code in SIGNATURE_REASONS]
        if signature:
            return signature[0]
    tried_key = [f for f in failures if f.code not in ("missing_api_key", "missing_header")]
    if tried_key:
        return tried_key[0]
    if len(failures) > 1:
        return Unauthorized(
            "missing credentials: send an API key (Authorization: Bearer or x-api-key) "
            "or Function Network signature headers",
            code="missing_credentials",
        )
    return failures[0]


class AuthState:
    """The authenticator for the current ``auth`` section, rebuilt when the section changes.

    One nonce cache outlives every rebuild, so a reloaded config cannot reopen the window
    for replays of requests the previous one accepted; so does the shared store's client
    while its URL stays the same (one replaced by a reload is closed by :meth:`close`). Every
    refusal is reported to ``refused`` with its reason (the failure counter) before
    ``Unauthorized`` is raised.
    """

    __slots__ = ("_allowed", "_auth", "_clock", "_nonces", "_refused", "_retired", "_section",
                 "_shared", "_shared_url", "_started", "enabled", "needs_body")

    def __init__(
        self, config: BaseConfig, *, refused: Callable[[str], None],
        clock: Callable[[], float] = time.time, allowed: AllowList | None = None,
    ) -> None:
        self._allowed = allowed
        self._section: AuthSection | None = None
        self._auth: Authenticator | None = None
        self._nonces: NonceCache | None = None
        self._shared: RedisNonces | None = None
        self._shared_url: str | None = None
        self._retired: list[RedisNonces] = []
        self._refused = refused
        self._clock = clock
        #: Signatures from before this moment are refused: the nonces seen by an earlier
        #: process (before a restart) are not known here.
        self._started = clock()
        self.enabled = False
        self.needs_body = False
        self.configure(config)

    def configure(self, config: BaseConfig) -> None:
        """Adopt ``config.auth``. At start-up (the first call), ``ConfigError`` if the nonce
        journal cannot be opened; later (a reload), such a journal is replaced by memory."""
        section = config.auth
        if section is self._section or section == self._section:
            return
        auth = None
        if section.enabled:
            signatures = section.fxn_signatures
            shared = self._shared_store(section)
            if self._nonces is None and signatures is not None:
                self._nonces = self._new_cache(signatures)
            if self._nonces is not None:
                # A shared store or a journal remembers across restarts; a memory-only cache
                # starts empty, so what may have been signed before this process started is
                # refused.
                lasting = shared is not None or self._nonces.lasting
                self._nonces.not_before = float("-inf") if lasting else self._started
            auth = Authenticator(
                section, nonces=self._nonces, shared=shared,
                clock=self._clock, allowed=self._allowed,
            )
            if auth.verifier is not None:
                self._nonces = auth.verifier.nonces
        self._section, self._auth = section, auth
        self.enabled = auth is not None
        self.needs_body = auth is not None and auth.verifier is not None

    def _new_cache(self, signatures: FxnSignaturesSection) -> NonceCache:
        window, size = signatures.window_seconds, signatures.nonce_cache_size
        if not (signatures.journaled and signatures.state_dir):
            return NonceCache(window, size)  # memory, or Redis (checked first), or no file
        from proxy.auth.journal import JournaledNonces  # sqlite3: with a journal only

        try:
            return JournaledNonces.open(signatures.state_dir, window, size, now=self._clock())
        except ConfigError as exc:
            if self._section is None:  # at start-up: refused, as serve refuses a bad config
                raise
            log.error("%s; nonces are kept in memory until a restart", exc.problems[0])
            return NonceCache(window, size)

    def _shared_store(self, section: AuthSection) -> RedisNonces | None:
        signatures = section.fxn_signatures
        url = signatures.redis_url if signatures is not None else None
        if url != self._shared_url:
            if self._shared is not None:
                self._retired.append(self._shared)
            self._shared = RedisNonces(url) if url is not None else None
            self._shared_url = url
        return self._shared

    async def close(self) -> None:
        """Close the shared store's connections (after the last request)."""
        stores, self._retired = [*self._retired, self._shared], []
        self._shared = None
        self._shared_url = None
        if self._nonces is not None:
            self._nonces.close()
        for store in stores:
            if store is not None:
                await store.close()

    @property
    def authenticator(self) -> Authenticator | None:
        """The authenticator for the current section (``None`` while auth is off)."""
        return self._auth

    def check_keys(self, headers: CIMultiDictProxy[str]) -> None:
        """The whole check when only API keys are configured (``needs_body`` is false)."""
        assert self._auth is not None, "check only when enabled"
        try:
            self._auth._check_api_key(headers)
        except Unauthorized as exc:
            self._refuse(exc)
            raise

    async def verify(
        self, headers: CIMultiDictProxy[str], body: Callable[[], Awaitable[bytes]]
    ) -> None:
        """The whole check when a signature may need the body (``needs_body``)."""
        assert self._auth is not None, "verify only when enabled"
        try:
            await self._auth.check(headers, body)
        except Unauthorized as exc:
            self._refuse(exc)
            raise

    def _refuse(self, exc: Unauthorized) -> None:
        reason = exc.code if exc.code in REASONS else "unauthorized"
        self._refused(reason)
        log.debug("refused a request: %s", reason)


def check_exposure(config: BaseConfig) -> str | None:
    """Refuse (``ConfigError``) to serve a non-loopback address without inbound auth unless
    ``auth.allow_unauthenticated: true``; in that case return the warning to show loudly."""
    if config.auth.enabled or config.is_loopback():
        return None
    host = config.server.host
    if not config.auth.allow_unauthenticated:
        raise ConfigError(
            [
                f"server.host: {host} is reachable from other machines and inbound auth is "
                "off; configure auth.api_keys or auth.fxn_signatures, bind 127.0.0.1, or set "
                "auth.allow_unauthenticated: true to serve anyone who can connect"
            ]
        )
    return (
        f"SERVING WITHOUT AUTHENTICATION on {host}: anyone who can reach this address can use "
        "the backend (auth.allow_unauthenticated is true)"
    )
