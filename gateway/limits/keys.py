"""Gateway keys: ``Authorization: Bearer KEY`` checked against SHA-256 digests.

Only digests are kept in memory. The presented key is hashed, and the digest
is looked up in a dict: O(1) however many keys there are. Comparing digests
rather than keys is what makes the check constant-time in the sense that
matters: a timing difference can only tell an attacker about a SHA-256 digest,
from which no key can be recovered. Keys are never logged; their names are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import KeyConfig, Policy, Quota
from gateway.errors import GatewayError

log = logging.getLogger("gateway.auth")


@dataclass(frozen=True, slots=True)
class GatewayKey:
    name: str
    quota: Quota = field(default_factory=Quota)
    #: Lower-cased model ids this key may ask for; None = any.
    models: frozenset[str] | None = None
    safety: Policy | None = None
    #: Where the key was made: ``config`` (the config file, read-only at
    #: runtime) or ``admin`` (the admin API).
    source: str = "config"
    #: Unix time after which the key is refused; None = never.
    expires_at: float | None = None
    disabled: bool = False


OPEN = GatewayKey(name="open")


class KeyLimits(Protocol):
    """A key's limits as a config entry (``KeyConfig``) or a key made at runtime
    (``control.keystore.ManagedKey``) states them."""

    @property
    def name(self) -> str: ...
    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...
    @property
    def max_concurrent(self) -> int | None: ...
    @property
    def budget_usd_per_day(self) -> float | None: ...
    @property
    def budget_usd_per_month(self) -> float | None: ...
    @property
    def models(self) -> list[str] | None: ...


def gateway_key(
    k: KeyLimits,
    *,
    safety: Policy | None = None,
    source: str = "config",
    expires_at: float | None = None,
    disabled: bool = False,
) -> GatewayKey:
    """The key as the key ring and the limiter use it, whichever its origin:
    its quota, and its allow-list lower-cased (model ids match case-insensitively)."""
    quota = Quota(
        rpm=k.rpm,
        tpm=k.tpm,
        max_concurrent=k.max_concurrent,
        budget_usd_per_day=k.budget_usd_per_day,
        budget_usd_per_month=k.budget_usd_per_month,
    )
    models = None if k.models is None else frozenset(m.lower() for m in k.models)
    return GatewayKey(k.name, quota, models, safety, source, expires_at, disabled)


def _key(k: KeyConfig) -> GatewayKey:
    return gateway_key(k, safety=k.safety)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def file_keys(keys: list[KeyConfig], env: Mapping[str, str] | None = None) -> dict[str, GatewayKey]:
    """The config file's keys by digest; a ``key_env`` key whose variable is unset is left out."""
    environ: Mapping[str, str] = os.environ if env is None else env
    by_digest: dict[str, GatewayKey] = {}
    for k in keys:
        if k.sha256 is not None:
            by_digest[k.sha256.lower()] = _key(k)
        elif k.key_env:
            value = environ.get(k.key_env)
            if value:
                by_digest[digest(value)] = _key(k)
            else:
                log.warning("gateway key %s disabled: $%s is not set", k.name, k.key_env)
    return by_digest


class KeyRing:
    """The keys that may call the gateway: the config file's, and those made at
    runtime through the admin API (``managed``). Open mode (loopback only)
    when there are no file keys and keys cannot be made at runtime.

    Both sets are replaced whole (a config reload, a change seen in the key
    store), never edited in place: a request that already looked its key up
    keeps the value it found.
    """

    def __init__(
        self, keys: list[KeyConfig], env: Mapping[str, str] | None = None, *, managed_keys: bool = False
    ) -> None:
        self._file: dict[str, GatewayKey] = {}
        self._managed: dict[str, GatewayKey] = {}
        self._configured = False
        #: Whether keys can be made at runtime (an admin key is configured).
        self.managed_keys = managed_keys
        self.set_file_keys(keys, env)

    def set_file_keys(self, keys: list[KeyConfig], env: Mapping[str, str] | None = None) -> None:
        """Replace the config file's keys (start-up, config reload)."""
        self._file = file_keys(keys, env)
        self._configured = bool(keys)

    def set_managed(self, by_digest: dict[str, GatewayKey]) -> None:
        """Replace the keys made at runtime, by digest (the key store's latest view)."""
        self._managed = by_digest

    def listed(self) -> list[GatewayKey]:
        """Every key that can authenticate (for the budget gauges)."""
        return [*self._file.values(), *self._managed.values()]

    @property
    def open(self) -> bool:
        return not self._configured and not self.managed_keys

    def authenticate(self, authorization: str | None) -> GatewayKey:
        if self.open:
            return OPEN
        if not authorization:
            raise GatewayError(401, "missing Authorization: Bearer key", code="missing_api_key")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(401, "Authorization must be 'Bearer KEY'", code="invalid_api_key")
        key_digest = digest(token)
        found = self._file.get(key_digest) or self._managed.get(key_digest)
        if found is None:
            raise GatewayError(401, "invalid gateway key", code="invalid_api_key")
        if found.disabled:
            raise GatewayError(401, f"gateway key {found.name!r} is disabled", code="key_disabled")
        if found.expires_at is not None and time.time() >= found.expires_at:
            raise GatewayError(401, f"gateway key {found.name!r} has expired", code="key_expired")
        return found
