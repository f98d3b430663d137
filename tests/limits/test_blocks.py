"""Admission in blocks (gateway/quota_blocks.py) against a real Redis server:
limits stay exact, blocks shrink near a limit, unused places go back."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
from gateway.errors import GatewayError
from gateway.config import Quota
from gateway.limits.stores import Periods, RedisStore
from gateway.limits.limiter import Limiter
from gateway.storage.connect import redis_client
from gateway.storage.resp import RespClient

from tests.eventually import aeventually
from tests.redis_server import RedisServer


@pytest.fixture
async def workers(redis_server):
    """Limiters sharing one Redis and one key prefix, each standing for one worker process."""
    prefix = f"b{secrets.token_hex(4)}:"
    made: list[Limiter] = []

    def make(block_requests: int = 8, block_s: float = 1.0, on_error: str = "open", url: str | None = None):
        store = RedisStore(redis_client(url or redis_server.url, timeout_s=2.0), prefix=prefix)
        limiter = Limiter(store, on_error=on_error, block_requests=block_requests, block_s=block_s)
        made.append(limiter)
        return limiter

    raw = RespClient(redis_server.url, 2.0)

    async def redis(*command):
        (reply,) = await raw.execute([command])
        return reply

    make.redis = redis
    make.key = lambda part: f"{prefix}{{key:a}}:{part}"
    yield make
    for limiter in made:
        await limiter.close()
    await raw.aclose()


async def admit(limiter: Limiter, quota: Quota, tokens: int = 1):
    """The admission, or the GatewayError it was refused with."""
    try:
        return await limiter.admit_key("a", quota, "r" + secrets.token_hex(6), tokens)
    except GatewayError as exc:
        return exc


async def test_a_block_admits_without_a_round_trip(workers):
    limiter = workers(block_requests=8)
    quota = Quota(rpm=10_000)
    first = await admit(limiter, quota)
    assert first.block is None  # asked Redis, and was granted a block of 8 more
    assert int(await workers.redis("ZCARD", workers.key("req"))) == 9
    checks = [limiter.begin_key("a", quota, f"local{i}", 1) for i in range(8)]
    assert all(c.pending is None and c.error is None for c in checks)  # nothing sent to Redis
    admitted = [await limiter.finish_key(c) for c in checks]
    assert {a.block for a in admitted} == {first.request_id + ":b"}
    remaining = [int(a.headers["x-ratelimit-remaining-requests"]) for a in admitted]
    assert remaining == list(range(10_000 - 2, 10_000 - 10, -1))
    # With a quarter of it left, the next block was asked for ahead: it is
    # counted in Redis, and the next request takes a place in it.
    await aeventually(lambda: "local5:n" in {b.id for b in limiter.held("key:a")})
    assert int(await workers.redis("ZCARD", workers.key("req"))) == 17
    ninth = limiter.begin_key("a", quota, "ninth", 1)
    assert ninth.pending is None
    assert (await limiter.finish_key(ninth)).block == "local5:n"  # asked for when 2 of 8 were left


async def test_without_a_block_ahead_a_used_up_block_means_a_round_trip(workers):
    limiter = workers(block_requests=8)
    quota = Quota(rpm=10_000)
    await admit(limiter, quota)
    checks = [limiter.begin_key("a", quota, f"local{i}", 1) for i in range(8)]
    for c in checks:
        await limiter.finish_key(c)
    ninth = limiter.begin_key("a", quota, "ninth", 1)  # the block ahead is not in yet
    assert ninth.pending is not None
    await limiter.finish_key(ninth)


async def test_exact_across_workers_under_concurrency(workers):
    """Three workers, 300 concurrent requests, rpm 100: exactly 100 pass, the
    places of blocks included (a request Redis refuses may take one)."""
    limiters = [workers(block_requests=32) for _ in range(3)]
    quota = Quota(rpm=100)
    results = await asyncio.gather(*(admit(limiters[i % 3], quota) for i in range(300)))
    admitted = [r for r in results if not isinstance(r, GatewayError)]
    assert len(admitted) == 100
    assert any(a.block for a in admitted)
    assert {r.code for r in results if isinstance(r, GatewayError)} == {"rate_limit_exceeded"}
    assert int(await workers.redis("ZCARD", workers.key("req"))) == 100


async def test_near_the_limit_every_request_asks_redis(workers):
    limiter = workers(block_requests=32)
    quota = Quota(rpm=16)
    for _ in range(16):
        admission = await admit(limiter, quota)
        assert admission.block is None
    assert not limiter.held("key:a")
    assert (await admit(limiter, quota)).code == "rate_limit_exceeded"


async def test_block_sized_by_what_is_left(workers):
    limiter = workers(block_requests=32)
    quota = Quota(rpm=100)  # after the asker, 99 left: 99 // 16 = 6
    await admit(limiter, quota)
    assert [b.size for b in limiter.held("key:a")] == [6]
    big = Quota(tpm=100_000)  # 100 tokens each: (100_000 - 100) // 1_600 = 62, capped at 32
    other = workers(block_requests=32)
    await other.admit_key("b", big, "t1", 100)
    assert [b.size for b in other.held("key:b")] == [32]


async def test_tokens_reconcile_through_a_block(workers):
    limiter = workers(block_requests=4)
    quota = Quota(tpm=1_000_000)
    admissions = [await admit(limiter, quota, tokens=100) for _ in range(3)]
    assert admissions[0].block is None and admissions[1].block == admissions[2].block
    assert int(await workers.redis("GET", workers.key("toksum"))) == 500  # 100 + a block of 4 x 100
    for a in admissions:
        await limiter.settle_key(a, 10, None)  # each really used 10
    limiter.return_blocks()  # two places unused: 200 tokens back
    await limiter.store.batcher.drain()
    assert int(await workers.redis("GET", workers.key("toksum"))) == 30
    assert int(await workers.redis("ZCARD", workers.key("req"))) == 0  # no rpm: no request entries


async def test_unused_places_go_back_when_the_block_expires(workers):
    limiter = workers(block_requests=8, block_s=0.2)
    quota = Quota(rpm=10_000)
    await admit(limiter, quota)
    await admit(limiter, quota)  # one place used
    assert int(await workers.redis("ZCARD", workers.key("req"))) == 9
    await aeventually(lambda: not limiter.held("key:a"))  # its life ended, and it was handed back
    await limiter.store.batcher.drain()
    assert int(await workers.redis("ZCARD", workers.key("req"))) == 2
    assert not limiter.held("key:a")


async def test_expired_block_admits_nothing(workers):
    limiter = workers(block_requests=8, block_s=0.05)
    quota = Quota(rpm=10_000)
    await admit(limiter, quota)
    (block,) = limiter.held("key:a")
    await aeventually(lambda: time.monotonic() >= block.expires)
    later = limiter.begin_key("a", quota, "later", 1)
    assert later.pending is not None
    assert (await limiter.finish_key(later)).block is None


async def test_budget_is_kept_with_blocks(workers):
    """$0.01 a day at $0.001 a request: blocks appear once the cost is known,
    shrink as the budget runs out, and the 11th request is refused."""
    limiter = workers(block_requests=32)
    quota = Quota(budget_usd_per_day=0.01)
    admitted, sizes = 0, []
    for _ in range(20):
        result = await admit(limiter, quota)
        if isinstance(result, GatewayError):
            assert result.code == "budget_exceeded"
            break
        admitted += 1
        sizes.append(max((b.size for b in limiter.held("key:a")), default=0))
        await limiter.settle_key(result, 10, 0.001)
    assert admitted == 10
    assert sizes[0] == 0 and max(sizes) == 2  # (0.01 - 0.001) / (4 x 0.001) = 2, then fewer


async def test_no_block_for_a_concurrency_cap(workers):
    limiter = workers(block_requests=32)
    await admit(limiter, Quota(rpm=10_000, max_concurrent=100))
    assert not limiter.held("key:a")


async def test_block_unused_once_redis_is_gone():
    """Redis stopped while a worker holds a block: the block admits nothing
    and ``on_error`` decides, as without blocks."""
    server = RedisServer().start()
    limiter = None
    try:
        limiter = Limiter(RedisStore(redis_client(server.url, timeout_s=0.2)), on_error="closed",
                          block_requests=8)
        quota = Quota(rpm=10_000)
        await admit(limiter, quota)
        assert limiter.held("key:a")
        server.stop()
        await aeventually(lambda: not limiter.store.connected)  # the connection's end reached the client
        refused = await admit(limiter, quota)
        assert isinstance(refused, GatewayError) and refused.status == 503
    finally:
        if limiter is not None:
            await limiter.close()
        server.cleanup()


async def test_budget_is_exact_across_workers_with_blocks_and_requests_in_flight(workers):
    """Three workers, 30 requests in flight at a time, $0.001 a request
    against $0.1005 a day: exactly 101 pass (each while the spend and the
    requests in flight stay below the budget), places of blocks included."""
    limiters = [workers(block_requests=32) for _ in range(3)]
    quota = Quota(budget_usd_per_day=0.1005)
    gate = asyncio.Semaphore(30)
    admitted: list[object] = []
    used_blocks: set[str] = set()

    async def one(i: int) -> None:
        async with gate:
            result = await admit(limiters[i % 3], quota)
            if isinstance(result, GatewayError):
                assert result.code == "budget_exceeded"
                return
            admitted.append(result)
            if result.block:
                used_blocks.add(result.block)
            await asyncio.sleep(0)  # the upstream answers; then the request is settled
            await limiters[i % 3].settle_key(result, 10, 0.001)

    await asyncio.gather(*(one(i) for i in range(300)))
    assert len(admitted) == 101
    assert used_blocks  # blocks were in play
    for limiter in limiters:
        limiter.return_blocks()
        await limiter.store.batcher.drain()
    day, _ = await limiters[0].store.spent("key:a", Periods.now())
    assert day == pytest.approx(0.101)
    assert int(await workers.redis("GET", workers.key("pendsum")) or 0) == 0  # nothing left reserved
