"""Blocks of a gateway key's quota, held by one worker between Redis round trips.

Why: an exact admission is a Redis round trip per request, and on a busy
host a loopback round trip is a large share of what the gateway adds to a
request. So an admission may also ask for a *block*: up to ``requests`` more
requests (each with the asker's token reservation), counted in Redis at once,
which this worker then admits with no round trip until the block is used up,
no longer fits a request, or its life (``[redis] block_s``) ends. Unused parts
go back to Redis then. When a quarter of a block is left, the next one is
asked for ahead (a block alone, with no request of its own), so that at a
steady rate no request waits for Redis at all.

Why it stays exact:

- A block's requests and tokens are entries in the key's sliding-window logs
  like any request's, stamped at the end of the block's life, the latest
  moment one can be used. So no 60-second span ever counts fewer than the
  requests really admitted in it; the cost is that an entry may count up to
  one block life early and linger one block life late.
- Redis sizes each block at most 1/16 of what is left of the rpm and tpm
  limits and 1/4 of what is left of a budget at the key's recent cost per
  request: near a limit, blocks shrink to nothing and every request is
  counted one by one, exactly as without blocks. A key with a concurrency cap
  never gets one, and a key without a known cost gets none against a budget.
- A request that Redis refuses for requests or tokens may still take a place
  in a block this worker holds, as the block's places are already counted.
- Under a budget, every admitted request and every place of a block
  reserves the key's last cost per request in Redis until it is settled (a
  place never used gives its reservation back with the block), and budgets
  are checked against the spend plus those reservations: requests in
  flight on any worker count before their cost is known, so at a steady cost
  per request the number admitted is exact. A block is sized so that its
  places, at that cost, take at most a quarter of what is left. What a
  budget can still be overrun by: a request's real cost beyond the key's
  last one, and requests admitted before any cost of the key was known.
- A block stops being used once the Redis connection drops: with Redis gone,
  ``[redis] on_error`` decides, as it does without blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.config import Quota
from gateway.limits.stores import Periods, Verdict


@dataclass(slots=True, eq=False)  # each block is one grant: compared by identity
class Block:
    """A block granted to this worker: what is left of it, and Redis's figures at grant."""

    id: str
    quota: Quota  # the key's limits when it was granted
    size: int  # requests granted; places are numbered 1..size in Redis (under an rpm limit)
    left: int
    tokens_left: int  # 0 without a tpm limit: nothing of it is counted in Redis then
    expires: float  # monotonic: when the admission asking for it was sent, plus its life
    granted: float  # monotonic, when the grant arrived
    periods: Periods
    at_grant: Verdict  # remaining requests and tokens after the whole block, resets, spend
    cost_each: int = 0  # under a budget, the cost each place reserves in Redis (nano-USD)

    @classmethod
    def granted_by(
        cls,
        verdict: Verdict,
        quota: Quota,
        block_id: str,
        tokens_each: int,
        sent: float,
        life_s: float,
        periods: Periods,
    ) -> Block:
        tokens = verdict.block * tokens_each if quota.tpm else 0
        return cls(
            block_id,
            quota,
            verdict.block,
            verdict.block,
            tokens,
            sent + life_s,
            time.monotonic(),
            periods,
            verdict,
            verdict.block_cost,
        )

    def take(self, quota: Quota, tokens: int, periods: Periods, now: float) -> Verdict | None:
        """Admit one request from this block, or None when it cannot (used up,
        too few tokens left, expired, a new budget period, the budget spent)."""
        if self.left <= 0 or now >= self.expires or (quota.tpm and tokens > self.tokens_left):
            return None
        if periods.day != self.periods.day or periods.month != self.periods.month:
            return None
        g = self.at_grant
        if quota.budget_usd_per_day and g.spent_day >= quota.budget_usd_per_day:
            return None
        if quota.budget_usd_per_month and g.spent_month >= quota.budget_usd_per_month:
            return None
        self.left -= 1
        if quota.tpm:
            self.tokens_left -= tokens
        elapsed_ms = int((now - self.granted) * 1000)
        return Verdict(
            None,
            0,
            g.requests_remaining + self.left,
            max(g.requests_reset_ms - elapsed_ms, 0),
            g.tokens_remaining + self.tokens_left,
            max(g.tokens_reset_ms - elapsed_ms, 0),
        )

    def spend(self, cost_usd: float) -> None:
        """This worker's spend since the grant, for the budget checks."""
        self.at_grant.spent_day += cost_usd
        self.at_grant.spent_month += cost_usd

    @property
    def holds_anything_in_redis(self) -> bool:
        """Whether handing it back changes anything in Redis: unused places
        are entries only under an rpm limit, or reservations of cost under a
        budget; unused tokens only under tpm."""
        return (self.left > 0 and (bool(self.quota.rpm) or self.cost_each > 0)) or self.tokens_left > 0

    @property
    def first_unused(self) -> int:
        return self.size - self.left + 1
