"""Keeping this process's key ring in step with the key store.

Every ``interval_s`` (250 ms) the watcher reads the store's version, one
cheap read, and reloads every managed key only when it changed. A key made,
changed or revoked anywhere therefore takes effect in every process within
about ``interval_s`` plus one reload. A write made by this process refreshes
its own ring at once (:meth:`KeyWatch.refresh`).

Nothing here is on a request's path: requests read the ring, which the
watcher replaces whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.control.keystore import KeyStore, ManagedKey, by_digest
from gateway.limits.keys import KeyRing

log = logging.getLogger("gateway.keys")

INTERVAL_S = 0.25


class KeyWatch:
    """Polls a :class:`KeyStore` and hands its keys to a :class:`KeyRing`."""

    def __init__(self, store: KeyStore, ring: KeyRing, interval_s: float = INTERVAL_S) -> None:
        self.store = store
        self.ring = ring
        self.interval_s = interval_s
        #: The version the ring holds; None before the first load.
        self.version: int | None = None
        #: The keys the ring holds, as stored (for listings that may be a poll old).
        self.keys: list[ManagedKey] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def refresh(self) -> None:
        """Reload every key now (start-up, and after this process's own writes)."""
        async with self._lock:  # one load at a time, so an older one never lands last
            version, keys = await self.store.load()
            self.ring.set_managed(by_digest(keys))
            self.version, self.keys = version, keys

    async def after_write(self) -> None:
        """This process's own write, in its ring at once. Should the reload
        fail, the write stands and the poll picks it up."""
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001 - any store failure: the poll retries
            self._report(exc)

    async def check(self) -> bool:
        """One poll: reload if the version moved. True when it reloaded."""
        version = await self.store.version()
        if version == self.version:
            return False
        await self.refresh()
        return True

    async def start(self) -> None:
        """Load the keys, then poll. A store that cannot be read yet (Redis
        not up) is logged, and the poll keeps trying."""
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001 - any store failure: start without managed keys
            self._report(exc)
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001 - keep the last keys seen, and keep trying
                self._report(exc)
            else:
                if self._failing:
                    log.info("key store readable again; managed keys at version %s", self.version)
                    self._failing = False

    def _report(self, exc: Exception) -> None:
        if not self._failing:  # once per outage, not four times a second
            log.warning(
                "cannot read the key store (%s: %s); keeping the %d managed keys last seen",
                type(exc).__name__,
                exc,
                len(self.keys),
            )
            self._failing = True
