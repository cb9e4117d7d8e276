"""The replay cache that survives a restart: the memory cache, and every claim in a journal.

A single node keeps its used nonces in an SQLite file (the standard library's ``sqlite3``) in
``auth.fxn_signatures.state_dir``. The request path stays what it was, a set lookup, plus one
``INSERT`` per accepted signature (tens of microseconds); a restarted process reads the nonces
of the window back, so a replay is refused across a restart and a fresh signature from before
it is accepted (no ``before_start``). Rows leave the file when their timestamp leaves the
window (a ``DELETE`` at most once a second), or when a full cache forgets them (its horizon is
kept in the file too).

Durability: each claim is committed at once in WAL mode with ``synchronous=NORMAL``. A commit
survives the process being killed; after a power loss or an operating-system crash the last
commits since the WAL's latest checkpoint can be lost, and a job claimed in that moment could
be replayed once. One process per journal: replicas share Redis instead.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from proxy.auth.nonces import NonceCache
from proxy.errors import ConfigError, Unavailable, reason

log = logging.getLogger("model_proxy")

FILE_NAME = "model-proxy-nonces.sqlite3"
#: Seconds between two removals of expired rows (the clock is the verifier's).
PURGE_SECONDS = 1.0
#: Seconds SQLite waits for a lock another connection holds before it gives up.
BUSY_SECONDS = 0.5

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS nonces (address TEXT NOT NULL, nonce TEXT NOT NULL, "
    "ts INTEGER NOT NULL, PRIMARY KEY (address, nonce)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS nonces_ts ON nonces (ts)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value REAL NOT NULL)",
)


class JournaledNonces(NonceCache):
    """A :class:`NonceCache` whose every entry is also written to ``directory``'s journal and
    read back at start (entries the window still accepts at ``now``).

    ``open`` raises ``ConfigError`` (one line) when the journal cannot be opened or read; once
    open, a failed write raises ``Unavailable`` (503 ``nonce_store_unavailable``): the job is
    refused rather than accepted without a record of it.
    """

    __slots__ = ("_db", "_purged", "path")

    lasting = True

    def __init__(self, db: sqlite3.Connection, path: Path, window: float,
                 max_entries: int) -> None:
        super().__init__(window, max_entries)
        self._db = db
        self.path = path
        self._purged = float("-inf")

    @classmethod
    def open(cls, directory: str, window: float, max_entries: int, *,
             now: float) -> JournaledNonces:
        path = Path(directory) / FILE_NAME
        try:
            os.makedirs(directory, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_SECONDS)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                db.execute(statement)
            cache = cls(db, path, window, max_entries)
            cache._load(now)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError([
                f"auth.fxn_signatures.state_dir: cannot keep the nonce journal {path}: "
                f"{_reason(exc)}; make the directory writable (a mounted volume in a container) "
                "or set nonce_store: memory"
            ]) from None
        log.info("nonce journal %s: %d nonces of the window remembered", path, len(cache))
        return cache

    def _load(self, now: float) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'horizon'").fetchone()
        if row is not None:
            self.horizon = row[0]
        oldest = now - self.window
        rows = self._db.execute(
            "SELECT address, nonce, ts FROM nonces WHERE ts >= ? ORDER BY ts",
            (oldest if oldest > float("-inf") else -(2**63),),
        )
        for address, nonce, ts in rows:
            super().add((address, nonce), ts)
        self._save_horizon()

    def add(self, key: tuple[str, str], timestamp: int) -> None:
        horizon = self.horizon
        try:
            self._db.execute("INSERT OR REPLACE INTO nonces VALUES (?, ?, ?)",
                             (key[0], key[1], timestamp))
        except sqlite3.Error as exc:
            log.error("nonce journal %s: cannot record a nonce (%s); refusing signed "
                      "requests until it can", self.path, _reason(exc))
            raise Unavailable(
                "the nonce journal cannot be written, so this job could be replayed after a "
                "restart; it is refused", code="nonce_store_unavailable",
            ) from exc
        super().add(key, timestamp)
        if self.horizon != horizon:
            self._save_horizon()

    def expire(self, now: float) -> None:
        super().expire(now)
        if now - self._purged < PURGE_SECONDS:
            return
        self._purged = now
        oldest = max(now - self.window, self.horizon + 1)
        if oldest > float("-inf"):
            try:
                self._db.execute("DELETE FROM nonces WHERE ts < ?", (oldest,))
            except sqlite3.Error as exc:  # kept: the window check refuses them anyway
                log.warning("nonce journal %s: cannot drop expired nonces (%s)",
                            self.path, _reason(exc))

    def _save_horizon(self) -> None:
        if self.horizon > float("-inf"):
            try:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('horizon', ?)",
                                 (self.horizon,))
            except sqlite3.Error as exc:
                log.warning("nonce journal %s: cannot record the cache's horizon (%s)",
                            self.path, _reason(exc))

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error:  # at shutdown: what was committed is in the file
            pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0][:200] if str(exc) else reason(exc)
