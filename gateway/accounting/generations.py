"""Generation records: what happened to each request, looked up by its id.

``GET /v1/generation?id=ID`` answers with the provider and model that
served, tokens, cost, latency, time to first token, finish reason, and every
attempt with its error. Records live in Redis with a TTL (so any replica can
answer), or in an in-process ring of the most recent ones without Redis.
``recent`` lists the newest records for the console (``GET /admin/requests``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from itertools import islice

import msgspec

from gateway.storage.autopipeline import AutoPipeline
from gateway.storage.connect import Pipeline


class AttemptOut(msgspec.Struct):
    provider: str
    endpoint: str
    outcome: str
    status: int | None
    error: str | None
    latency_ms: float | None


class Generation(msgspec.Struct, kw_only=True):
    id: str
    key: str
    created_at: float
    #: The API the request came in on (chat, responses, messages, embeddings).
    api: str = "chat"
    model: str | None
    provider: str | None
    requested_model: str | None
    streamed: bool
    status: int
    finish_reason: str | None = None
    tokens_prompt: int = 0
    tokens_completion: int = 0
    total_cost: float | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    error: str | None = None
    attempts: list[AttemptOut] = []


class GenerationStore:
    """Where records are kept; the Redis and in-process variants share this API."""

    def put_soon(self, record: Generation) -> asyncio.Future[object] | None:
        """Store without waiting; the future (None when already done) carries a failure."""
        raise NotImplementedError

    async def get(self, generation_id: str) -> Generation | None:
        raise NotImplementedError

    async def recent(self, limit: int) -> list[Generation]:
        """The newest ``limit`` records, newest first, of every key (an admin view)."""
        raise NotImplementedError


class MemoryGenerations(GenerationStore):
    """The most recent ``capacity`` records of this process."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, bytes] = OrderedDict()

    def put_soon(self, record: Generation) -> None:
        self._records[record.id] = msgspec.json.encode(record)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    async def get(self, generation_id: str) -> Generation | None:
        raw = self._records.get(generation_id)
        return None if raw is None else msgspec.json.decode(raw, type=Generation)

    async def recent(self, limit: int) -> list[Generation]:
        newest = islice(reversed(self._records.values()), max(limit, 0))
        return [msgspec.json.decode(raw, type=Generation) for raw in newest]


#: The newest ids first, at most ARGV[2] of them. One key, so it runs on Redis Cluster too.
_PUSH_RECENT = "redis.call('LPUSH',KEYS[1],ARGV[1]) redis.call('LTRIM',KEYS[1],0,ARGV[2]-1)"
_READ_RECENT = "return redis.call('LRANGE',KEYS[1],0,ARGV[1]-1)"


class RedisGenerations(GenerationStore):
    """Records shared by every replica, expiring after ``ttl_s``; written in batches.

    The ids of the newest ``capacity`` records are also kept in a list
    (``{prefix}gen:recent``, LPUSH then LTRIM), pushed as a deferred command
    beside the record's own: no round trip of its own on the request path.
    """

    def __init__(self, prefix: str, ttl_s: int, batcher: AutoPipeline, capacity: int = 10_000) -> None:
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.batcher = batcher
        self.capacity = capacity
        self._recent_key = f"{prefix}gen:recent"

    def put_soon(self, record: Generation) -> asyncio.Future[object]:
        key, value = f"{self.prefix}gen:{record.id}", msgspec.json.encode(record)
        stored = self.batcher.submit(lambda pipe: pipe.set(key, value, ex=self.ttl_s), defer=True)
        listed = self.batcher.submit(
            lambda pipe: pipe.eval(_PUSH_RECENT, 1, self._recent_key, record.id, self.capacity), defer=True
        )
        # Both ride the same batch: a failure there is the record's failure, reported once.
        listed.add_done_callback(_retrieved)
        return stored

    async def get(self, generation_id: str) -> Generation | None:
        # Through the batcher: queued after (so it sees) records this worker deferred.
        key = f"{self.prefix}gen:{generation_id}"
        raw = await self.batcher.submit(lambda pipe: pipe.get(key))
        return None if raw is None else msgspec.json.decode(raw, type=Generation)

    async def recent(self, limit: int) -> list[Generation]:
        if limit <= 0:
            return []
        ids = await self.batcher.submit(lambda pipe: pipe.eval(_READ_RECENT, 1, self._recent_key, limit))
        keys = [f"{self.prefix}gen:{_text(i)}" for i in ids or []]
        # One batch for all of them: one more round trip, whatever the limit.
        raws = await asyncio.gather(*(self.batcher.submit(_getter(k)) for k in keys))
        # A listed record past its TTL is gone: skipped.
        return [msgspec.json.decode(raw, type=Generation) for raw in raws if raw is not None]


def _getter(key: str) -> Callable[[Pipeline], object]:
    return lambda pipe: pipe.get(key)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _retrieved(future: asyncio.Future[object]) -> None:
    """Mark a companion command's failure as seen (the record's own future reports it)."""
    if not future.cancelled():
        future.exception()
