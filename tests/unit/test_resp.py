"""gateway/resp.py against real Redis servers and small fake RESP servers.

The happy paths run against a real ``redis-server`` (the session fixture, or
one started here with ``--requirepass`` / ``--unixsocket``); a second,
independent client (redis-py) checks what the RESP client wrote where it
matters. Faults (stalls, late replies, garbage, drops) come from
``asyncio.start_server`` servers that read RESP and write exact bytes. No mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import subprocess
import tempfile
import time
from urllib.parse import quote

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import Quota
from gateway.limits.stores import Periods, RedisStore
from gateway.storage.connect import redis_client
from gateway.storage.resp import RespClient, encode
from tests.redis_server import RedisServer, server_binary

T = 2.0  # timeout for calls that should succeed: a hang fails the test in T seconds
SHORT = 0.2  # timeout for the timeout cases

SCRIPT = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]) * 2}"


def _key(name: str) -> str:
    return f"resp:{secrets.token_hex(4)}:{name}"


@contextlib.asynccontextmanager
async def client_for(url: str, timeout_s: float = T):
    client = RespClient(url, timeout_s)
    try:
        yield client
    finally:
        await client.aclose()


async def eventually(predicate, within: float = 1.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a fake RESP server -----------------------------------------------------------


class FakeRedis:
    """An asyncio TCP server; ``handler(fake, reader, writer, conn_index)`` speaks raw RESP bytes."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.commands: list[tuple[int, list[bytes]]] = []  # (connection, command) as read
        self.eof: set[int] = set()  # connections the client closed
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "FakeRedis":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        index = self.connections
        self._writers.append(writer)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self.handler(self, reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            self._tasks.discard(task)

    async def read_command(self, reader: asyncio.StreamReader, index: int) -> list[bytes] | None:
        """One RESP array of bulk strings, or None at EOF (recorded in ``eof``)."""
        line = await reader.readline()
        if not line:
            self.eof.add(index)
            return None
        assert line.startswith(b"*"), line
        args = []
        for _ in range(int(line[1:])):
            header = await reader.readline()
            assert header.startswith(b"$"), header
            data = await reader.readexactly(int(header[1:]) + 2)
            args.append(data[:-2])
        self.commands.append((index, args))
        return args


async def silent(fake: FakeRedis, reader, writer, index) -> None:
    """Reads commands, never answers."""
    while await fake.read_command(reader, index) is not None:
        pass


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


# --- encode -----------------------------------------------------------------------


def test_encode_exact_bytes():
    assert encode([("GET", "k")]) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert encode([("SET", b"k\r\n", "\u00e9", 42, -7, 1.5, 0, 0.1)]) == (
        b"*8\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n\xc3\xa9\r\n$2\r\n42\r\n$2\r\n-7\r\n"
        b"$3\r\n1.5\r\n$1\r\n0\r\n$3\r\n0.1\r\n")
    assert encode([("PING",), ("ECHO", b"")]) == b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$0\r\n\r\n"
    assert encode([]) == b""


@pytest.mark.parametrize("bad", [True, False, None, object(), [1]])
def test_encode_refuses_other_types(bad):
    with pytest.raises(TypeError):
        encode([("SET", "k", bad)])


# --- against a real Redis -----------------------------------------------------------


async def test_pipeline_results_in_order(redis_server):
    k1, k2 = _key("a"), _key("b")
    sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
    async with client_for(redis_server.url) as client:
        await client.script_load(SCRIPT)
        pipe = client.pipeline(transaction=False)
        pipe.set(k1, "v1", ex=100).set(k2, b"v\x00\xff2").get(k1).get(k2)
        pipe.eval(SCRIPT, 1, k1, "x", 21).evalsha(sha, 1, k2, "y", 2.5).get(_key("missing"))
        results = await pipe.execute()
        assert results == [b"OK", b"OK", b"v1", b"v\x00\xff2", [k1.encode(), b"x", 42], [k2.encode(), b"y", 5], None]
        ttl, ttl2 = await client.execute([("TTL", k1), ("TTL", k2)])
        assert 98 <= ttl <= 100
        assert ttl2 == -1  # no EX: no expiry
    # an independent client sees the same thing
    other = redis.Redis.from_url(redis_server.url)
    try:
        assert other.get(k2) == b"v\x00\xff2"
        assert 98 <= other.ttl(k1) <= 100
    finally:
        other.close()


async def test_error_reply_in_place_of_result(redis_server):
    text, other = _key("text"), _key("other")
    async with client_for(redis_server.url) as client:
        await client.pipeline().set(text, "hello").execute()
        pipe = client.pipeline()
        pipe.set(other, "1").eval("return redis.call('LPUSH', KEYS[1], 'x')", 1, text).get(other)
        results = await pipe.execute(raise_on_error=False)
        assert results[0] == b"OK" and results[2] == b"1"
        assert isinstance(results[1], ResponseError) and not isinstance(results[1], NoScriptError)
        assert "WRONGTYPE" in str(results[1])
        # an error reply is a reply: the connection stays in step
        assert await client.get(text) == b"hello"

        pipe = client.pipeline()
        pipe.get(other).eval("return redis.call('LPUSH', KEYS[1], 'x')", 1, text).get(text)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await pipe.execute(raise_on_error=True)
        assert await client.mget(other, text) == [b"1", b"hello"]


async def test_noscript_then_script_load(redis_server):
    text = f"return '{secrets.token_hex(8)}'"  # a script this Redis has never seen
    async with client_for(redis_server.url) as client:
        script = client.register_script(text)
        assert script.sha == hashlib.sha1(text.encode()).hexdigest() and script.script == text
        results = await client.pipeline().evalsha(script.sha, 0).get(_key("x")).execute(raise_on_error=False)
        assert isinstance(results[0], NoScriptError) and results[1] is None
        with pytest.raises(NoScriptError):
            await client.pipeline().evalsha(script.sha, 0).execute()
        sha = await client.script_load(text)
        assert sha == script.sha == client.register_script(text).sha
        assert await client.pipeline().evalsha(sha, 0).execute() == [text.split("'")[1].encode()]


async def test_script_load_error_raises(redis_server):
    async with client_for(redis_server.url) as client:
        with pytest.raises(ResponseError):
            await client.script_load("this is not lua (")
        assert await client.ping() is True


async def test_mget_get_ping(redis_server):
    a, b = _key("a"), _key("b")
    async with client_for(redis_server.url) as client:
        assert await client.ping() is True
        await client.pipeline().set(a, "1").set(b, 2).execute()
        assert await client.get(a) == b"1"
        assert await client.get(_key("none")) is None
        assert await client.mget(a, _key("none"), b) == [b"1", None, b"2"]
        h = _key("hash")
        await client.pipeline().eval("redis.call('HSET', KEYS[1], 'f', 'v')", 1, h).execute()
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.get(h)
        with pytest.raises(ResponseError):
            await client.mget()  # no keys: Redis refuses the arity


async def test_concurrent_executes_one_connection(redis_server):
    prefix = _key("c")
    async with client_for(redis_server.url) as client:
        async def one(i: int):
            key, value = f"{prefix}:{i}", f"value-{i}-{secrets.token_hex(3)}"
            pipe = client.pipeline()
            pipe.set(key, value).get(key)
            ok, got = await pipe.execute()
            (client_id,) = await client.execute([("CLIENT", "ID")])
            return value.encode(), got, ok, client_id

        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert all(ok == b"OK" for _, _, ok, _ in results)
        assert [got for _, got, _, _ in results] == [value for value, _, _, _ in results]
        assert len({client_id for *_, client_id in results}) == 1  # one connection


async def test_one_connection_on_a_fake_server():
    async def answer(fake, reader, writer, index):
        while (command := await fake.read_command(reader, index)) is not None:
            writer.write(bulk(command[1]))  # GET k -> "k"

    async with FakeRedis(answer) as fake, client_for(fake.url) as client:
        keys = [f"k{i}" for i in range(100)]
        got = await asyncio.gather(*(client.get(k) for k in keys))
        assert got == [k.encode() for k in keys]
        assert fake.connections == 1


async def test_redis_restart_fails_then_reconnects():
    server = RedisServer().start()
    try:
        key = _key("restart")
        async with client_for(server.url, timeout_s=5.0) as client:
            await client.pipeline().set(key, "before").execute()
            # in flight: BLPOP blocks in Redis until the server dies
            blocked = asyncio.ensure_future(client.execute([("BLPOP", _key("empty"), 5)]))
            with redis.Redis.from_url(server.url) as probe:
                assert await eventually(lambda: probe.info("clients")["blocked_clients"] == 1, within=10)
            assert not blocked.done()
            started = time.monotonic()
            server.stop()
            with pytest.raises(RedisConnectionError):
                await blocked
            assert time.monotonic() - started < 1.0
            # down: the next call fails fast too
            with pytest.raises(RedisConnectionError):
                await client.get(key)
            server.start()  # same port, empty data
            assert await client.get(key) is None
            await client.pipeline().set(key, "after").execute()
            assert await client.get(key) == b"after"
    finally:
        server.cleanup()


async def test_server_closes_after_reading_then_reconnects():
    async def close_first(fake, reader, writer, index):
        while (command := await fake.read_command(reader, index)) is not None:
            if index == 1:
                writer.close()
                return
            writer.write(bulk(command[1]))

    async with FakeRedis(close_first) as fake, client_for(fake.url) as client:
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await client.get("first")
        assert time.monotonic() - started < 1.0
        assert await client.get("second") == b"second"
        assert fake.connections == 2


async def test_garbage_reply_is_a_connection_error():
    async def garbage(fake, reader, writer, index):
        while await fake.read_command(reader, index) is not None:
            writer.write(b"hello there\r\n" if index == 1 else b"+PONG\r\n")

    async with FakeRedis(garbage) as fake, client_for(fake.url) as client:
        with pytest.raises(RedisConnectionError):
            await client.get("k")
        assert await client.ping() is True  # a fresh connection
        assert fake.connections == 2
        assert await eventually(lambda: 1 in fake.eof)


async def test_reply_nobody_asked_for_drops_the_connection():
    async def twice(fake, reader, writer, index):
        while (command := await fake.read_command(reader, index)) is not None:
            writer.write(bulk(command[1]) * (2 if index == 1 else 1))

    async with FakeRedis(twice) as fake, client_for(fake.url) as client:
        assert await client.get("a") == b"a"
        assert await eventually(lambda: 1 in fake.eof)  # the extra reply closed it
        assert await client.get("b") == b"b"  # not the stray "a"
        assert fake.connections == 2


async def test_no_answer_times_out_and_drops_the_connection():
    async with FakeRedis(silent) as fake, client_for(fake.url, timeout_s=SHORT) as client:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await client.get("k")
        assert SHORT * 0.9 <= time.monotonic() - started < SHORT + 0.3
        assert await eventually(lambda: 1 in fake.eof)


async def test_timeout_fails_every_batch_waiting_on_the_connection():
    async with FakeRedis(silent) as fake, client_for(fake.url, timeout_s=SHORT) as client:
        results = await asyncio.gather(*(client.get(f"k{i}") for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert fake.connections == 1


async def test_late_reply_is_not_matched_to_the_next_batch():
    async def late(fake, reader, writer, index):
        while (command := await fake.read_command(reader, index)) is not None:
            key = command[1]
            if key == b"slow":
                async def later(w=writer, k=key):
                    await asyncio.sleep(SHORT * 2)
                    if not w.is_closing():
                        w.write(bulk(k))
                fake.spawn(later())
            else:
                writer.write(bulk(key))

    async with FakeRedis(late) as fake, client_for(fake.url, timeout_s=SHORT) as client:
        with pytest.raises(RedisTimeoutError):
            await client.get("slow")
        assert await client.get("fast") == b"fast"
        await asyncio.sleep(SHORT * 2)  # the late reply's moment has passed
        assert await client.get("fast2") == b"fast2"
        assert [c for c, _ in fake.commands] == [1, 2, 2]


async def test_cancelled_caller_keeps_replies_in_step():
    """A caller cancelled mid-wait (e.g. AutoPipeline's own timeout) must not shift later replies."""
    async def slow_first(fake, reader, writer, index):
        async def reply(key, delay):
            await asyncio.sleep(delay)
            writer.write(bulk(key))
        # replies keep command order, the first one late
        previous = None
        while (command := await fake.read_command(reader, index)) is not None:
            delay = 0.15 if command[1] == b"slow" else 0.0
            async def in_order(key=command[1], delay=delay, before=previous):
                if before is not None:
                    await before
                await reply(key, delay)
            previous = asyncio.ensure_future(in_order())
            fake.spawn(previous)

    async with FakeRedis(slow_first) as fake, client_for(fake.url, timeout_s=T) as client:
        slow = asyncio.ensure_future(client.get("slow"))
        await asyncio.sleep(0.02)
        slow.cancel()
        assert await client.get("fast") == b"fast"
        assert fake.connections == 1


async def test_nothing_listening_is_a_connection_error():
    port = _free_port()  # bound then released: nothing listens there
    async with client_for(f"redis://127.0.0.1:{port}", timeout_s=SHORT) as client:
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await client.get("k")
        with pytest.raises(RedisConnectionError):
            await client.pipeline().set("k", "v").execute()
        assert time.monotonic() - started < 1.0
    async with client_for(f"unix://{tempfile.gettempdir()}/no-such-{secrets.token_hex(4)}.sock") as client:
        with pytest.raises(RedisConnectionError):
            await client.ping()


async def test_pipeline_transaction_refused():
    async with client_for("redis://127.0.0.1:1") as client:  # never connects
        with pytest.raises(ValueError):
            client.pipeline(transaction=True)
        assert client.pipeline(transaction=False).commands == []
        assert await client.pipeline().execute() == []  # nothing to send: no connection needed


# --- URL forms: password, db, unix socket ---------------------------------------------


@contextlib.contextmanager
def own_redis(*extra: str):
    """A redis-server started like tests/redis_server.py, with extra arguments; yields its port."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="gw-resp-") as tmp:
        process = subprocess.Popen(
            [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", tmp, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(64):  # +PONG, or -NOAUTH with a password
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis server did not start") from None
                    time.sleep(0.05)
            yield port
        finally:
            process.kill()
            process.wait()


def assert_only_in_db(port: int, key: str, value: bytes, db: int, password: str | None = None) -> None:
    """``key`` holds ``value`` in database ``db`` and is absent from database 0 (seen by redis-py)."""
    there = redis.Redis(host="127.0.0.1", port=port, password=password, db=db)
    db0 = redis.Redis(host="127.0.0.1", port=port, password=password, db=0)
    try:
        assert there.get(key) == value
        assert db0.get(key) is None
    finally:
        there.close()
        db0.close()


async def test_password_and_db_from_the_url():
    password = "p@ss:w/rd %x"  # needs URL quoting
    with own_redis("--requirepass", password) as port:
        quoted = quote(password, safe="")
        key = _key("db")
        async with client_for(f"redis://:{quoted}@127.0.0.1:{port}/2") as client:
            await client.pipeline().set(key, "in-two").execute()
            assert await client.get(key) == b"in-two"
            (db,) = await client.execute([("CLIENT", "INFO")])
            assert b" db=2 " in db
        assert_only_in_db(port, key, b"in-two", 2, password)
        async with client_for(f"redis://default:{quoted}@127.0.0.1:{port}") as client:  # user and password
            assert await client.get(key) is None  # db 0
            assert await client.ping() is True
        async with client_for(f"redis://:wrong@127.0.0.1:{port}/2") as client:
            with pytest.raises(RedisError, match="WRONGPASS|invalid"):
                await client.get(key)
        async with client_for(f"redis://127.0.0.1:{port}/2") as client:  # no password
            with pytest.raises(ResponseError, match="NOAUTH"):
                await client.get(key)


async def test_unix_socket_with_db():
    with tempfile.TemporaryDirectory(prefix="gwr") as tmp:
        path = os.path.join(tmp, "r.sock")
        with own_redis("--unixsocket", path, "--unixsocketperm", "700") as port:
            key = _key("unix")
            async with client_for(f"unix://{path}?db=1") as client:
                assert await client.ping() is True
                await client.pipeline().set(key, "in-one", ex=50).execute()
                assert await client.mget(key) == [b"in-one"]
            assert_only_in_db(port, key, b"in-one", 1)


# --- through the real limit store ---------------------------------------------------------


async def test_redis_store_round_trip(redis_server):
    async with client_for(redis_server.url) as flusher:
        await flusher.execute([("SCRIPT", "FLUSH")])  # as after a restart: admit goes through NOSCRIPT
    store = RedisStore(redis_client(redis_server.url, 1.0), prefix=f"{_key('store')}:")
    try:
        assert isinstance(store.client, RespClient)
        periods = Periods(day="20261122", month="202611")
        quota = Quota(max_concurrent=1, tpm=1000)
        first = await store.admit("key:a", quota, "r1", 900, 60_000, periods)
        assert first.denied is None and first.tokens_remaining == 100
        assert (await store.admit("key:a", quota, "r2", 0, 60_000, periods)).denied == "concurrency"
        await store.settle("key:a", quota, "r1", 50, 0.25, periods)
        second = await store.admit("key:a", quota, "r3", 100, 60_000, periods)
        assert second.denied is None and second.tokens_remaining == 850
        assert await store.spent("key:a", periods) == (0.25, 0.25)
    finally:
        await store.close()


# --- faults that must not corrupt the connection ------------------------------------------


async def test_unsendable_argument_does_not_shift_later_replies(redis_server):
    """A command that cannot be encoded raises TypeError; nothing was sent, so nothing may wait for a reply.

    (At commit cf31dcf ``_send`` queued the batch before ``encode`` raised: the next
    ``get(a)`` got b's value and ``get(b)`` timed out.)"""
    a, b = _key("a"), _key("b")
    async with client_for(redis_server.url, timeout_s=0.5) as client:
        await client.pipeline().set(a, "value-a").set(b, "value-b").execute()
        with pytest.raises(TypeError):
            await client.pipeline().set(_key("x"), None).execute()
        got = await asyncio.gather(client.get(a), client.get(b), return_exceptions=True)
        assert got == [b"value-a", b"value-b"]


async def test_setup_replayed_on_reconnect_and_refusal_closes():
    """Each new connection sends AUTH then SELECT first; a refused AUTH fails the call and closes the socket."""
    async def setup_then_drop(fake, reader, writer, index):
        while (command := await fake.read_command(reader, index)) is not None:
            if command[0] == b"AUTH":
                writer.write(b"+OK\r\n" if command[-1] == b"good" else b"-WRONGPASS invalid password\r\n")
            elif command[0] == b"SELECT":
                writer.write(b"+OK\r\n")
            else:
                writer.write(bulk(command[1]))
                writer.close()  # one command per connection
                return

    async with FakeRedis(setup_then_drop) as fake:
        async with client_for(f"redis://u:good@127.0.0.1:{fake.port}/5") as client:
            assert await client.get("one") == b"one"
            assert await eventually(lambda: client._conn is None or client._conn.closed)
            assert await client.get("two") == b"two"
        assert [(c, args) for c, args in fake.commands] == [
            (1, [b"AUTH", b"u", b"good"]), (1, [b"SELECT", b"5"]), (1, [b"GET", b"one"]),
            (2, [b"AUTH", b"u", b"good"]), (2, [b"SELECT", b"5"]), (2, [b"GET", b"two"])]
        async with client_for(f"redis://:bad@127.0.0.1:{fake.port}/5") as client:
            with pytest.raises(ResponseError, match="WRONGPASS"):
                await client.get("three")
            assert await eventually(lambda: 3 in fake.eof)
        assert [args[0] for c, args in fake.commands if c == 3] == [b"AUTH", b"SELECT"]


async def test_setup_timeout_closes_the_connection():
    """AUTH/SELECT unanswered: the timeout must close the socket it opened, not leave it open.

    ``RespClient._connect`` catches the TimeoutError of its setup without closing ``conn``
    (and ``self._conn`` is never set), so every attempt leaves one socket open for good."""
    async with FakeRedis(silent) as fake:
        async with client_for(f"redis://:pw@127.0.0.1:{fake.port}/3", timeout_s=SHORT) as client:
            for _ in range(3):
                with pytest.raises(RedisTimeoutError):
                    await client.get("k")
            assert [args[0] for _, args in fake.commands][:2] == [b"AUTH", b"SELECT"]
            # every connection that timed out in its setup was closed by the client
            assert await eventually(lambda: fake.eof >= {1, 2, 3}, within=0.5), (fake.connections, fake.eof)


async def test_server_that_refuses_at_accept_fails_fast():
    """Redis at maxclients writes an error and closes right after accept: a ConnectionError, not a timeout."""
    async def refuse(fake, reader, writer, index):
        writer.write(b"-ERR max number of clients reached\r\n")
        writer.close()

    async with FakeRedis(refuse) as fake, client_for(fake.url, timeout_s=1.0) as client:
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(RedisConnectionError):
                await client.get("k")
            assert time.monotonic() - started < 0.5
