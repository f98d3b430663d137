"""What every limit store answers: verdicts, blocks, budget periods, and the store protocol."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import Quota

WINDOW_MS = 60_000


@dataclass(slots=True)
class Verdict:
    """The outcome of one admission check.

    ``denied`` is None when admitted, else one of ``requests``, ``tokens``,
    ``concurrency``, ``budget_day``, ``budget_month``.
    """

    denied: str | None
    retry_after_ms: int = 0
    requests_remaining: int = 0
    requests_reset_ms: int = 0
    tokens_remaining: int = 0
    tokens_reset_ms: int = 0
    block: int = 0  # requests granted beyond this one, as a block (see BlockAsk)
    spent_day: float = 0.0  # the spend when the block was granted
    spent_month: float = 0.0
    block_cost: int = 0  # under a budget, the cost each place of the block reserves (nano-USD)


@dataclass(slots=True)
class BlockAsk:
    """Asks an admission for a block of up to ``requests`` more requests, each
    with the asker's token reservation, counted in Redis now and good for
    ``life_ms``. ``cost_usd`` is the expected cost of one request (0 when
    unknown), to keep a block small beside the budget left."""

    id: str
    requests: int
    cost_usd: float
    life_ms: int


@dataclass(slots=True)
class Periods:
    """The budget periods a request falls in (UTC)."""

    day: str
    month: str
    day_ttl_s: int = 2 * 86400
    month_ttl_s: int = 32 * 86400

    @classmethod
    def now(cls) -> Periods:
        global _now
        second = int(time.time())
        if second != _now[0]:  # formatted once a second, not once a request
            t = time.gmtime(second)
            _now = (second, time.strftime("%Y%m%d", t), time.strftime("%Y%m", t))
        return cls(day=_now[1], month=_now[2])


_now: tuple[int, str, str] = (-1, "", "")  # the second Periods.now last formatted, and its day and month


class PendingVerdict(Protocol):
    """An admission sent; its verdict is awaited later."""

    async def verdict(self) -> Verdict: ...


class Decided:
    """A verdict known at once (the in-process store)."""

    __slots__ = ("_verdict",)

    def __init__(self, verdict: Verdict) -> None:
        self._verdict = verdict

    async def verdict(self) -> Verdict:
        return self._verdict


class LimitStore(Protocol):
    #: Whether ``admit_soon`` grants blocks (see BlockAsk).
    takes_blocks: bool

    @property
    def connected(self) -> bool:
        """False while the store cannot be reached (then no block may be used)."""
        ...

    async def admit(
        self,
        entity: str,
        quota: Quota,
        request_id: str,
        tokens: int,
        lease_ttl_ms: int,
        periods: Periods,
        window_ms: int = WINDOW_MS,
        ask: BlockAsk | None = None,
    ) -> Verdict:
        """Check and count one request; a block too when ``ask`` says so."""
        pending = self.admit_soon(entity, quota, request_id, tokens, lease_ttl_ms, periods, window_ms, ask)
        return await pending.verdict()

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
    ) -> PendingVerdict:
        """``admit``, sent now; the verdict is awaited later."""
        ...

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
        """Replace the request's token reservation with ``tokens`` and spend the
        cost. With ``reserved``, ``request_id`` is the block the request came
        from, and its count moves by ``tokens - reserved``."""
        ...

    def settle_soon(
        self,
        entity: str,
        quota: Quota,
        request_id: str,
        tokens: int,
        cost_usd: float,
        periods: Periods,
        reserved: int | None = None,
    ) -> asyncio.Future[Any] | None:
        """``settle`` without waiting: queued in order before any later admission.
        The future (None when it is already done) carries a failure."""
        ...

    def return_block_soon(
        self, entity: str, block_id: str, first_unused: int, size: int, unused_tokens: int
    ) -> asyncio.Future[Any] | None:
        """Give back a block's unused requests (``first_unused``..``size``) and tokens, deferred."""
        ...

    async def spent(self, entity: str, periods: Periods) -> tuple[float, float]: ...

    async def close(self) -> None: ...
