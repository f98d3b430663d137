"""Where the keys made through the admin API are kept, so that every replica
and worker sees them and they survive restarts.

A key is stored as a :class:`ManagedKey`: its SHA-256 digest, never the key
itself, with its limits. Every change also bumps a version number, so a
process can tell whether anything changed with one cheap read
(``gateway/control/key_watch.py`` polls it) and reloads the whole set only
then.

- :class:`RedisKeyStore` (with ``[redis]``): one hash of keys by name and a
  version counter, changed together by Lua scripts. The hash has no TTL, so
  ``volatile-*`` eviction never removes it; persistence is Redis's (AOF).
- :class:`SqliteKeyStore` (without Redis): ``<data_dir>/keys.sqlite3`` in WAL
  mode, one row per key and a version row. Its calls run on a thread: only
  admin writes and the watcher's poll reach it, never a request.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gateway.limits.keys import GatewayKey, gateway_key
from gateway.storage.autopipeline import AutoPipeline

_T = TypeVar("_T")


class ManagedKey(msgspec.Struct, frozen=True, kw_only=True):
    """A key made through the admin API, as stored (times are Unix seconds)."""

    name: str
    #: SHA-256 of the key, hex; the key itself is shown once and never kept.
    digest: str
    #: The key's first 8 and last 4 characters, so an operator can tell keys apart.
    label: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget_usd_per_day: float | None = None
    budget_usd_per_month: float | None = None
    #: Model ids (or aliases) this key may ask for, as given; None = any.
    models: list[str] | None = None
    expires_at: float | None = None
    disabled: bool = False
    created_at: float
    updated_at: float

    def gateway_key(self) -> GatewayKey:
        """The key as the key ring and the limiter use it (limits by name, like a file key)."""
        return gateway_key(self, source="admin", expires_at=self.expires_at, disabled=self.disabled)


def by_digest(keys: list[ManagedKey]) -> dict[str, GatewayKey]:
    """The set :meth:`gateway.limits.keys.KeyRing.set_managed` takes."""
    return {k.digest: k.gateway_key() for k in keys}


class KeyExists(Exception):
    """A key of that name is already stored."""


class KeyNotFound(Exception):
    """No key of that name is stored."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(ManagedKey).decode


class KeyStore(ABC):
    """The managed keys of every process, and a version that changes with them."""

    @abstractmethod
    async def version(self) -> int:
        """A number that changes whenever a key is created, changed or deleted."""

    @abstractmethod
    async def load(self) -> tuple[int, list[ManagedKey]]:
        """Every key, with the version they are at, read together."""

    @abstractmethod
    async def get(self, name: str) -> ManagedKey | None: ...

    @abstractmethod
    async def create(self, key: ManagedKey) -> None:
        """Store a new key; :class:`KeyExists` if the name is taken."""

    @abstractmethod
    async def update(self, name: str, change: Callable[[ManagedKey], ManagedKey]) -> ManagedKey:
        """Replace a key by ``change(current)``, atomically with respect to
        other writers; :class:`KeyNotFound` if there is none."""

    @abstractmethod
    async def delete(self, name: str) -> None:
        """:class:`KeyNotFound` if there is none."""

    async def close(self) -> None:
        return None


# --- Redis ---------------------------------------------------------------------------

# KEYS[1] = the hash of keys by name, KEYS[2] = the version counter.
_CREATE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return -1 end
return redis.call('INCR', KEYS[2])
"""
# ARGV[2] = the value read, ARGV[3] = its replacement: compare and set.
_UPDATE = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return -1 end
if current ~= ARGV[2] then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return redis.call('INCR', KEYS[2])
"""
_DELETE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return -1 end
return redis.call('INCR', KEYS[2])
"""
_LOAD = "return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}"
_GET = "return redis.call('HGET', KEYS[1], ARGV[1])"

#: Tries of a compare-and-set update that lost to another writer.
_UPDATE_TRIES = 20


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value or 0)


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class RedisKeyStore(KeyStore):
    """Keys in ``<prefix>{keys}:all`` (a hash by name) and ``<prefix>{keys}:version``.

    Both share a hash tag, so the scripts also run on Redis Cluster. Commands
    go through the worker's auto-pipeline: the watcher's poll rides along with
    whatever else is in flight.
    """

    def __init__(self, prefix: str, batcher: AutoPipeline) -> None:
        self.batcher = batcher
        self._hash = f"{prefix}{{keys}}:all"
        self._version = f"{prefix}{{keys}}:version"

    async def _eval(self, script: str, *args: str | bytes) -> Any:
        keys = (self._hash, self._version)
        return await self.batcher.submit(lambda pipe: pipe.eval(script, 2, *keys, *args))

    async def version(self) -> int:
        key = self._version
        return _int(await self.batcher.submit(lambda pipe: pipe.get(key)))

    async def load(self) -> tuple[int, list[ManagedKey]]:
        version, flat = await self._eval(_LOAD)
        keys = [_decode(_raw(value)) for value in flat[1::2]]
        return _int(version), sorted(keys, key=lambda k: (k.created_at, k.name))

    async def get(self, name: str) -> ManagedKey | None:
        raw = await self._eval(_GET, name)
        return None if raw is None else _decode(_raw(raw))

    async def create(self, key: ManagedKey) -> None:
        if _int(await self._eval(_CREATE, key.name, _encode(key))) < 0:
            raise KeyExists(key.name)

    async def update(self, name: str, change: Callable[[ManagedKey], ManagedKey]) -> ManagedKey:
        for _ in range(_UPDATE_TRIES):
            raw = await self._eval(_GET, name)
            if raw is None:
                raise KeyNotFound(name)
            raw = _raw(raw)
            new = change(_decode(raw))
            result = _int(await self._eval(_UPDATE, name, raw, _encode(new)))
            if result == -1:
                raise KeyNotFound(name)
            if result >= 0:
                return new
        raise RuntimeError(f"key {name!r} kept changing under the update")

    async def delete(self, name: str) -> None:
        if _int(await self._eval(_DELETE, name)) < 0:
            raise KeyNotFound(name)


# --- SQLite --------------------------------------------------------------------------

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS keys (name TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, body BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS version (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO version (id, n) VALUES (1, 0)",
)
_BUMP = "UPDATE version SET n = n + 1 WHERE id = 1"

FILE_NAME = "keys.sqlite3"


class SqliteKeyStore(KeyStore):
    """Keys in ``<data_dir>/keys.sqlite3``, shared by the workers of one host.

    WAL mode lets the workers' polls read while one of them writes. Each
    write is one ``BEGIN IMMEDIATE`` transaction that also bumps the version
    row, so a reader sees the keys and the version change together.
    """

    def __init__(self, data_dir: str | Path) -> None:
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / FILE_NAME
        # One connection, used from worker threads one call at a time.
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA busy_timeout = 10000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._write(lambda db: [db.execute(statement) for statement in _SCHEMA])

    def _read(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            return query(self._db)

    def _write(self, change: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = change(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    async def version(self) -> int:
        return await asyncio.to_thread(self._read, self._version)

    @staticmethod
    def _version(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT n FROM version WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    async def load(self) -> tuple[int, list[ManagedKey]]:
        def read(db: sqlite3.Connection) -> tuple[int, list[ManagedKey]]:
            db.execute("BEGIN")  # one snapshot for the version and the rows
            try:
                rows = db.execute("SELECT body FROM keys").fetchall()
                return self._version(db), [_decode(row[0]) for row in rows]
            finally:
                db.execute("COMMIT")

        version, keys = await asyncio.to_thread(self._read, read)
        return version, sorted(keys, key=lambda k: (k.created_at, k.name))

    async def get(self, name: str) -> ManagedKey | None:
        def read(db: sqlite3.Connection) -> ManagedKey | None:
            row = db.execute("SELECT body FROM keys WHERE name = ?", (name,)).fetchone()
            return None if row is None else _decode(row[0])

        return await asyncio.to_thread(self._read, read)

    async def create(self, key: ManagedKey) -> None:
        def insert(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO keys (name, digest, body) VALUES (?, ?, ?)", (key.name, key.digest, _encode(key))
                )
            except sqlite3.IntegrityError:
                raise KeyExists(key.name) from None
            db.execute(_BUMP)

        await asyncio.to_thread(self._write, insert)

    async def update(self, name: str, change: Callable[[ManagedKey], ManagedKey]) -> ManagedKey:
        def replace(db: sqlite3.Connection) -> ManagedKey:
            row = db.execute("SELECT body FROM keys WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise KeyNotFound(name)
            new = change(_decode(row[0]))
            db.execute("UPDATE keys SET body = ? WHERE name = ?", (_encode(new), name))
            db.execute(_BUMP)
            return new

        return await asyncio.to_thread(self._write, replace)

    async def delete(self, name: str) -> None:
        def remove(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM keys WHERE name = ?", (name,)).rowcount == 0:
                raise KeyNotFound(name)
            db.execute(_BUMP)

        await asyncio.to_thread(self._write, remove)

    async def close(self) -> None:
        await asyncio.to_thread(self._read, lambda db: db.close())
