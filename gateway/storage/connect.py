"""Redis connections from a URL: our pipelined RESP client, or redis-py for Cluster and Sentinel."""

from __future__ import annotations

from typing import Any


def backstop_s(timeout_s: float) -> float:
    return max(2.0, 10 * timeout_s)


def redis_client(url: str, timeout_s: float):
    """A client for ``redis://``, ``rediss://`` and ``unix://`` (:class:`gateway.resp.RespClient`),
    or redis-py's for ``redis+cluster://host:port`` and
    ``redis+sentinel://host:port[,host:port]/service``."""
    opts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url.removeprefix("redis+cluster://"), **opts)
    if url.startswith("redis+sentinel://"):
        from redis.asyncio.sentinel import Sentinel

        rest = url.removeprefix("redis+sentinel://")
        hosts, _, service = rest.partition("/")
        nodes = []
        for node in hosts.split(","):
            host, sep, port = node.rpartition(":")
            nodes.append((host, int(port)) if sep else (node, 26379))
        return Sentinel(nodes, **opts).master_for(service or "mymaster", **opts)
    # One pipelined connection; see gateway/resp.py for why not redis-py here.
    from gateway.storage.resp import RespClient

    return RespClient(url, timeout_s)
