"""The admin API's key operations, in OpenRouter's provisioning shape.

The HTTP handlers (``gateway/server/admin_keys.py``) decode the bodies into
:class:`NewKey` and :class:`KeyChange` and call :class:`KeyAdmin`, which
answers :class:`KeyView` values (the key object of the API) or raises a
``GatewayError``. Keys from the config file are listed read-only beside the
managed ones, and a name is unique across both.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType

from gateway.config import KeyConfig
from gateway.control.key_watch import KeyWatch
from gateway.control.keystore import KeyExists, KeyNotFound, KeyStore, ManagedKey
from gateway.errors import GatewayError

log = logging.getLogger("gateway.keys")

#: What a key name may be (it appears in metrics, logs and URLs).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: Every key made here starts with this, so a leaked one is easy to recognise.
KEY_PREFIX = "sk-gw-"

Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
Limit = Annotated[int, Meta(ge=1)]
Usd = Annotated[float, Meta(ge=0)]
Model = Annotated[str, Meta(min_length=1, max_length=256)]
Models = Annotated[list[Model], Meta(max_length=1000)]
#: RFC 3339 with an offset; a time without one is refused (its zone is unknowable).
Instant = Annotated[datetime, Meta(tz=True)]


class NewKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/keys``."""

    name: Name
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_concurrent: Limit | None = None
    budget_usd_per_day: Usd | None = None
    budget_usd_per_month: Usd | None = None
    models: Models | None = None
    expires_at: Instant | None = None
    disabled: bool = False


class KeyChange(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``PATCH /v1/keys/{name}``: an absent field is left as it is; null clears it."""

    rpm: Limit | UnsetType | None = UNSET
    tpm: Limit | UnsetType | None = UNSET
    max_concurrent: Limit | UnsetType | None = UNSET
    budget_usd_per_day: Usd | UnsetType | None = UNSET
    budget_usd_per_month: Usd | UnsetType | None = UNSET
    models: Models | UnsetType | None = UNSET
    expires_at: Instant | UnsetType | None = UNSET
    disabled: bool | UnsetType = UNSET


class KeyView(msgspec.Struct, kw_only=True):
    """The key object of the API (never the key itself)."""

    name: str
    label: str | None
    source: str
    read_only: bool
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    models: list[str] | None
    expires_at: str | None
    disabled: bool
    created_at: str | None
    updated_at: str | None


class Created(msgspec.Struct):
    """``POST /v1/keys``'s answer: the only time the key is shown."""

    data: KeyView
    key: str


class Deleted(msgspec.Struct):
    name: str
    deleted: bool = True


def rfc3339(t: float | None) -> str | None:
    """Unix seconds as an RFC 3339 UTC time (``…Z``)."""
    if t is None:
        return None
    moment = datetime.fromtimestamp(t, UTC)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def _unix(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def label(key: str) -> str:
    return f"{key[:8]}…{key[-4:]}"


def new_secret() -> str:
    """``sk-gw-`` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def managed_view(key: ManagedKey) -> KeyView:
    return KeyView(
        name=key.name,
        label=key.label,
        source="admin",
        read_only=False,
        rpm=key.rpm,
        tpm=key.tpm,
        max_concurrent=key.max_concurrent,
        budget_usd_per_day=key.budget_usd_per_day,
        budget_usd_per_month=key.budget_usd_per_month,
        models=key.models,
        expires_at=rfc3339(key.expires_at),
        disabled=key.disabled,
        created_at=rfc3339(key.created_at),
        updated_at=rfc3339(key.updated_at),
    )


def file_view(key: KeyConfig) -> KeyView:
    return KeyView(
        name=key.name,
        label=None,
        source="config",
        read_only=True,
        rpm=key.rpm,
        tpm=key.tpm,
        max_concurrent=key.max_concurrent,
        budget_usd_per_day=key.budget_usd_per_day,
        budget_usd_per_month=key.budget_usd_per_month,
        models=key.models,
        expires_at=None,
        disabled=False,
        created_at=None,
        updated_at=None,
    )


def _not_found(name: str) -> GatewayError:
    return GatewayError(404, f"no key named {name!r}", code="key_not_found")


def _find_file_key(file_keys: Sequence[KeyConfig], name: str) -> KeyConfig | None:
    return next((k for k in file_keys if k.name == name), None)


@contextmanager
def _store_call(what: str) -> Iterator[None]:
    """A store that fails (Redis down, a locked or unwritable SQLite file) is a
    503 that says so, never a 500 or the store's own message."""
    try:
        yield
    except (GatewayError, KeyExists, KeyNotFound):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the store raised, the caller gets a 503
        log.warning("key store failed to %s (%s)", what, type(exc).__name__)
        raise GatewayError(503, "the key store is unavailable; try again", code="key_store_unavailable") from None


def _changed(key: ManagedKey, change: KeyChange, now: float) -> ManagedKey:
    fields: dict[str, object] = {
        name: getattr(change, name)
        for name in ("rpm", "tpm", "max_concurrent", "budget_usd_per_day", "budget_usd_per_month", "models", "disabled")
        if getattr(change, name) is not UNSET
    }
    if not isinstance(change.expires_at, UnsetType):
        fields["expires_at"] = _unix(change.expires_at)
    return msgspec.structs.replace(key, **fields, updated_at=now)


class KeyAdmin:
    """Create, list, change and delete managed keys; config keys are shown read-only.

    ``file_keys`` is passed to each call (the config file's keys at that
    moment), since a config reload may change them.
    """

    def __init__(self, store: KeyStore, watch: KeyWatch) -> None:
        self.store = store
        self.watch = watch

    async def create(self, body: NewKey, file_keys: Sequence[KeyConfig]) -> Created:
        if _find_file_key(file_keys, body.name) is not None:
            raise GatewayError(409, f"a key named {body.name!r} is in the config file", code="key_exists", param="name")
        secret = new_secret()
        now = time.time()
        key = ManagedKey(
            name=body.name,
            digest=hashlib.sha256(secret.encode()).hexdigest(),
            label=label(secret),
            rpm=body.rpm,
            tpm=body.tpm,
            max_concurrent=body.max_concurrent,
            budget_usd_per_day=body.budget_usd_per_day,
            budget_usd_per_month=body.budget_usd_per_month,
            models=body.models,
            expires_at=_unix(body.expires_at),
            disabled=body.disabled,
            created_at=now,
            updated_at=now,
        )
        try:
            with _store_call("create a key"):
                await self.store.create(key)
        except KeyExists:
            raise GatewayError(409, f"a key named {body.name!r} exists", code="key_exists", param="name") from None
        await self.watch.after_write()
        return Created(managed_view(key), secret)

    async def list(self, file_keys: Sequence[KeyConfig]) -> list[KeyView]:
        with _store_call("list keys"):
            _, managed = await self.store.load()
        return [*(file_view(k) for k in file_keys), *(managed_view(k) for k in managed)]

    async def get(self, name: str, file_keys: Sequence[KeyConfig]) -> KeyView:
        file_key = _find_file_key(file_keys, name)
        if file_key is not None:
            return file_view(file_key)
        with _store_call("read a key"):
            key = await self.store.get(name)
        if key is None:
            raise _not_found(name)
        return managed_view(key)

    def _refuse_file_key(self, name: str, file_keys: Sequence[KeyConfig]) -> None:
        if _find_file_key(file_keys, name) is not None:
            raise GatewayError(
                403,
                f"key {name!r} is from the config file: change it there (it is read-only here)",
                code="read_only_key",
            )

    async def change(self, name: str, change: KeyChange, file_keys: Sequence[KeyConfig]) -> KeyView:
        self._refuse_file_key(name, file_keys)
        try:
            with _store_call("change a key"):
                key = await self.store.update(name, lambda current: _changed(current, change, time.time()))
        except KeyNotFound:
            raise _not_found(name) from None
        await self.watch.after_write()
        return managed_view(key)

    async def delete(self, name: str, file_keys: Sequence[KeyConfig]) -> Deleted:
        self._refuse_file_key(name, file_keys)
        try:
            with _store_call("delete a key"):
                await self.store.delete(name)
        except KeyNotFound:
            raise _not_found(name) from None
        await self.watch.after_write()
        return Deleted(name)
