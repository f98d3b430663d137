"""Generation records: what happened to each request, looked up by its id.

``GET /v1/generation?id=ID`` answers with the provider and model that
served, tokens, cost, latency, time to first token, finish reason, and every
attempt with its error. Records live in Redis with a TTL (so any replica can
answer), or in an in-process ring of the most recent ones without Redis.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import msgspec

from gateway.storage.autopipeline import AutoPipeline


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


class RedisGenerations(GenerationStore):
    """Records shared by every replica, expiring after ``ttl_s``; written in batches."""

    def __init__(self, prefix: str, ttl_s: int, batcher: AutoPipeline) -> None:
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.batcher = batcher

    def put_soon(self, record: Generation) -> asyncio.Future[object]:
        key, value = f"{self.prefix}gen:{record.id}", msgspec.json.encode(record)
        return self.batcher.submit(lambda pipe: pipe.set(key, value, ex=self.ttl_s), defer=True)

    async def get(self, generation_id: str) -> Generation | None:
        # Through the batcher: queued after (so it sees) records this worker deferred.
        key = f"{self.prefix}gen:{generation_id}"
        raw = await self.batcher.submit(lambda pipe: pipe.get(key))
        return None if raw is None else msgspec.json.decode(raw, type=Generation)
