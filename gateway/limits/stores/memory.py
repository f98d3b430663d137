"""Limits kept in this process: the same sliding-window logic as the Redis
scripts, exact for one replica."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import Quota
from gateway.limits.stores.base import WINDOW_MS, BlockAsk, Decided, LimitStore, Periods, Verdict


@dataclass(slots=True)
class _Entity:
    # Insertion order is time order, so expired entries are always at the front.
    requests: dict[str, int] = field(default_factory=dict)  # id -> admitted at (ms)
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (at ms, tokens)
    token_sum: int = 0
    leases: dict[str, int] = field(default_factory=dict)  # id -> expires at (ms)
    spend: dict[str, float] = field(default_factory=dict)  # period -> usd
    #: Under a budget: the cost each admitted request is expected to have
    #: (the last cost settled), held until it is settled; id -> (expires at, usd).
    pending: dict[str, tuple[int, float]] = field(default_factory=dict)
    pending_sum: float = 0.0
    last_cost: float = 0.0

    def expire(self, since: int, now: int) -> None:
        while self.requests:
            key, at = next(iter(self.requests.items()))
            if at > since:
                break
            del self.requests[key]
        while self.tokens:
            key, (at, n) = next(iter(self.tokens.items()))
            if at > since:
                break
            del self.tokens[key]
            self.token_sum -= n
        while self.leases:
            key, until = next(iter(self.leases.items()))
            if until > now:
                break
            del self.leases[key]
        while self.pending:
            key, (until, cost) = next(iter(self.pending.items()))
            if until > now:
                break
            del self.pending[key]
            self.pending_sum -= cost
        if not self.pending:
            self.pending_sum = 0.0  # no rounding left over


class MemoryStore(LimitStore):
    """The same limits kept in this process: exact for one replica only.

    Checks never await, so on one event loop each is atomic; expiry is
    amortized O(1) per request.
    """

    takes_blocks = False  # nothing to save: every check is already in-process
    connected = True

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entities: dict[str, _Entity] = {}

    def _now(self) -> int:
        return int(self._clock() * 1000)

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
    ) -> Decided:
        return Decided(self._admit(entity, quota, request_id, tokens, lease_ttl_ms, periods, window_ms))

    def _admit(
        self,
        entity: str,
        quota: Quota,
        request_id: str,
        tokens: int,
        lease_ttl_ms: int,
        periods: Periods,
        window_ms: int,
    ) -> Verdict:
        e = self._entities.setdefault(entity, _Entity())
        now = self._now()
        e.expire(now - window_ms, now)
        rpm, tpm = quota.rpm or 0, quota.tpm or 0
        rcount, tsum = len(e.requests), e.token_sum
        rreset = next(iter(e.requests.values())) + window_ms - now if e.requests else 0
        treset = next(iter(e.tokens.values()))[0] + window_ms - now if e.tokens else 0
        if rpm and rcount >= rpm:
            return Verdict("requests", rreset, 0, rreset, 0, 0)
        if tpm and tsum + tokens > tpm:
            return Verdict(
                "tokens", treset if tsum else window_ms, max(rpm - rcount, 0), rreset, max(tpm - tsum, 0), treset
            )
        if quota.max_concurrent and len(e.leases) >= quota.max_concurrent:
            return Verdict("concurrency", 1000, max(rpm - rcount, 0), rreset, max(tpm - tsum, 0), treset)
        # Budgets count the requests in flight at the key's last cost (as admit.lua does).
        pending = max(e.pending_sum, 0.0)
        if quota.budget_usd_per_day and e.spend.get(periods.day, 0.0) + pending >= quota.budget_usd_per_day:
            return Verdict("budget_day")
        if quota.budget_usd_per_month and e.spend.get(periods.month, 0.0) + pending >= quota.budget_usd_per_month:
            return Verdict("budget_month")
        if rpm:
            e.requests[request_id] = now
            rreset = rreset or window_ms
            rcount += 1
        if tpm:
            e.tokens[request_id] = (now, tokens)
            e.token_sum += tokens
            treset = treset or window_ms
            tsum += tokens
        if quota.max_concurrent:
            e.leases[request_id] = now + lease_ttl_ms
        if (quota.budget_usd_per_day or quota.budget_usd_per_month) and e.last_cost > 0:
            e.pending[request_id] = (now + lease_ttl_ms, e.last_cost)
            e.pending_sum += e.last_cost
        return Verdict(
            None,
            0,
            max(rpm - rcount, 0) if rpm else 0,
            rreset if rpm else 0,
            max(tpm - tsum, 0) if tpm else 0,
            treset if tpm else 0,
        )

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
        self.settle_soon(entity, quota, request_id, tokens, cost_usd, periods, reserved)

    def settle_soon(
        self,
        entity: str,
        quota: Quota,
        request_id: str,
        tokens: int,
        cost_usd: float,
        periods: Periods,
        reserved: int | None = None,
    ) -> None:
        e = self._entities.setdefault(entity, _Entity())
        if request_id in e.tokens:
            at, entry = e.tokens[request_id]
            delta = tokens - (entry if reserved is None else reserved)
            e.tokens[request_id] = (at, entry + delta)
            e.token_sum += delta
        e.leases.pop(request_id, None)
        held = e.pending.pop(request_id, None)
        if held is not None:
            e.pending_sum = e.pending_sum - held[1] if e.pending else 0.0
        if cost_usd > 0:
            for period in (periods.day, periods.month):
                e.spend[period] = e.spend.get(period, 0.0) + cost_usd
            e.last_cost = cost_usd

    def return_block_soon(self, entity: str, block_id: str, first_unused: int, size: int, unused_tokens: int) -> None:
        raise NotImplementedError("the in-process store grants no blocks")

    async def spent(self, entity: str, periods: Periods) -> tuple[float, float]:
        e = self._entities.get(entity)
        if e is None:
            return 0.0, 0.0
        return e.spend.get(periods.day, 0.0), e.spend.get(periods.month, 0.0)

    async def close(self) -> None:
        return None
