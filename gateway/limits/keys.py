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
from collections.abc import Mapping
from dataclasses import dataclass, field

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


OPEN = GatewayKey(name="open")


def _key(k: KeyConfig) -> GatewayKey:
    quota = Quota(
        rpm=k.rpm,
        tpm=k.tpm,
        max_concurrent=k.max_concurrent,
        budget_usd_per_day=k.budget_usd_per_day,
        budget_usd_per_month=k.budget_usd_per_month,
    )
    models = None if k.models is None else frozenset(m.lower() for m in k.models)
    return GatewayKey(k.name, quota, models, k.safety)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The configured keys; empty means open mode (loopback only)."""

    def __init__(self, keys: list[KeyConfig], env: Mapping[str, str] | None = None) -> None:
        environ: Mapping[str, str] = os.environ if env is None else env
        self._by_digest: dict[str, GatewayKey] = {}
        for k in keys:
            if k.sha256 is not None:
                self._by_digest[k.sha256.lower()] = _key(k)
            elif k.key_env:
                value = environ.get(k.key_env)
                if value:
                    self._by_digest[digest(value)] = _key(k)
                else:
                    log.warning("gateway key %s disabled: $%s is not set", k.name, k.key_env)
        self.configured = bool(keys)

    def listed(self) -> list[GatewayKey]:
        """Every key that can authenticate (for the budget gauges)."""
        return list(self._by_digest.values())

    @property
    def open(self) -> bool:
        return not self.configured

    def authenticate(self, authorization: str | None) -> GatewayKey:
        if self.open:
            return OPEN
        if not authorization:
            raise GatewayError(401, "missing Authorization: Bearer key", code="missing_api_key")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(401, "Authorization must be 'Bearer KEY'", code="invalid_api_key")
        found = self._by_digest.get(digest(token))
        if found is None:
            raise GatewayError(401, "invalid gateway key", code="invalid_api_key")
        return found
