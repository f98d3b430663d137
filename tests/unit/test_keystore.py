"""The key stores (Redis and SQLite), the watcher that keeps a key ring in
step with them, and the admin operations over them."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from gateway.config import KeyConfig
from gateway.control.key_admin import KeyAdmin, KeyChange, NewKey, rfc3339
from gateway.control.key_watch import KeyWatch
from gateway.control.keystore import KeyExists, KeyNotFound, ManagedKey, RedisKeyStore, SqliteKeyStore
from gateway.errors import GatewayError
from gateway.limits.keys import KeyRing
from gateway.server.admin_keys import decode
from gateway.storage.autopipeline import AutoPipeline
from gateway.storage.connect import redis_client
from tests.eventually import aeventually


def _key(name: str, secret: str | None = None, **fields) -> ManagedKey:
    secret = secret or f"sk-gw-{secrets.token_urlsafe(32)}"
    now = time.time()
    return ManagedKey(
        name=name,
        digest=hashlib.sha256(secret.encode()).hexdigest(),
        label=secret[:8] + "…" + secret[-4:],
        created_at=now,
        updated_at=now,
        **fields,
    )


@pytest.fixture(params=["redis", "sqlite"])
async def stores(request, redis_server, tmp_path):
    """Two stores over the same place, as two processes would hold them."""
    if request.param == "sqlite":
        pair = [SqliteKeyStore(tmp_path), SqliteKeyStore(tmp_path)]
    else:
        prefix = f"t{secrets.token_hex(4)}:"
        pair = [
            RedisKeyStore(prefix, AutoPipeline(redis_client(redis_server.url, 2.0), 2.0)),
            RedisKeyStore(prefix, AutoPipeline(redis_client(redis_server.url, 2.0), 2.0)),
        ]
    yield pair
    for store in pair:
        await store.close()
        if isinstance(store, RedisKeyStore):
            await store.batcher.client.aclose()


async def test_create_get_update_delete_seen_by_the_other_process(stores):
    a, b = stores
    start = await b.version()
    key = _key("team-a", rpm=10, models=["GPT-4o"])
    await a.create(key)
    assert await b.get("team-a") == key
    assert await b.version() != start
    version, keys = await b.load()
    assert keys == [key] and version == await a.version()

    changed = await b.update("team-a", lambda k: msgspec.structs.replace(k, rpm=None, disabled=True))
    assert changed.rpm is None and changed.disabled
    assert await a.get("team-a") == changed
    assert (await a.load())[0] > version

    await a.delete("team-a")
    assert await b.get("team-a") is None
    assert (await b.load())[1] == []


async def test_names_are_unique_and_missing_names_are_reported(stores):
    a, b = stores
    await a.create(_key("dup"))
    with pytest.raises(KeyExists):
        await b.create(_key("dup"))
    with pytest.raises(KeyNotFound):
        await a.update("nobody", lambda k: k)
    with pytest.raises(KeyNotFound):
        await b.delete("nobody")
    assert [k.name for k in (await a.load())[1]] == ["dup"]


async def test_concurrent_updates_all_land(stores):
    """Each update reads and writes atomically: none is lost to another writer."""
    a, b = stores
    await a.create(_key("counter", rpm=1))

    def bump(k: ManagedKey) -> ManagedKey:
        return msgspec.structs.replace(k, rpm=(k.rpm or 0) + 1)

    await asyncio.gather(*(store.update("counter", bump) for store in (a, b) * 10))
    stored = await a.get("counter")
    assert stored is not None and stored.rpm == 21


async def test_the_store_keeps_the_digest_not_the_key(stores, tmp_path):
    a, _ = stores
    secret = "sk-gw-" + secrets.token_urlsafe(32)
    await a.create(_key("hidden", secret))
    if isinstance(a, SqliteKeyStore):
        raw = a.path.read_bytes() + (tmp_path / "keys.sqlite3-wal").read_bytes()
    else:
        raw = msgspec.json.encode(await a.load())
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw
    assert secret.encode() not in raw


async def test_sqlite_keys_survive_reopening(tmp_path):
    store = SqliteKeyStore(tmp_path)
    key = _key("durable", budget_usd_per_day=1.5)
    await store.create(key)
    await store.close()
    again = SqliteKeyStore(tmp_path)
    assert (await again.load())[1] == [key]
    await again.close()


def test_a_managed_key_is_a_gateway_key_with_its_limits():
    key = _key(
        "k",
        rpm=3,
        tpm=100,
        max_concurrent=2,
        budget_usd_per_day=1.0,
        budget_usd_per_month=20.0,
        models=["Llama-3.1-8B", "gpt-4o"],
        expires_at=123.0,
        disabled=True,
    )
    gk = key.gateway_key()
    assert gk.name == "k" and gk.source == "admin"
    assert (gk.quota.rpm, gk.quota.tpm, gk.quota.max_concurrent) == (3, 100, 2)
    assert (gk.quota.budget_usd_per_day, gk.quota.budget_usd_per_month) == (1.0, 20.0)
    assert gk.models == frozenset({"llama-3.1-8b", "gpt-4o"})
    assert gk.expires_at == 123.0 and gk.disabled


# --- the watcher ---------------------------------------------------------------------


def _accepts(ring: KeyRing, secret: str):
    """A check for aeventually: the key the ring finds, or False while it refuses it."""

    def check():
        try:
            return ring.authenticate(f"Bearer {secret}")
        except GatewayError:
            return False

    return check


def _refusal(ring: KeyRing, secret: str) -> str | None:
    """The code the ring refuses the key with (None: accepted)."""
    try:
        ring.authenticate(f"Bearer {secret}")
    except GatewayError as exc:
        return exc.code
    return None


async def test_watch_picks_up_another_process_write(stores):
    a, b = stores
    ring = KeyRing([], managed_keys=True)
    watch = KeyWatch(b, ring, interval_s=0.02)
    await watch.start()
    try:
        secret = "sk-gw-" + secrets.token_urlsafe(32)
        await a.create(_key("remote", secret))
        found = await aeventually(_accepts(ring, secret), timeout=5)
        assert found.name == "remote" and found.source == "admin"
        await a.update("remote", lambda k: msgspec.structs.replace(k, disabled=True))
        await aeventually(lambda: _refusal(ring, secret) == "key_disabled", timeout=5)
        await a.delete("remote")
        await aeventually(lambda: _refusal(ring, secret) == "invalid_api_key", timeout=5)
    finally:
        await watch.stop()


async def test_watch_reloads_only_when_the_version_moves(stores):
    a, _ = stores
    watch = KeyWatch(a, KeyRing([], managed_keys=True))
    await watch.refresh()
    assert await watch.check() is False
    await a.create(_key("x"))
    assert await watch.check() is True
    assert await watch.check() is False


class _Broken(SqliteKeyStore):
    def __init__(self, path) -> None:
        super().__init__(path)
        self.broken = True

    async def version(self) -> int:
        if self.broken:
            raise ConnectionError("store down")
        return await super().version()

    async def load(self):
        if self.broken:
            raise ConnectionError("store down")
        return await super().load()


async def test_watch_survives_a_store_outage(tmp_path, caplog):
    store = _Broken(tmp_path)
    ring = KeyRing([], managed_keys=True)
    watch = KeyWatch(store, ring, interval_s=0.01)
    await watch.start()  # the store is down: start anyway, without managed keys
    try:
        secret = "sk-gw-" + secrets.token_urlsafe(32)
        await SqliteKeyStore(tmp_path).create(_key("late", secret))
        store.broken = False
        assert (await aeventually(_accepts(ring, secret), timeout=5)).name == "late"
    finally:
        await watch.stop()
    warnings = [r for r in caplog.records if "cannot read the key store" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per poll


# --- the admin operations ------------------------------------------------------------


@pytest.fixture
async def admin(tmp_path):
    store = SqliteKeyStore(tmp_path)
    ring = KeyRing([], managed_keys=True)
    watch = KeyWatch(store, ring)
    yield KeyAdmin(store, watch), ring
    await store.close()


FILE_KEYS = [KeyConfig(name="from-file", sha256="0" * 64, rpm=5, models=["gpt-4o"])]


async def test_create_answers_the_key_once_and_the_ring_has_it_at_once(admin):
    ops, ring = admin
    expires = datetime.now(UTC) + timedelta(days=1)
    created = await ops.create(NewKey(name="team-b", rpm=7, expires_at=expires), FILE_KEYS)
    assert created.key.startswith("sk-gw-") and len(created.key) == len("sk-gw-") + 43
    assert created.data.label == created.key[:8] + "…" + created.key[-4:]
    assert created.data.source == "admin" and not created.data.read_only
    assert created.data.expires_at == rfc3339(expires.timestamp())
    assert ring.authenticate(f"Bearer {created.key}").quota.rpm == 7  # no poll needed
    listed = await ops.list(FILE_KEYS)
    assert [(v.name, v.read_only) for v in listed] == [("from-file", True), ("team-b", False)]
    assert all(created.key not in msgspec.json.encode(v).decode() for v in listed)


async def test_names_are_unique_across_file_and_managed_keys(admin):
    ops, _ = admin
    for name in ("from-file", "dup"):
        if name == "dup":
            await ops.create(NewKey(name="dup"), FILE_KEYS)
        with pytest.raises(GatewayError) as conflict:
            await ops.create(NewKey(name=name), FILE_KEYS)
        assert conflict.value.status == 409 and conflict.value.code == "key_exists"


async def test_file_keys_are_read_only(admin):
    ops, _ = admin
    view = await ops.get("from-file", FILE_KEYS)
    assert view.read_only and view.source == "config" and view.rpm == 5 and view.label is None
    for attempt in (ops.change("from-file", KeyChange(rpm=1), FILE_KEYS), ops.delete("from-file", FILE_KEYS)):
        with pytest.raises(GatewayError) as refused:
            await attempt
        assert refused.value.status == 403 and refused.value.code == "read_only_key"


async def test_patch_null_clears_and_absent_keeps(admin):
    ops, ring = admin
    created = await ops.create(NewKey(name="p", rpm=3, tpm=1000, models=["a"]), [])
    view = await ops.change("p", decode(b'{"rpm": null, "disabled": true}', KeyChange), [])
    assert view.rpm is None and view.tpm == 1000 and view.models == ["a"] and view.disabled
    with pytest.raises(GatewayError) as refused:
        ring.authenticate(f"Bearer {created.key}")
    assert refused.value.code == "key_disabled"
    with pytest.raises(GatewayError) as missing:
        await ops.change("nobody", KeyChange(), [])
    assert missing.value.status == 404 and missing.value.code == "key_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"name": "ok", "rpm": "ten"}', "rpm"),
        (b'{"name": "ok", "rpm": 0}', "rpm"),
        (b'{"name": "ok", "budget_usd_per_day": -1}', "budget_usd_per_day"),
        (b'{"name": "-bad"}', "name"),
        (b'{"name": "ok", "colour": "red"}', "colour"),
        (b'{"rpm": 1}', "name"),
        (b'{"name": "ok", "expires_at": "2030-01-01T00:00:00"}', "expires_at"),
        (b'{"name": "ok", "expires_at": "next tuesday"}', "expires_at"),
        (b'{"name": "ok", "models": [""]}', "models[0]"),
        (b'{"name": "ok", "disabled": "yes"}', "disabled"),
    ],
)
def test_bad_fields_are_named(body, param):
    with pytest.raises(GatewayError) as bad:
        decode(body, NewKey)
    assert bad.value.status == 400 and bad.value.param == param


@pytest.mark.parametrize("body", [b"", b"{", b"[1]", b"null"])
def test_malformed_bodies_are_400(body):
    with pytest.raises(GatewayError) as bad:
        decode(body, NewKey)
    assert bad.value.status == 400


def test_patch_may_not_rename():
    with pytest.raises(GatewayError) as bad:
        decode(b'{"name": "other"}', KeyChange)
    assert bad.value.param == "name"


def test_rfc3339_is_utc_with_z():
    assert rfc3339(0.0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1.5) == "1970-01-01T00:00:01.500000Z"
    assert rfc3339(None) is None
