"""The valkey-server ``gateway serve --workers N`` starts without ``[redis]``
(``gateway/server/embedded_redis.py``), and the stores a worker builds on it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest
import redis

from gateway.accounting.generations import MemoryGenerations, RedisGenerations
from gateway.accounting.stored_responses import MemoryStoredResponses, RedisStoredResponses
from gateway.control.keystore import SqliteKeyStore
from gateway.control.ledger import MemoryLedger, RedisLedger, SqliteLedger
from gateway.limits.stores import MemoryStore, RedisStore
from gateway.server.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from gateway.state import EMBEDDED_REDIS_URL_ENV
from gateway.storage.resp import RespClient
from tests.unit.conftest import KEYS, make_gateway


@pytest.fixture
def server():
    s = EmbeddedRedis()
    s.start()
    yield s
    s.stop()


def test_it_listens_on_a_private_unix_socket_only_and_keeps_nothing(server):
    assert server.process is not None and server.process.poll() is None
    assert server.url == "unix://" + server.socket_path
    assert stat.S_IMODE(os.stat(server.dir).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(server.socket_path).st_mode)
    assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o700
    with redis.Redis(unix_socket_path=server.socket_path) as raw:
        conf = {
            k: v
            for name in ("port", "save", "appendonly", "maxmemory", "maxmemory-policy")
            for k, v in raw.config_get(name).items()
        }
    assert conf == {
        "port": "0",
        "save": "",
        "appendonly": "no",
        "maxmemory": str(256 * 2**20),
        "maxmemory-policy": "volatile-lru",
    }
    # No TCP listener: nothing of this process is bound to a TCP port.
    inodes = {os.readlink(f"/proc/{server.process.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{server.process.pid}/fd")}
    tcp = Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text()
    listening = {"socket:[" + line.split()[9] + "]" for line in tcp.splitlines()[1:] if line.split()[3] == "0A"}
    assert not inodes & listening


async def test_the_gateways_resp_client_reads_its_url(server):
    client = RespClient(server.url, 2.0)
    pipe = client.pipeline()
    pipe.set("k", "v", ex=10)
    pipe.get("k")
    assert (await pipe.execute())[1] == b"v"
    await client.aclose()


def test_stop_ends_it_and_removes_its_directory():
    s = EmbeddedRedis()
    s.start()
    process, directory, path = s.process, s.dir, s.socket_path
    assert s.ping()
    s.stop()
    assert process.poll() is not None and not os.path.exists(directory)
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(OSError):
        sock.connect(path)
    s.stop()  # twice: nothing to do


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"binary": "/bin/false"}, "it exited with status 1"),
        ({"binary": "/nonexistent/valkey-server"}, "cannot run /nonexistent/valkey-server: No such file"),
        ({"maxmemory": "lots"}, "argument must be a memory value"),
    ],
)
def test_a_server_that_cannot_start_is_an_error_that_leaves_nothing(kwargs, message, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    s = EmbeddedRedis(**kwargs)
    with pytest.raises(EmbeddedRedisError, match=message):
        s.start()
    assert s.process is None and s.dir is None
    assert list(tmp_path.iterdir()) == []


def _stores(gw):
    return (
        type(gw.limiter.store),
        type(gw.generations),
        type(gw.responses),
        type(gw.ledger),
        type(gw.key_store) if gw.key_store is not None else None,
    )


ADMIN = f'[admin]\nsha256 = "{hashlib.sha256(b"sk-admin").hexdigest()}"\ndata_dir = "{{}}"\n'


def test_a_worker_uses_the_embedded_server_as_it_would_redis_url(server, tmp_path):
    env = {**KEYS, EMBEDDED_REDIS_URL_ENV: server.url}
    # Limits, records and stored responses are shared; so is the spend ledger
    # (GET /v1/key is the same from every worker) while no admin key is set.
    gw = make_gateway(env=env)
    assert _stores(gw) == (RedisStore, RedisGenerations, RedisStoredResponses, RedisLedger, None)
    assert gw.generations.prefix == "gw:"  # the [redis] prefix default
    asyncio.run(gw.shutdown())
    # With an admin key, keys made at runtime and the ledger stay in SQLite: the
    # embedded server keeps nothing across a restart.
    gw = make_gateway(ADMIN.format(tmp_path), env=env)
    assert _stores(gw) == (RedisStore, RedisGenerations, RedisStoredResponses, SqliteLedger, SqliteKeyStore)
    asyncio.run(gw.shutdown())


def test_one_worker_without_redis_stays_in_process(tmp_path):
    gw = make_gateway()
    assert _stores(gw) == (MemoryStore, MemoryGenerations, MemoryStoredResponses, MemoryLedger, None)
    asyncio.run(gw.shutdown())
    gw = make_gateway(ADMIN.format(tmp_path))
    assert _stores(gw) == (MemoryStore, MemoryGenerations, MemoryStoredResponses, SqliteLedger, SqliteKeyStore)
    asyncio.run(gw.shutdown())
