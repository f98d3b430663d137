"""Limit stores: Redis, shared by replicas, or in-process for one."""

from gateway.limits.stores.base import WINDOW_MS, BlockAsk, LimitStore, PendingVerdict, Periods, Verdict
from gateway.limits.stores.memory import MemoryStore
from gateway.limits.stores.redis import RedisStore

__all__ = ["WINDOW_MS", "BlockAsk", "LimitStore", "MemoryStore", "PendingVerdict", "Periods", "RedisStore", "Verdict"]
