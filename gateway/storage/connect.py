"""Redis connections from a URL: our pipelined RESP client, or redis-py for Cluster and Sentinel."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.storage.resp import RedisValue


class Pipeline(Protocol):
    """The pipeline calls the gateway makes (never a MULTI/EXEC transaction)."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: RedisValue) -> object: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: RedisValue) -> object: ...

    def set(self, key: str, value: RedisValue, ex: int | None = None) -> object: ...

    def get(self, key: str) -> object: ...

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """The replies in order; with ``raise_on_error=False`` an error reply is an exception in its place."""
        ...


class Script(Protocol):
    """A registered Lua script: its SHA1, set again after a NOSCRIPT reply."""

    sha: str


class RedisClient(Protocol):
    """The client calls the gateway makes: :class:`gateway.storage.resp.RespClient`
    offers exactly these, redis-py's asyncio clients offer them among many."""

    def pipeline(self, transaction: bool = ...) -> Pipeline: ...

    def register_script(self, script: str) -> Script: ...

    def script_load(self, script: str) -> Awaitable[str]: ...

    def mget(self, key: str, /, *keys: str) -> Awaitable[list[Any]]: ...

    async def aclose(self) -> None: ...


def backstop_s(timeout_s: float) -> float:
    return max(2.0, 10 * timeout_s)


def redis_client(url: str, timeout_s: float) -> RedisClient:
    """A client for ``redis://``, ``rediss://`` and ``unix://`` (:class:`gateway.storage.resp.RespClient`),
    or redis-py's for ``redis+cluster://host:port`` and
    ``redis+sentinel://host:port[,host:port]/service``."""
    opts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://"), **opts)
    if url.startswith("redis+sentinel://"):
        from redis.asyncio import Redis
        from redis.asyncio.sentinel import Sentinel

        rest = url.removeprefix("redis+sentinel://")
        hosts, _, service = rest.partition("/")
        nodes = []
        for node in hosts.split(","):
            host, sep, port = node.rpartition(":")
            nodes.append((host, int(port)) if sep else (node, 26379))
        sentinel = Sentinel(nodes, **opts)  # type: ignore[no-untyped-call]  # redis-py leaves Sentinel() unannotated
        master: Redis = sentinel.master_for(
            service or "mymaster", socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        return master
    # One pipelined connection; gateway/storage/resp.py says why not redis-py here.
    from gateway.storage.resp import RespClient

    return RespClient(url, timeout_s)
