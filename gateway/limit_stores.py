"""Where rate limits, concurrency leases and spend are counted.

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
(``gateway/quota_blocks.py`` says how it stays exact).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from redis.exceptions import NoScriptError

from gateway.redis_pipeline import AutoPipeline

WINDOW_MS = 60_000


@dataclass(slots=True)
class Quota:
    """What one entity (a gateway key, a provider, an endpoint) may use."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget_usd_per_day: float | None = None
    budget_usd_per_month: float | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.rpm, self.tpm, self.max_concurrent,
                                        self.budget_usd_per_day, self.budget_usd_per_month))


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
    def now(cls) -> "Periods":
        second = int(time.time())
        if second != _now[0]:  # formatted once a second, not once a request
            t = time.gmtime(second)
            _now[:] = [second, time.strftime("%Y%m%d", t), time.strftime("%Y%m", t)]
        return cls(day=_now[1], month=_now[2])


_now: list = [-1, "", ""]  # the second Periods.now last formatted, and its day and month


class PendingVerdict(Protocol):
    async def verdict(self) -> Verdict: ...


class _Decided:
    """A verdict known at once (the in-process store)."""

    __slots__ = ("_verdict",)

    def __init__(self, verdict: Verdict) -> None:
        self._verdict = verdict

    async def verdict(self) -> Verdict:
        return self._verdict


class LimitStore(Protocol):
    #: Whether ``admit_soon`` grants blocks (see BlockAsk).
    takes_blocks: bool

    async def admit(self, entity: str, quota: Quota, request_id: str, tokens: int, lease_ttl_ms: int,
                    periods: Periods, window_ms: int = WINDOW_MS) -> Verdict: ...

    def admit_soon(self, entity: str, quota: Quota, request_id: str, tokens: int, lease_ttl_ms: int,
                   periods: Periods, window_ms: int = WINDOW_MS, ask: BlockAsk | None = None) -> PendingVerdict:
        """``admit``, sent now; the verdict is awaited later."""
        ...

    async def settle(self, entity: str, quota: Quota, request_id: str, tokens: int, cost_usd: float,
                     periods: Periods, reserved: int | None = None) -> None:
        """Replace the request's token reservation with ``tokens`` and spend the
        cost. With ``reserved``, ``request_id`` is the block the request came
        from, and its count moves by ``tokens - reserved``."""
        ...

    def settle_soon(self, entity: str, quota: Quota, request_id: str, tokens: int, cost_usd: float,
                    periods: Periods, reserved: int | None = None) -> asyncio.Future | None:
        """``settle`` without waiting: queued in order before any later admission.
        The future (None when it is already done) carries a failure."""
        ...

    def return_block_soon(self, entity: str, block_id: str, first_unused: int, size: int,
                          unused_tokens: int) -> asyncio.Future | None:
        """Give back a block's unused requests (``first_unused``..``size``) and tokens, deferred."""
        ...

    async def spent(self, entity: str, periods: Periods) -> tuple[float, float]: ...

    async def close(self) -> None: ...


# KEYS: 1 requests log (zset id->ts), 2 tokens log (zset id->ts), 3 tokens per id (hash),
#       4 tokens sum (string), 5 leases (zset id->expiry), 6 spend today, 7 spend this month
# ARGV: 1 window_ms, 2 rpm, 3 tpm, 4 max_concurrent, 5 tokens, 6 request id ("" = a block alone), 7 lease ttl ms,
#       8 budget day, 9 budget month   (0 or "" = no limit),
#       10 block id, 11 block requests wanted (0 = none), 12 cost per request, 13 block life ms
# A block's requests are entries "<block id>#<n>", and its tokens one entry
# "<block id>"; both are stamped at the end of the block's life, the latest
# moment one of them can be used, so none leaves the window early.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local rpm, tpm, maxc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, id, ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local bday, bmonth = tonumber(ARGV[8]), tonumber(ARGV[9])
local since = now - window

local function oldest_reset(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) + window - now end
  return 0
end

-- requests
local rcount, rreset = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', since)
  rcount = redis.call('ZCARD', KEYS[1])
  rreset = oldest_reset(KEYS[1])
  if rcount >= rpm then return {'requests', rreset, 0, rreset, 0, 0} end
end
-- tokens: drop expired entries and their share of the sum
local tsum, treset = 0, 0
if tpm > 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', since)
  if #old > 0 then
    local drop = 0
    for _, m in ipairs(old) do drop = drop + tonumber(redis.call('HGET', KEYS[3], m) or '0') end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', since)
    for _, m in ipairs(old) do redis.call('HDEL', KEYS[3], m) end
    redis.call('DECRBY', KEYS[4], drop)
  end
  tsum = tonumber(redis.call('GET', KEYS[4]) or '0')
  if tsum < 0 then tsum = 0 end
  treset = oldest_reset(KEYS[2])
  if tsum + tokens > tpm then
    local wait = treset
    if tsum == 0 then wait = window end
    return {'tokens', wait, math.max(rpm - rcount, 0), rreset, math.max(tpm - tsum, 0), treset}
  end
end
local sday = redis.call('GET', KEYS[6]) or '0'
local smonth = redis.call('GET', KEYS[7]) or '0'
-- concurrency
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= maxc then
    return {'concurrency', 1000, math.max(rpm - rcount, 0), rreset, math.max(tpm - tsum, 0), treset}
  end
end
-- budgets
if bday > 0 and tonumber(sday) >= bday then
  return {'budget_day', 0, 0, 0, 0, 0}
end
if bmonth > 0 and tonumber(smonth) >= bmonth then
  return {'budget_month', 0, 0, 0, 0, 0}
end
-- admitted: commit everything (an empty id asks for a block alone, with room for one request)
if rpm > 0 and id ~= '' then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], window)
  if rcount == 0 then rreset = window end
  rcount = rcount + 1
end
if tpm > 0 and id ~= '' then
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('HSET', KEYS[3], id, tokens)
  redis.call('INCRBY', KEYS[4], tokens)
  for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], window * 2) end
  if treset == 0 then treset = window end
  tsum = tsum + tokens
end
if maxc > 0 and id ~= '' then
  redis.call('ZADD', KEYS[5], now + ttl, id)
  redis.call('PEXPIRE', KEYS[5], ttl * 2)
end
-- a block: never with a concurrency cap, and small beside what is left of
-- each limit, so that near a limit every request is counted one by one
local k, block, cost, life = tonumber(ARGV[11]), ARGV[10], tonumber(ARGV[12]), tonumber(ARGV[13])
if maxc > 0 then k = 0 end
if k > 0 and rpm > 0 then k = math.min(k, math.floor((rpm - rcount) / 16)) end
if k > 0 and tpm > 0 then k = math.min(k, math.floor((tpm - tsum) / (16 * math.max(tokens, 1)))) end
for _, b in ipairs({{bday, sday}, {bmonth, smonth}}) do
  if k > 0 and b[1] > 0 then
    if cost <= 0 then k = 0 else k = math.min(k, math.floor((b[1] - tonumber(b[2])) / (4 * cost))) end
  end
end
if k > 0 then
  local at = now + life
  if rpm > 0 then
    local entries = {}
    for n = 1, k do entries[2 * n - 1] = at; entries[2 * n] = block .. '#' .. n end
    redis.call('ZADD', KEYS[1], unpack(entries))
    redis.call('PEXPIRE', KEYS[1], window * 2)
    rcount = rcount + k
  end
  if tpm > 0 then
    redis.call('ZADD', KEYS[2], at, block)
    redis.call('HSET', KEYS[3], block, k * tokens)
    redis.call('INCRBY', KEYS[4], k * tokens)
    for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], window * 2) end
    tsum = tsum + k * tokens
  end
else
  k = 0
end
return {'', 0, math.max(rpm - rcount, 0), rreset, math.max(tpm - tsum, 0), treset, k, sday, smonth}
"""

# KEYS: 1 tokens log, 2 tokens per id, 3 tokens sum, 4 leases, 5 spend today, 6 spend this month
# ARGV: 1 request id (or block id), 2 real tokens, 3 cost usd, 4 day ttl s, 5 month ttl s,
#       6 tokens the request reserved from its block ("" = not from a block: the entry is its own)
_SETTLE = """
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if entry then
  local delta
  if ARGV[6] == '' then
    delta = tonumber(ARGV[2]) - tonumber(entry)
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  else
    delta = tonumber(ARGV[2]) - tonumber(ARGV[6])
    redis.call('HINCRBY', KEYS[2], ARGV[1], delta)
  end
  redis.call('INCRBY', KEYS[3], delta)
end
redis.call('ZREM', KEYS[4], ARGV[1])
local cost = tonumber(ARGV[3])
if cost > 0 then
  redis.call('INCRBYFLOAT', KEYS[5], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[4])
  redis.call('INCRBYFLOAT', KEYS[6], ARGV[3])
  redis.call('EXPIRE', KEYS[6], ARGV[5])
end
return 1
"""


# KEYS: 1 requests log, 2 tokens log, 3 tokens per id, 4 tokens sum
# ARGV: 1 block id, 2 first unused request, 3 last request of the block, 4 unused tokens
_RETURN = """
local block = ARGV[1]
local first, last = tonumber(ARGV[2]), tonumber(ARGV[3])
if first <= last then
  local entries = {}
  for n = first, last do entries[#entries + 1] = block .. '#' .. n end
  redis.call('ZREM', KEYS[1], unpack(entries))
end
local unused = tonumber(ARGV[4])
if unused > 0 and redis.call('HEXISTS', KEYS[3], block) == 1 then
  redis.call('HINCRBY', KEYS[3], block, -unused)
  redis.call('DECRBY', KEYS[4], unused)
end
return 1
"""


def _keys(prefix: str, entity: str, periods: Periods) -> list[str]:
    tag = f"{prefix}{{{entity}}}"  # one hash slot per entity (Redis Cluster)
    return [f"{tag}:req", f"{tag}:tok", f"{tag}:tokn", f"{tag}:toksum", f"{tag}:lease",
            f"{tag}:spend:{periods.day}", f"{tag}:spend:{periods.month}"]


def _verdict(raw: list) -> Verdict:
    denied = raw[0].decode() if isinstance(raw[0], bytes) else raw[0]
    if len(raw) == 6:  # denied: no block, no spend
        return Verdict(denied or None, *(int(x) for x in raw[1:]))
    return Verdict(denied or None, *(int(x) for x in raw[1:7]), float(raw[7]), float(raw[8]))


class _RedisVerdict:
    """An admission script call in flight."""

    __slots__ = ("_store", "_call", "_future")

    def __init__(self, store: "RedisStore", call: list, future: asyncio.Future) -> None:
        self._store, self._call, self._future = store, call, future

    async def verdict(self) -> Verdict:
        try:
            raw = await self._future
        except NoScriptError:  # a restarted or flushed Redis: load it again, once
            raw = await self._store.admit_again(self._call)
        return _verdict(raw)


class RedisStore:
    """Limits shared by every replica through one Redis (or Cluster, or Sentinel).

    Admissions and settlements both go through the batcher: every check
    issued in one event-loop turn shares one pipeline, one round trip and one
    socket write, which is most of redis-py's cost per command.
    """

    def __init__(self, client, prefix: str = "gw:", batcher: AutoPipeline | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.batcher = batcher or AutoPipeline(client, timeout_s=2.0)
        self._admit = client.register_script(_ADMIT)
        # Blocks need to know when the connection drops (then Redis may be
        # gone, and a block must not keep admitting): only gateway.resp says so.
        self.takes_blocks = hasattr(client, "send_now")

    @property
    def connected(self) -> bool:
        return bool(getattr(self.client, "connected", False))

    async def admit(self, entity: str, quota: Quota, request_id: str, tokens: int, lease_ttl_ms: int,
                    periods: Periods, window_ms: int = WINDOW_MS, ask: BlockAsk | None = None) -> Verdict:
        return await self.admit_soon(entity, quota, request_id, tokens, lease_ttl_ms, periods, window_ms,
                                     ask).verdict()

    def admit_soon(self, entity: str, quota: Quota, request_id: str, tokens: int, lease_ttl_ms: int,
                   periods: Periods, window_ms: int = WINDOW_MS, ask: BlockAsk | None = None) -> "_RedisVerdict":
        call = [*_keys(self.prefix, entity, periods), window_ms, quota.rpm or 0, quota.tpm or 0,
                quota.max_concurrent or 0, tokens, request_id, lease_ttl_ms, quota.budget_usd_per_day or 0,
                quota.budget_usd_per_month or 0]
        if ask is None:
            call += ["", 0, 0.0, 0]
        else:
            call += [ask.id, ask.requests, float(ask.cost_usd), ask.life_ms]
        return _RedisVerdict(self, call, self._evalsha(call))

    async def admit_again(self, call: list) -> list:
        """The admission script, loaded into Redis again first (after NOSCRIPT)."""
        self._admit.sha = await self.client.script_load(_ADMIT)
        return await self._evalsha(call)

    def _evalsha(self, call: list) -> asyncio.Future:
        sha = self._admit.sha
        return self.batcher.submit(lambda pipe: pipe.evalsha(sha, 7, *call))

    async def settle(self, entity: str, quota: Quota, request_id: str, tokens: int, cost_usd: float,
                     periods: Periods, reserved: int | None = None) -> None:
        await self._settle(entity, request_id, tokens, cost_usd, periods, reserved, defer=False)

    def settle_soon(self, entity: str, quota: Quota, request_id: str, tokens: int, cost_usd: float,
                    periods: Periods, reserved: int | None = None) -> asyncio.Future:
        return self._settle(entity, request_id, tokens, cost_usd, periods, reserved, defer=True)

    def _settle(self, entity: str, request_id: str, tokens: int, cost_usd: float, periods: Periods,
                reserved: int | None, *, defer: bool) -> asyncio.Future:
        keys = _keys(self.prefix, entity, periods)[1:]
        args = [request_id, tokens, repr(float(cost_usd)), periods.day_ttl_s, periods.month_ttl_s,
                "" if reserved is None else reserved]
        # EVAL, not EVALSHA: no NOSCRIPT case to handle after a Redis restart,
        # and Redis caches the compiled script by its hash anyway.
        return self.batcher.submit(lambda pipe: pipe.eval(_SETTLE, len(keys), *keys, *args), defer=defer)

    def return_block_soon(self, entity: str, block_id: str, first_unused: int, size: int,
                          unused_tokens: int) -> asyncio.Future:
        keys = _keys(self.prefix, entity, Periods("", ""))[:4]
        args = [block_id, first_unused, size, unused_tokens]
        return self.batcher.submit(lambda pipe: pipe.eval(_RETURN, len(keys), *keys, *args), defer=True)

    async def spent(self, entity: str, periods: Periods) -> tuple[float, float]:
        keys = _keys(self.prefix, entity, periods)
        day, month = await self.client.mget(keys[5], keys[6])
        return float(day or 0), float(month or 0)

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(slots=True)
class _Entity:
    # Insertion order is time order, so expired entries are always at the front.
    requests: dict[str, int] = field(default_factory=dict)  # id -> admitted at (ms)
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (at ms, tokens)
    token_sum: int = 0
    leases: dict[str, int] = field(default_factory=dict)  # id -> expires at (ms)
    spend: dict[str, float] = field(default_factory=dict)  # period -> usd

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


class MemoryStore:
    """The same limits kept in this process: exact for one replica only.

    Checks never await, so on one event loop each is atomic; expiry is
    amortized O(1) per request.
    """

    takes_blocks = False  # nothing to save: every check is already in-process
    connected = True

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._entities: dict[str, _Entity] = {}

    def _now(self) -> int:
        return int(self._clock() * 1000)

    async def admit(self, entity: str, quota: Quota, request_id: str, tokens: int, lease_ttl_ms: int,
                    periods: Periods, window_ms: int = WINDOW_MS, ask: BlockAsk | None = None) -> Verdict:
        return self._admit(entity, quota, request_id, tokens, lease_ttl_ms, periods, window_ms)

    def admit_soon(self, entity: str, quota: Quota, request_id: str, tokens: int, lease_ttl_ms: int,
                   periods: Periods, window_ms: int = WINDOW_MS, ask: BlockAsk | None = None) -> _Decided:
        return _Decided(self._admit(entity, quota, request_id, tokens, lease_ttl_ms, periods, window_ms))

    def _admit(self, entity: str, quota: Quota, request_id: str, tokens: int, lease_ttl_ms: int,
               periods: Periods, window_ms: int) -> Verdict:
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
            return Verdict("tokens", treset if tsum else window_ms, max(rpm - rcount, 0), rreset,
                           max(tpm - tsum, 0), treset)
        if quota.max_concurrent and len(e.leases) >= quota.max_concurrent:
            return Verdict("concurrency", 1000, max(rpm - rcount, 0), rreset, max(tpm - tsum, 0), treset)
        if quota.budget_usd_per_day and e.spend.get(periods.day, 0.0) >= quota.budget_usd_per_day:
            return Verdict("budget_day")
        if quota.budget_usd_per_month and e.spend.get(periods.month, 0.0) >= quota.budget_usd_per_month:
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
        return Verdict(None, 0, max(rpm - rcount, 0) if rpm else 0, rreset if rpm else 0,
                       max(tpm - tsum, 0) if tpm else 0, treset if tpm else 0)

    async def settle(self, entity: str, quota: Quota, request_id: str, tokens: int, cost_usd: float,
                     periods: Periods, reserved: int | None = None) -> None:
        self.settle_soon(entity, quota, request_id, tokens, cost_usd, periods, reserved)

    def settle_soon(self, entity: str, quota: Quota, request_id: str, tokens: int, cost_usd: float,
                    periods: Periods, reserved: int | None = None) -> None:
        e = self._entities.setdefault(entity, _Entity())
        if request_id in e.tokens:
            at, entry = e.tokens[request_id]
            delta = tokens - (entry if reserved is None else reserved)
            e.tokens[request_id] = (at, entry + delta)
            e.token_sum += delta
        e.leases.pop(request_id, None)
        if cost_usd > 0:
            for period in (periods.day, periods.month):
                e.spend[period] = e.spend.get(period, 0.0) + cost_usd

    def return_block_soon(self, entity: str, block_id: str, first_unused: int, size: int,
                          unused_tokens: int) -> None:
        raise NotImplementedError("the in-process store grants no blocks")

    async def spent(self, entity: str, periods: Periods) -> tuple[float, float]:
        e = self._entities.get(entity)
        if e is None:
            return 0.0, 0.0
        return e.spend.get(periods.day, 0.0), e.spend.get(periods.month, 0.0)

    async def close(self) -> None:
        return None
