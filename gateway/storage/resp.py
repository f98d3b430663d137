"""A lean Redis client: one pipelined connection, RESP written by hand, replies parsed by hiredis.

The gateway sends Redis little besides batches of Lua script calls and SETs
(``gateway/storage/autopipeline.py``), and redis-py's asyncio pipeline spends
more Python time on each batch (connection-pool checkout, per-command packing
and response callbacks) than the commands take (``bench/NOTES.md``). Here a
batch is encoded into one write, and replies are matched to batches in order
on one connection, as Redis answers a connection's commands in order.

``redis_client`` in ``gateway/storage/connect.py`` uses this for
``redis://``, ``rediss://`` and ``unix://`` URLs; Cluster and Sentinel go
through redis-py. It offers the few redis-py calls the gateway makes
(``pipeline()`` with ``eval``/``evalsha``/``set``/``get``, ``script_load``,
``mget``, ``register_script``, ``aclose``: the ``RedisClient`` protocol),
raising redis-py's exception classes, so the stores work unchanged on either.

Failure handling: a reply not in within ``timeout_s`` closes the connection
(replies still due would be matched to the wrong batch) and fails every
batch waiting on it; the next call connects again.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import ConfigError, redis_url_problems

#: A command argument: each is sent as a bulk string.
RedisValue = str | bytes | int | float
Command = tuple[RedisValue, ...]


def encode(commands: list[Command]) -> bytes:
    """RESP arrays of bulk strings, one per command, in one buffer."""
    out: list[bytes] = []
    value: Any  # dispatched on its exact type below, which mypy cannot narrow on
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for value in command:
            kind = type(value)
            if kind is str:
                data = value.encode()
            elif kind is bytes:
                data = value
            elif kind is int:
                data = b"%d" % value
            elif kind is float:
                data = repr(value).encode()
            else:
                raise TypeError(f"cannot send {kind.__name__} to Redis")
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class _Batch:
    __slots__ = ("future", "results", "size", "timer")

    def __init__(self, size: int, future: asyncio.Future[list[Any]]) -> None:
        self.size = size
        self.results: list[Any] = []  # replies, an error reply as a ResponseError
        self.future = future
        self.timer: asyncio.TimerHandle | None = None


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[_Batch] = deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError:
                self.fail(RedisConnectionError("protocol error from Redis"))
                return
            if reply is False:
                return
            if not waiting:
                self.fail(RedisConnectionError("reply from Redis that no command asked for"))
                return
            batch = waiting[0]
            batch.results.append(_error(reply) if isinstance(reply, hiredis.ReplyError) else reply)
            if len(batch.results) == batch.size:
                waiting.popleft()
                if batch.timer is not None:
                    batch.timer.cancel()
                if not batch.future.done():
                    batch.future.set_result(batch.results)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fail(RedisConnectionError("connection to Redis lost"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        while self.waiting:
            batch = self.waiting.popleft()
            if batch.timer is not None:
                batch.timer.cancel()
            if not batch.future.done():
                batch.future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class _Script:
    """What ``register_script`` gives redis-py callers here: the script's SHA1."""

    def __init__(self, text: str) -> None:
        self.script = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


class RespPipeline:
    """Commands collected for one batch (never a MULTI/EXEC transaction)."""

    def __init__(self, client: RespClient) -> None:
        self._client = client
        self.commands: list[Command] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: RedisValue) -> RespPipeline:
        self.commands.append(("EVALSHA", sha, numkeys, *keys_and_args))
        return self

    def eval(self, script: str, numkeys: int, *keys_and_args: RedisValue) -> RespPipeline:
        self.commands.append(("EVAL", script, numkeys, *keys_and_args))
        return self

    def set(self, key: str, value: RedisValue, ex: int | None = None) -> RespPipeline:
        self.commands.append(("SET", key, value) if ex is None else ("SET", key, value, "EX", ex))
        return self

    def get(self, key: str) -> RespPipeline:
        self.commands.append(("GET", key))
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        results = await self._client.execute(self.commands)
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results


def _tls_context(ca_certs: str | None, cert_reqs: str) -> ssl.SSLContext:
    """The TLS settings of a ``rediss://`` URL: the system's CAs or ``ssl_ca_certs``,
    and no verification at all with ``ssl_cert_reqs=none``."""
    try:
        context = ssl.create_default_context(cafile=ca_certs)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("config", [f"redis.url: cannot read ssl_ca_certs {ca_certs!r} ({exc})"]) from None
    if cert_reqs == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class RespClient:
    """``redis://[user:password@]host[:port][/db]``, ``rediss://…`` (TLS) or ``unix:///path[?db=N]``.

    Query options: ``db``, and for ``rediss://`` ``ssl_cert_reqs=none|required``
    and ``ssl_ca_certs=PEM``; any other option is a :class:`ConfigError`, as
    are options that cannot be used, rather than being ignored.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        problems = redis_url_problems(url)
        if problems:
            raise ConfigError("config", [f"redis.url: {p}" for p in problems])
        parts = urlsplit(url)
        options = {name: values[0] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
        self.timeout_s = timeout_s
        self._unix = parts.scheme == "unix"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 6379
        self._path = unquote(parts.path) if self._unix else ""
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "rediss":
            self._ssl = _tls_context(options.get("ssl_ca_certs"), options.get("ssl_cert_reqs", "required"))
        db = options.get("db") if self._unix else parts.path.strip("/") or options.get("db")
        self._setup: list[Command] = []
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
            self._setup.append(("AUTH", user, password) if user else ("AUTH", password))
        if db not in (None, "", "0"):
            self._setup.append(("SELECT", int(db)))
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._unix:
                    _, conn = await loop.create_unix_connection(_Connection, self._path)
                else:
                    _, conn = await loop.create_connection(_Connection, self._host, self._port, ssl=self._ssl)
                if self._setup:
                    try:
                        results = await self._send(conn, self._setup)
                    except BaseException:  # a hung AUTH must not leave the socket open
                        conn.fail(RedisConnectionError("connection setup failed"))
                        raise
                    for result in results:
                        if isinstance(result, Exception):
                            conn.fail(RedisConnectionError(f"Redis refused the connection setup: {result}"))
                            raise result
        except TimeoutError:
            raise RedisTimeoutError("timed out connecting to Redis") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis ({type(exc).__name__})") from None
        return conn

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:  # one connect at a time; concurrent callers wait for it
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            conn = await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None
        self._conn = conn
        return conn

    async def _send(self, conn: _Connection, commands: list[Command]) -> list[Any]:
        data = encode(commands)  # first: a command that cannot be encoded must not leave a batch waiting
        assert conn.transport is not None, "a connected connection has its transport"
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        conn.waiting.append(_Batch(len(commands), future))
        conn.transport.write(data)
        return await future

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def send_now(self, commands: list[Command]) -> asyncio.Future[list[Any]]:
        """Write commands now, on the open connection (see ``connected``); the
        future gets their replies. No reply within ``timeout_s`` fails the
        connection, and so every batch waiting on it."""
        conn = self._conn
        assert conn is not None and not conn.closed, "send_now needs an open connection"
        assert conn.transport is not None, "a connected connection has its transport"
        data = encode(commands)
        loop = asyncio.get_running_loop()
        batch = _Batch(len(commands), loop.create_future())
        batch.timer = loop.call_later(self.timeout_s, conn.fail, RedisTimeoutError("Redis did not answer in time"))
        conn.waiting.append(batch)
        conn.transport.write(data)
        return batch.future

    async def execute(self, commands: list[Command]) -> list[Any]:
        """Send commands in one write; their replies (a ResponseError in place of an error reply)."""
        if not commands:
            return []
        conn = await self._connection()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._send(conn, commands)
        except TimeoutError:
            conn.fail(RedisTimeoutError("Redis did not answer in time"))
            raise RedisTimeoutError("Redis did not answer in time") from None

    def pipeline(self, transaction: bool = False) -> RespPipeline:
        if transaction:
            raise ValueError("MULTI/EXEC pipelines are not supported here")
        return RespPipeline(self)

    def register_script(self, script: str) -> _Script:
        return _Script(script)

    async def script_load(self, script: str) -> str:
        (sha,) = await self.execute([("SCRIPT", "LOAD", script)])
        if isinstance(sha, Exception):
            raise sha
        return sha.decode() if isinstance(sha, bytes) else sha

    async def mget(self, *keys: str) -> list[Any]:
        (values,) = await self.execute([("MGET", *keys)])
        if isinstance(values, Exception):
            raise values
        return cast("list[Any]", values)  # an array reply

    async def get(self, key: str) -> Any:
        (value,) = await self.execute([("GET", key)])
        if isinstance(value, Exception):
            raise value
        return value

    async def ping(self) -> bool:
        (reply,) = await self.execute([("PING",)])
        if isinstance(reply, Exception):
            raise reply
        return reply in (b"PONG", "PONG")

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.fail(RedisConnectionError("client closed"))
            self._conn = None
