"""Stored responses of the Responses API, looked up by their id.

A response made with ``store`` (OpenAI's default) is kept for
``GET /v1/responses/{id}`` and for a later request's
``previous_response_id``: the response object as it was sent, the
conversation so far as chat messages (its input and its output, tool calls
included; never the instructions, which OpenAI does not carry over), and
the key that made it, since only that key may see it. They live where
generation records live, for as long: in Redis with the same TTL (any
replica can continue a conversation), or in an in-process ring without
Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import msgspec

from gateway.protocol import Message
from gateway.storage.autopipeline import AutoPipeline


class StoredResponse(msgspec.Struct, kw_only=True):
    #: The name of the key that made it.
    key: str
    #: The conversation as chat messages, this response's output last.
    messages: list[Message]
    #: The response object, as its JSON was sent.
    response: msgspec.Raw


_decoder = msgspec.json.Decoder(StoredResponse)


class ResponseStore:
    """Where stored responses are kept; the Redis and in-process variants share this API."""

    def put_soon(self, response_id: str, record: StoredResponse) -> asyncio.Future[object] | None:
        """Store without waiting; the future (None when already done) carries a failure."""
        raise NotImplementedError

    async def get(self, response_id: str) -> StoredResponse | None:
        raise NotImplementedError

    async def delete(self, response_id: str) -> bool:
        """Whether there was one to delete."""
        raise NotImplementedError


class MemoryStoredResponses(ResponseStore):
    """The most recent ``capacity`` responses of this process, each for ``ttl_s``."""

    def __init__(self, capacity: int = 10_000, ttl_s: float = 7 * 86400) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._records: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def put_soon(self, response_id: str, record: StoredResponse) -> None:
        self._records[response_id] = (time.monotonic() + self.ttl_s, msgspec.json.encode(record))
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    async def get(self, response_id: str) -> StoredResponse | None:
        entry = self._records.get(response_id)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._records[response_id]
            return None
        return _decoder.decode(entry[1])

    async def delete(self, response_id: str) -> bool:
        entry = self._records.pop(response_id, None)
        return entry is not None and entry[0] > time.monotonic()


_DELETE = "return redis.call('DEL', KEYS[1])"


class RedisStoredResponses(ResponseStore):
    """Responses shared by every replica under ``{prefix}resp:{id}``, expiring
    after ``ttl_s``; written as deferred commands of the auto-pipeline."""

    def __init__(self, prefix: str, ttl_s: int, batcher: AutoPipeline) -> None:
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.batcher = batcher

    def put_soon(self, response_id: str, record: StoredResponse) -> asyncio.Future[object]:
        key, value = f"{self.prefix}resp:{response_id}", msgspec.json.encode(record)
        return self.batcher.submit(lambda pipe: pipe.set(key, value, ex=self.ttl_s), defer=True)

    async def get(self, response_id: str) -> StoredResponse | None:
        # Through the batcher: queued after (so it sees) responses this worker deferred.
        key = f"{self.prefix}resp:{response_id}"
        raw = await self.batcher.submit(lambda pipe: pipe.get(key))
        return None if raw is None else _decoder.decode(raw)

    async def delete(self, response_id: str) -> bool:
        key = f"{self.prefix}resp:{response_id}"
        removed = await self.batcher.submit(lambda pipe: pipe.eval(_DELETE, 1, key))
        return bool(removed)
