"""Rate limits, concurrency caps and budgets, for gateway keys and upstreams.

A gateway key's limits are checked once at admission, in one atomic round
trip to the store, or in none while this worker holds a block of the key's
quota (``gateway/limits/blocks.py``). The check is settled when the request
ends, streams and cancelled streams included: the token reservation (prompt
estimate + max_tokens) is replaced by the real usage and the cost is drawn
from the budgets. Under a budget, an admitted request reserves the key's last
cost per request until then, so requests in flight on every worker count
against the budget before their own cost is known. An upstream's own quota (``rpm``/``tpm``/``max_concurrent``
on a provider or an endpoint) is taken per attempt through an
:class:`UpstreamQuota`, so routing skips an endpoint at its cap instead of
collecting 429s.

When the store fails, ``[redis] on_error`` decides: ``open`` serves anyway
(reported through ``on_store_error`` and logged once per interval),
``closed`` answers 503. A dead or hung Redis is caught by the client's socket
timeouts (``timeout_s``); every pipeline is also bounded by the wider
``backstop_s`` (``gateway/storage/connect.py``), wide so that a busy event
loop under load is not mistaken for a Redis failure, which would fail open
and let requests past the limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import Quota
from gateway.errors import GatewayError
from gateway.limits.blocks import Block
from gateway.limits.stores import BlockAsk, LimitStore, PendingVerdict, Periods, Verdict

log = logging.getLogger("gateway.limits")
_LOG_EVERY_S = 30.0


def duration(ms: int) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


def headers_for(quota: Quota, v: Verdict) -> dict[str, str]:
    """OpenAI's rate-limit headers, for the limits this key has."""
    out: dict[str, str] = {}
    if quota.rpm:
        out["x-ratelimit-limit-requests"] = str(quota.rpm)
        out["x-ratelimit-remaining-requests"] = str(v.requests_remaining)
        out["x-ratelimit-reset-requests"] = duration(v.requests_reset_ms)
    if quota.tpm:
        out["x-ratelimit-limit-tokens"] = str(quota.tpm)
        out["x-ratelimit-remaining-tokens"] = str(v.tokens_remaining)
        out["x-ratelimit-reset-tokens"] = duration(v.tokens_reset_ms)
    return out


_MESSAGES = {
    "requests": (429, "rate limit reached for requests per minute", "rate_limit_exceeded"),
    "tokens": (429, "rate limit reached for tokens per minute", "rate_limit_exceeded"),
    "concurrency": (429, "too many concurrent requests for this key", "concurrency_limit_exceeded"),
    "budget_day": (402, "the daily budget of this key is spent", "budget_exceeded"),
    "budget_month": (402, "the monthly budget of this key is spent", "budget_exceeded"),
}


class Refused(GatewayError):
    """A request the key's limits refuse; ``reason`` names the limit."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str,
        code: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(status, message, code=code, headers=headers, param=param)
        self.reason = reason


@dataclass(slots=True)
class Admission:
    """A key's admitted request: what to settle later and the headers to send."""

    entity: str
    quota: Quota
    request_id: str
    periods: Periods
    headers: dict[str, str]
    counted: bool  # False when the store failed open: nothing to settle
    block: str | None = None  # the block it was admitted from, if any
    reserved: int = 0  # the tokens it reserved


@dataclass(slots=True)
class KeyCheck:
    """An admission check under way (see ``Limiter.begin_key``)."""

    entity: str
    name: str
    quota: Quota
    request_id: str
    periods: Periods
    tokens: int
    pending: PendingVerdict | None = None
    error: Exception | None = None
    ask: BlockAsk | None = None
    sent: float = 0.0
    local: Verdict | None = None  # admitted from a block, no round trip
    block: str | None = None


class Limiter:
    """Keys' and upstreams' limits over one store (Redis or in-process)."""

    def __init__(
        self,
        store: LimitStore,
        *,
        on_error: str = "open",
        lease_ttl_s: float = 600.0,
        block_requests: int = 0,
        block_s: float = 1.0,
        on_store_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.on_error = on_error
        self.on_store_error = on_store_error
        self.lease_ttl_ms = int(lease_ttl_s * 1000)
        self._last_log = 0.0
        self.block_requests = block_requests if store.takes_blocks else 0
        self.block_s = block_s
        self._blocks: dict[str, list[Block]] = {}  # entity -> the blocks this worker holds, oldest first
        self._tasks: set[asyncio.Task[None]] = set()  # blocks asked for ahead
        self._asking: set[str] = set()  # entities with a block asked for and not yet answered
        self._cost: dict[str, float] = {}  # entity -> recent cost per request, for keys with budgets

    def _store_failed(self, exc: BaseException) -> None:
        self.on_store_error()
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning("rate-limit store unavailable (%s); failing %s", type(exc).__name__, self.on_error)

    def begin_key(self, name: str, quota: Quota, request_id: str, tokens: int) -> KeyCheck:
        """Send a gateway key's admission check, unless a block this worker
        holds admits it; ``finish_key`` gives its outcome. The caller may work
        meanwhile, but must always finish the check."""
        check = KeyCheck(f"key:{name}", name, quota, request_id, Periods.now(), tokens)
        if quota.empty:
            return check
        entity = check.entity
        if entity in self._blocks and self.store.connected:
            taken = self._take(check)
            if taken is not None:
                block, check.local = taken
                check.block = block.id
                held = self._blocks[entity]
                if len(held) == 1 and block.left * 4 <= block.size and entity not in self._asking:
                    self._ask_ahead(check)  # the next block arrives before this one runs out
                return check
        if self.block_requests and quota.max_concurrent is None and entity not in self._asking:
            # One ask per key at a time: concurrent requests would each be granted
            # a block before any of them could be used.
            check.ask = self._ask(entity, request_id + ":b")
            self._asking.add(entity)
        check.sent = time.monotonic()
        try:
            check.pending = self.store.admit_soon(
                entity, quota, request_id, tokens, self.lease_ttl_ms, check.periods, ask=check.ask
            )
        except Exception as exc:  # noqa: BLE001 - reported by finish_key
            check.error = exc
        return check

    async def finish_key(self, check: KeyCheck) -> Admission:
        """The admitted request, or raise the 429/402/503 to answer."""
        if check.local is not None:
            return Admission(
                check.entity,
                check.quota,
                check.request_id,
                check.periods,
                headers_for(check.quota, check.local),
                True,
                check.block,
                check.tokens,
            )
        if check.pending is None and check.error is None:
            return Admission(check.entity, check.quota, check.request_id, check.periods, {}, counted=False)
        try:
            if check.error is not None:
                raise check.error
            assert check.pending is not None
            verdict = await check.pending.verdict()
        except Exception as exc:  # noqa: BLE001 - any store failure degrades the same way
            self._store_failed(exc)
            if self.on_error == "closed":
                raise GatewayError(
                    503,
                    "rate limiting is unavailable; try again shortly",
                    code="rate_limiter_unavailable",
                    headers={"retry-after": "1"},
                ) from None
            return Admission(check.entity, check.quota, check.request_id, check.periods, {}, counted=False)
        finally:
            if check.ask is not None:
                self._asking.discard(check.entity)
        if verdict.block and check.ask is not None:
            self._hold(check, check.ask.id, check.sent, verdict)
        if verdict.denied in ("requests", "tokens") and check.entity in self._blocks:
            # A block this worker holds has places counted in Redis already.
            taken = self._take(check)
            if taken is not None:
                block, local = taken
                return Admission(
                    check.entity,
                    check.quota,
                    check.request_id,
                    check.periods,
                    headers_for(check.quota, local),
                    True,
                    block.id,
                    check.tokens,
                )
        headers = headers_for(check.quota, verdict)
        if verdict.denied is not None:
            status, message, code = _MESSAGES[verdict.denied]
            if status == 429:
                headers["retry-after"] = str(max(1, math.ceil(verdict.retry_after_ms / 1000)))
            raise Refused(status, message, reason=verdict.denied, code=code, headers=headers)
        return Admission(
            check.entity, check.quota, check.request_id, check.periods, headers, True, reserved=check.tokens
        )

    def _ask(self, entity: str, block_id: str) -> BlockAsk:
        return BlockAsk(block_id, self.block_requests, self._cost.get(entity, 0.0), int(self.block_s * 1000))

    def _take(self, check: KeyCheck) -> tuple[Block, Verdict] | None:
        """A place in the oldest block this worker holds that can take the
        request; blocks that cannot (used up, expired, ...) are ended on the way."""
        held = self._blocks[check.entity]
        now = time.monotonic()
        while held:
            block = held[0]
            verdict = block.take(check.quota, check.tokens, check.periods, now)
            if verdict is not None:
                return block, verdict
            self._end_block(check.entity, block)
        return None

    def _ask_ahead(self, check: KeyCheck) -> None:
        """Ask for the next block (a block alone, no request) while this one still has places."""
        entity = check.entity
        ask = self._ask(entity, check.request_id + ":n")
        sent = time.monotonic()
        try:
            pending = self.store.admit_soon(
                entity, check.quota, "", check.tokens, self.lease_ttl_ms, check.periods, ask=ask
            )
        except Exception as exc:  # noqa: BLE001 - any store failure degrades the same way
            self._store_failed(exc)
            return
        self._asking.add(entity)
        task = asyncio.get_running_loop().create_task(self._asked_ahead(check, ask, sent, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _asked_ahead(self, check: KeyCheck, ask: BlockAsk, sent: float, pending: PendingVerdict) -> None:
        try:
            verdict = await pending.verdict()
        except Exception as exc:  # noqa: BLE001 - the request path asks again when it must
            self._store_failed(exc)
            return
        finally:
            self._asking.discard(check.entity)
        if verdict.block:
            self._hold(check, ask.id, sent, verdict)

    def _hold(self, check: KeyCheck, block_id: str, sent: float, verdict: Verdict) -> None:
        """Keep a block granted to ``check``'s key (places with its token
        reservation), and hand back what is left of it when its life ends."""
        block = Block.granted_by(verdict, check.quota, block_id, check.tokens, sent, self.block_s, check.periods)
        self._blocks.setdefault(check.entity, []).append(block)
        asyncio.get_running_loop().call_later(
            max(block.expires - time.monotonic(), 0.0), self._end_block, check.entity, block
        )

    def _end_block(self, entity: str, block: Block) -> None:
        """Stop using a block and give back its unused places (deferred, like settlements)."""
        held = self._blocks.get(entity)
        if held is not None and block in held:
            held.remove(block)
            if not held:
                del self._blocks[entity]
        if not block.holds_anything_in_redis:
            return
        try:
            pending = self.store.return_block_soon(entity, block.id, block.first_unused, block.size, block.tokens_left)
        except Exception as exc:  # noqa: BLE001 - any store failure degrades the same way
            self._store_failed(exc)
            return
        block.left = block.tokens_left = 0
        if pending is not None:
            pending.add_done_callback(self._settled)

    def held(self, entity: str) -> list[Block]:
        """The blocks this worker holds for an entity, oldest first."""
        return list(self._blocks.get(entity, ()))

    def return_blocks(self) -> None:
        """Give back every block this worker holds (at shut-down)."""
        for entity, held in list(self._blocks.items()):
            for block in list(held):
                self._end_block(entity, block)

    async def admit_key(self, name: str, quota: Quota, request_id: str, tokens: int) -> Admission:
        """Admit a request under a gateway key, or raise the 429/402/503 to answer."""
        return await self.finish_key(self.begin_key(name, quota, request_id, tokens))

    async def settle_key(self, admission: Admission, tokens: int, cost_usd: float | None) -> None:
        """Reconcile the reservation with real usage and spend the cost. Never raises."""
        settlement = self._settlement(admission, tokens, cost_usd)
        if settlement is None:
            return
        try:
            await self.store.settle(*settlement)
        except Exception as exc:  # noqa: BLE001 - any store failure degrades the same way
            self._store_failed(exc)

    def settle_key_soon(self, admission: Admission, tokens: int, cost_usd: float | None) -> None:
        """``settle_key`` without waiting (see ``AutoPipeline``'s deferred ops). Never raises."""
        settlement = self._settlement(admission, tokens, cost_usd)
        if settlement is None:
            return
        try:
            pending = self.store.settle_soon(*settlement)
        except Exception as exc:  # noqa: BLE001 - any store failure degrades the same way
            self._store_failed(exc)
            return
        if pending is not None:
            pending.add_done_callback(self._settled)

    def _settlement(
        self, admission: Admission, tokens: int, cost_usd: float | None
    ) -> tuple[str, Quota, str, int, float, Periods, int | None] | None:
        """The store's settle arguments; None when nothing was counted."""
        if not admission.counted:
            return None
        cost = cost_usd or 0.0
        entity, quota = admission.entity, admission.quota
        if cost > 0 and (quota.budget_usd_per_day or quota.budget_usd_per_month):
            self._cost[entity] = max(cost, 0.9 * self._cost.get(entity, 0.0))
            for block in self._blocks.get(entity, ()):
                block.spend(cost)
        # From a block: its one token entry moves by what this request did not use.
        if admission.block:
            return entity, quota, admission.block, tokens, cost, admission.periods, admission.reserved
        return entity, quota, admission.request_id, tokens, cost, admission.periods, None

    def _settled(self, future: asyncio.Future[object]) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            self._store_failed(exc)

    async def acquire_upstream(self, entities: list[tuple[str, Quota]], request_id: str, tokens: int) -> bool:
        """Take one attempt's share of upstream quotas; False = at cap, skip it.

        A store failure counts as allowed: an upstream's own 429 still fails
        over, so failing open cannot hurt the caller.
        """
        taken: list[tuple[str, Quota]] = []
        periods = Periods.now()
        for entity, quota in entities:
            try:
                verdict = await self.store.admit(entity, quota, request_id, tokens, self.lease_ttl_ms, periods)
            except Exception as exc:  # noqa: BLE001 - any store failure degrades the same way
                self._store_failed(exc)
                continue
            if verdict.denied is not None:
                await self.release_upstream(taken, request_id, 0)
                return False
            taken.append((entity, quota))
        return True

    async def release_upstream(self, entities: list[tuple[str, Quota]], request_id: str, tokens: int) -> None:
        periods = Periods.now()
        for entity, quota in entities:
            try:
                await self.store.settle(entity, quota, request_id, tokens, 0.0, periods)
            except Exception as exc:  # noqa: BLE001 - any store failure degrades the same way
                self._store_failed(exc)

    def upstream_quota(self, request_id: str, tokens: int) -> UpstreamQuota:
        """One request's hold on the upstream quotas its attempts take."""
        return UpstreamQuota(self, request_id, tokens)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.store.close()


class UpstreamQuota:
    """One request's share of upstream quotas (an endpoint's and its provider's):
    taken per attempt with the request's token estimate, handed back with the
    tokens really used."""

    __slots__ = ("_limiter", "_request_id", "_tokens")

    def __init__(self, limiter: Limiter, request_id: str, tokens: int) -> None:
        self._limiter = limiter
        self._request_id = request_id
        self._tokens = tokens

    async def take(self, quotas: list[tuple[str, Quota]]) -> bool:
        """False when one of the quotas is at its cap: skip that endpoint."""
        return not quotas or await self._limiter.acquire_upstream(quotas, self._request_id, self._tokens)

    async def give_back(self, quotas: list[tuple[str, Quota]], tokens: int) -> None:
        if quotas:
            await self._limiter.release_upstream(quotas, self._request_id, tokens)
