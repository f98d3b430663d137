"""The limit stores against a real Redis server, and the in-process twin."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from gateway.config import Quota
from gateway.limits.stores import MemoryStore, Periods, RedisStore
from gateway.storage.connect import redis_client

from tests.eventually import aeventually

P = Periods(day="20261122", month="202611")


@pytest.fixture(params=["redis", "memory"])
async def store(request, redis_server):
    if request.param == "memory":
        yield MemoryStore()
        return
    client = redis_client(redis_server.url, timeout_s=2.0)
    s = RedisStore(client, prefix=f"t{secrets.token_hex(4)}:")
    yield s
    await s.close()


async def admit_many(store, quota, n, tokens=1, window_ms=60_000):
    verdicts = await asyncio.gather(*(store.admit("key:a", quota, f"r{i}", tokens, 60_000, P, window_ms)
                                      for i in range(n)))
    return verdicts


async def test_exact_under_concurrency(store):
    verdicts = await admit_many(store, Quota(rpm=50), 200)
    assert sum(v.denied is None for v in verdicts) == 50
    denied = [v for v in verdicts if v.denied]
    assert {v.denied for v in denied} == {"requests"}
    assert all(0 < v.retry_after_ms <= 60_000 for v in denied)
    remaining = sorted(v.requests_remaining for v in verdicts if v.denied is None)
    assert remaining == list(range(50))


async def test_window_slides(store):
    quota = Quota(rpm=5)
    assert sum(v.denied is None for v in await admit_many(store, quota, 8, window_ms=500)) == 5
    await asyncio.sleep(0.6)  # the window's length passing is what is under test, not a wait for a condition
    again = [await store.admit("key:a", quota, f"s{i}", 1, 60_000, P, 500) for i in range(8)]
    assert sum(v.denied is None for v in again) == 5


async def test_token_reservation_reconciles(store):
    quota = Quota(tpm=1000)
    v = await store.admit("key:a", quota, "big", 900, 60_000, P)
    assert v.denied is None and v.tokens_remaining == 100
    assert (await store.admit("key:a", quota, "next", 200, 60_000, P)).denied == "tokens"
    await store.settle("key:a", quota, "big", 50, 0.0, P)  # the request really used 50
    v = await store.admit("key:a", quota, "next2", 200, 60_000, P)
    assert v.denied is None and v.tokens_remaining == 750


async def test_concurrency_lease_released_on_settle(store):
    quota = Quota(max_concurrent=2)
    assert (await store.admit("key:a", quota, "1", 0, 60_000, P)).denied is None
    assert (await store.admit("key:a", quota, "2", 0, 60_000, P)).denied is None
    assert (await store.admit("key:a", quota, "3", 0, 60_000, P)).denied == "concurrency"
    await store.settle("key:a", quota, "1", 0, 0.0, P)
    assert (await store.admit("key:a", quota, "4", 0, 60_000, P)).denied is None


async def test_lease_expires_if_never_settled(store):
    quota = Quota(max_concurrent=1)
    assert (await store.admit("key:a", quota, "crashed", 0, 200, P)).denied is None
    assert (await store.admit("key:a", quota, "x", 0, 200, P)).denied == "concurrency"

    async def admitted_once_the_lease_expired() -> None:
        assert (await store.admit("key:a", quota, "y", 0, 200, P)).denied is None  # a refusal counts nothing

    await aeventually(admitted_once_the_lease_expired)


async def test_budget_runs_out(store):
    quota = Quota(budget_usd_per_day=0.01, budget_usd_per_month=1.0)
    assert (await store.admit("key:a", quota, "1", 0, 60_000, P)).denied is None
    await store.settle("key:a", quota, "1", 10, 0.006, P)
    assert (await store.admit("key:a", quota, "2", 0, 60_000, P)).denied is None
    await store.settle("key:a", quota, "2", 10, 0.006, P)
    assert (await store.admit("key:a", quota, "3", 0, 60_000, P)).denied == "budget_day"
    day, month = await store.spent("key:a", P)
    assert day == pytest.approx(0.012) and month == pytest.approx(0.012)
    tomorrow = Periods(day="20261123", month="202611")
    assert (await store.admit("key:a", quota, "4", 0, 60_000, tomorrow)).denied is None


async def test_requests_in_flight_count_against_the_budget(store):
    """Admitted and not yet settled, a request holds the key's last cost
    against the budget: concurrent admissions stop where one-at-a-time
    requests of that cost would."""
    quota = Quota(budget_usd_per_day=0.01)
    assert (await store.admit("key:a", quota, "first", 0, 60_000, P)).denied is None
    await store.settle("key:a", quota, "first", 10, 0.003, P)  # the key's cost per request is now known
    verdicts = await asyncio.gather(*(store.admit("key:a", quota, f"r{i}", 0, 60_000, P) for i in range(6)))
    # Spent 0.003; in flight at 0.003 each: admitted while 0.003 + 0.003 n < 0.01, so three of them.
    assert [v.denied for v in verdicts] == [None, None, None, "budget_day", "budget_day", "budget_day"]
    # One settles cheaper than expected: 0.0035 spent and 0.006 in flight leave room for one more.
    await store.settle("key:a", quota, "r0", 10, 0.0005, P)
    assert (await store.admit("key:a", quota, "late", 0, 60_000, P)).denied is None
    day, _ = await store.spent("key:a", P)
    assert day == pytest.approx(0.0035)


async def test_a_reservation_never_settled_expires_with_its_lease(store):
    quota = Quota(budget_usd_per_day=0.01)
    assert (await store.admit("key:a", quota, "first", 0, 60_000, P)).denied is None
    await store.settle("key:a", quota, "first", 10, 0.006, P)
    assert (await store.admit("key:a", quota, "crashed", 0, 200, P)).denied is None  # holds 0.006 until settled
    assert (await store.admit("key:a", quota, "x", 0, 200, P)).denied == "budget_day"

    async def admitted_once_it_expired() -> None:
        assert (await store.admit("key:a", quota, "y", 0, 200, P)).denied is None

    await aeventually(admitted_once_it_expired)


async def test_a_settlement_after_redis_forgot_its_scripts(redis_server):
    """Settlements go as EVALSHA; after SCRIPT FLUSH (a restarted Redis) one
    goes again as EVAL, and nothing of it is lost."""
    import redis

    s = RedisStore(redis_client(redis_server.url, timeout_s=2.0), prefix=f"t{secrets.token_hex(4)}:")
    try:
        quota = Quota(tpm=1000)
        assert (await s.admit("key:a", quota, "big", 900, 60_000, P)).denied is None
        with redis.Redis.from_url(redis_server.url) as raw:
            raw.script_flush()
        await s.settle("key:a", quota, "big", 50, 0.002, P)
        v = await s.admit("key:a", quota, "next", 200, 60_000, P)
        assert v.denied is None and v.tokens_remaining == 750
        assert (await s.spent("key:a", P))[0] == pytest.approx(0.002)
    finally:
        await s.close()
