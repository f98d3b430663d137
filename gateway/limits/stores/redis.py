"""Limits in Redis: where rate limits, concurrency leases and spend are counted.

Algorithm: a sliding-window log. Each admitted request is an entry (id,
timestamp, tokens) kept for one window (60 s); a request is admitted when the
entries younger than the window leave room for it. Chosen over GCRA and token
buckets because it is exact over every 60-second interval: "rpm = 50" means no
60 s span ever holds a 51st request, however the burst is spread, and a token
reservation can be reconciled later by changing its own entry. Its memory is
one entry per request in the window, which the limit itself bounds.

Every check is one atomic round trip: a Lua script that checks requests,
tokens, concurrency and budget together and commits all or nothing. Time comes
from the Redis server (``TIME``), so replicas with skewed clocks still agree.
Keys for one limited entity share a hash tag, so the script also runs on
Redis Cluster. :class:`MemoryStore` runs the same logic in-process, for a
single replica without Redis.

An admission may also ask for a *block*: more of the key's quota, counted in
Redis at once, that the asking worker then hands out without a round trip
(``gateway/limits/blocks.py`` says how it stays exact).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from gateway.config import Quota
from gateway.limits.stores.base import WINDOW_MS, BlockAsk, LimitStore, Periods, Verdict
from gateway.storage.autopipeline import AutoPipeline
from gateway.storage.connect import RedisClient

if TYPE_CHECKING:
    from gateway.storage.resp import RedisValue


def _lua(name: str) -> str:
    """A script as sent to Redis: without its comment lines and indentation,
    since the settlement script's text goes with every settlement (EVAL)."""
    text = resources.files("gateway.limits").joinpath("lua", name).read_text()
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("--"))


_ADMIT = _lua("admit.lua")
_SETTLE = _lua("settle.lua")
_SETTLE_SHA = hashlib.sha1(_SETTLE.encode()).hexdigest()
_RETURN = _lua("return_block.lua")


def _keys(prefix: str, entity: str, periods: Periods) -> list[str]:
    tag = f"{prefix}{{{entity}}}"  # one hash slot per entity (Redis Cluster)
    return [
        f"{tag}:req",
        f"{tag}:tok",
        f"{tag}:tokn",
        f"{tag}:toksum",
        f"{tag}:lease",
        f"{tag}:spend:{periods.day}",
        f"{tag}:spend:{periods.month}",
        f"{tag}:pend",
        f"{tag}:pendx",
        f"{tag}:pendsum",
        f"{tag}:lastcost",
    ]


_KEYS = 11  # the admission script's keys: all of _keys


def _copy_outcome(to: asyncio.Future[Any], source: asyncio.Future[Any]) -> None:
    if to.done():
        return
    if source.cancelled():
        to.cancel()
    elif (exc := source.exception()) is not None:
        to.set_exception(exc)
    else:
        to.set_result(source.result())


def _verdict(raw: list[Any]) -> Verdict:
    denied = raw[0].decode() if isinstance(raw[0], bytes) else raw[0]
    if len(raw) == 6:  # denied: no block, no spend
        return Verdict(denied or None, *(int(x) for x in raw[1:]))
    return Verdict(
        denied or None,
        int(raw[1]),
        int(raw[2]),
        int(raw[3]),
        int(raw[4]),
        int(raw[5]),
        int(raw[6]),
        float(raw[7]),
        float(raw[8]),
        int(raw[9]),
    )


class _RedisVerdict:
    """An admission script call in flight."""

    __slots__ = ("_call", "_future", "_store")

    def __init__(self, store: RedisStore, call: list[RedisValue], future: asyncio.Future[list[Any]]) -> None:
        self._store, self._call, self._future = store, call, future

    async def verdict(self) -> Verdict:
        try:
            raw = await self._future
        except NoScriptError:  # a restarted or flushed Redis: load it again, once
            raw = await self._store.admit_again(self._call)
        return _verdict(raw)


class RedisStore(LimitStore):
    """Limits shared by every replica through one Redis (or Cluster, or Sentinel).

    Admissions and settlements both go through the batcher: every check
    issued in one event-loop turn shares one pipeline, one round trip and one
    socket write, which is most of redis-py's cost per command.
    """

    def __init__(self, client: RedisClient, prefix: str = "gw:", batcher: AutoPipeline | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.batcher = batcher or AutoPipeline(client, timeout_s=2.0)
        self._admit = client.register_script(_ADMIT)
        # Blocks need to know when the connection drops (then Redis may be
        # gone, and a block must not keep admitting): only gateway.storage.resp says so.
        self.takes_blocks = hasattr(client, "send_now")

    @property
    def connected(self) -> bool:
        return bool(getattr(self.client, "connected", False))

    def admit_soon(
        self,
        entity: str,
        quota: Quota,
        request_id: str,
        tokens: int,
        lease_ttl_ms: int,
        periods: Periods,
        window_ms: int = WINDOW_MS,
        ask: BlockAsk | None = None,
    ) -> _RedisVerdict:
        call: list[RedisValue] = [
            *_keys(self.prefix, entity, periods),
            window_ms,
            quota.rpm or 0,
            quota.tpm or 0,
            quota.max_concurrent or 0,
            tokens,
            request_id,
            lease_ttl_ms,
            quota.budget_usd_per_day or 0,
            quota.budget_usd_per_month or 0,
        ]
        if ask is None:
            call += ["", 0, 0.0, 0]
        else:
            call += [ask.id, ask.requests, float(ask.cost_usd), ask.life_ms]
        return _RedisVerdict(self, call, self._evalsha(call))

    async def admit_again(self, call: list[RedisValue]) -> list[Any]:
        """The admission script, loaded into Redis again first (after NOSCRIPT)."""
        self._admit.sha = await self.client.script_load(_ADMIT)
        return await self._evalsha(call)

    def _evalsha(self, call: list[RedisValue]) -> asyncio.Future[list[Any]]:
        """The admission script, queued; the future gets its reply (a list)."""
        sha = self._admit.sha
        return self.batcher.submit(lambda pipe: pipe.evalsha(sha, _KEYS, *call))

    async def settle(
        self,
        entity: str,
        quota: Quota,
        request_id: str,
        tokens: int,
        cost_usd: float,
        periods: Periods,
        reserved: int | None = None,
    ) -> None:
        await self._settle(entity, request_id, tokens, cost_usd, periods, reserved, defer=False)

    def settle_soon(
        self,
        entity: str,
        quota: Quota,
        request_id: str,
        tokens: int,
        cost_usd: float,
        periods: Periods,
        reserved: int | None = None,
    ) -> asyncio.Future[Any]:
        return self._settle(entity, request_id, tokens, cost_usd, periods, reserved, defer=True)

    def _settle(
        self,
        entity: str,
        request_id: str,
        tokens: int,
        cost_usd: float,
        periods: Periods,
        reserved: int | None,
        *,
        defer: bool,
    ) -> asyncio.Future[Any]:
        keys = _keys(self.prefix, entity, periods)[1:]
        args: list[RedisValue] = [
            request_id,
            tokens,
            repr(float(cost_usd)),
            periods.day_ttl_s,
            periods.month_ttl_s,
            "" if reserved is None else reserved,
        ]
        # EVALSHA: the script's text would otherwise go (and be hashed by Redis)
        # with every settlement. After NOSCRIPT (a restarted or flushed Redis)
        # the settlement goes again as EVAL, which loads the script.
        n = len(keys)
        sent = self.batcher.submit(lambda pipe: pipe.evalsha(_SETTLE_SHA, n, *keys, *args), defer=defer)
        settled: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(first: asyncio.Future[Any]) -> None:
            if not first.cancelled() and isinstance(first.exception(), NoScriptError):
                again = self.batcher.submit(lambda pipe: pipe.eval(_SETTLE, n, *keys, *args))
                again.add_done_callback(functools.partial(_copy_outcome, settled))
            else:
                _copy_outcome(settled, first)

        sent.add_done_callback(done)
        return settled

    def return_block_soon(
        self, entity: str, block_id: str, first_unused: int, size: int, unused_tokens: int
    ) -> asyncio.Future[Any]:
        everything = _keys(self.prefix, entity, Periods("", ""))
        keys = everything[:4] + everything[7:10]
        args: list[RedisValue] = [block_id, first_unused, size, unused_tokens]
        return self.batcher.submit(lambda pipe: pipe.eval(_RETURN, len(keys), *keys, *args), defer=True)

    async def spent(self, entity: str, periods: Periods) -> tuple[float, float]:
        keys = _keys(self.prefix, entity, periods)
        day, month = await self.client.mget(keys[5], keys[6])
        return float(day or 0), float(month or 0)

    async def close(self) -> None:
        await self.client.aclose()
