"""A lean HTTP/1.1 client for upstream calls: keep-alive pools over asyncio, httptools parsing.

Upstream calls need little of a general-purpose client: one POST with a bytes
body, the status and headers, then the body read whole or as it arrives. So
this module writes the request bytes itself and lets httptools (the C parser
uvicorn uses) parse the response, which costs a worker far less per request
than aiohttp or httpx did (``bench/NOTES.md`` has the profiles).

What it does: HTTP and HTTPS (the system trust store), keep-alive with idle
connections reused last-in first-out and dropped after ``keepalive_s``,
Content-Length, chunked and read-until-close bodies, gzip and deflate
``Content-Encoding``, and a request on a reused connection that the server
had already closed is sent again once on a fresh one (nothing was received,
so the upstream never saw it). No proxies, redirects, cookies or HTTP/2.
Errors are the seam's own (``UpstreamTimeout``, ``UpstreamUnreachable``,
``UpstreamBroken``), never this module's.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from gateway.upstream.base import (
    BODY_LIMIT,
    DIRECT,
    ConnectOptions,
    UpstreamBroken,
    UpstreamTimeout,
    UpstreamUnreachable,
)

#: A pool: one per (scheme, host, port).
_PoolKey = tuple[str, str, int]


class _Target:
    """What a URL means to the pool, parsed once per distinct URL."""

    __slots__ = ("host", "host_header", "key", "path", "port", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamUnreachable("InvalidURL")
        self.host = parts.hostname
        self.ssl = parts.scheme == "https"
        try:
            self.port = parts.port or (443 if self.ssl else 80)
        except ValueError:
            raise UpstreamUnreachable("InvalidURL") from None
        self.key: _PoolKey = (parts.scheme, self.host, self.port)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = 443 if self.ssl else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("read timed out"))


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the response being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._begin()

    def _begin(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self._interim = False
        self.sized = False  # Content-Length or chunked: the parser knows where the body ends
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.error: Exception | None = None
        self.chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.error = UpstreamBroken("invalid HTTP response")
            assert self.transport is not None, "data arrives only after connection_made"
            self.transport.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            if self.headers_done and not self.sized and exc is None:
                self.complete = True  # the body ran until the connection closed
            else:
                self.error = UpstreamBroken("the server closed the connection")
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = {}  # an interim response (100 Continue, 103): the real one follows
            self._interim = True
            return
        self.status = status
        self.sized = "content-length" in self.headers or "chunked" in self.headers.get("transfer-encoding", "").lower()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        # Asked now: once the parser has moved past the message it no longer knows.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True

    # the client's side
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until more of the response arrives, the connection ends, or ``timeout_s`` passes."""
        self._waiter = waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class _Decoder:
    """gzip / deflate bodies, decoded as they arrive."""

    def __init__(self, encoding: str) -> None:
        wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
        self._z = zlib.decompressobj(wbits)

    def __call__(self, data: bytes) -> bytes:
        try:
            return self._z.decompress(data)
        except zlib.error:
            raise UpstreamBroken("ContentEncodingError") from None


class H1Response:
    """A response whose headers are in; the body is read with ``read`` or ``line_batches``."""

    def __init__(self, client: H1Client, key: _PoolKey, conn: _Connection, timeout_s: float) -> None:
        self._client = client
        self._key = key
        self._conn: _Connection | None = conn
        self._timeout_s = timeout_s
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers
        encoding = conn.headers.get("content-encoding", "").strip().lower()
        self._decode = _Decoder(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None

    async def _more(self, conn: _Connection) -> bool:
        """Wait for more body; False once it is complete."""
        if conn.complete:
            return False
        error = conn.error
        if error is not None:
            raise error
        await conn.wait(self._timeout_s)  # may set conn.error
        if conn.error is not None and not conn.chunks:
            raise conn.error
        return True

    def _take(self, conn: _Connection) -> bytes:
        data = b"".join(conn.chunks) if len(conn.chunks) != 1 else conn.chunks[0]
        conn.chunks.clear()
        return self._decode(data) if self._decode is not None else data

    async def read(self, limit: int = BODY_LIMIT) -> bytes:
        conn = self._conn
        assert conn is not None, "response already closed"
        length = conn.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise UpstreamBroken("upstream body too large")
        parts: list[bytes] = []
        size = 0
        while True:
            if conn.chunks:
                data = self._take(conn)
                size += len(data)
                if size > limit:
                    raise UpstreamBroken("upstream body too large")
                parts.append(data)
            if not await self._more(conn):
                if conn.chunks:
                    continue
                return parts[0] if len(parts) == 1 else b"".join(parts)

    async def line_batches(self) -> AsyncIterator[list[str]]:
        """Lines of the body, grouped as they arrived: all complete lines of one read."""
        conn = self._conn
        assert conn is not None, "response already closed"
        pending = b""
        while True:
            if conn.chunks:
                data = self._take(conn)
                pending += data
                if b"\n" in data:
                    *complete, pending = pending.split(b"\n")
                    yield [line.rstrip(b"\r").decode("utf-8", "replace") for line in complete]
                continue
            if not await self._more(conn):
                if conn.chunks:
                    continue
                break
        if pending:
            yield [pending.rstrip(b"\r").decode("utf-8", "replace")]

    async def close(self) -> None:
        """Back to the pool when the body was read to its end; else the connection is dropped."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable():
            self._client._release(self._key, conn)
        else:
            conn.close()


class H1Client:
    """Keep-alive connection pools per (scheme, host, port); created inside the event loop."""

    def __init__(self, *, keepalive_s: float = 15.0, max_idle_per_host: int = 256) -> None:
        self.keepalive_s = keepalive_s
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[_PoolKey, list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._ssl: ssl.SSLContext | None = None

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 1024:
                self._targets.clear()
            target = self._targets[url] = _Target(url)
        return target

    def _release(self, key: _PoolKey, conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _pooled(self, key: _PoolKey) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if (
                not conn.closed
                and transport is not None
                and not transport.is_closing()
                and now - conn.idle_since < self.keepalive_s
            ):
                return conn
            conn.close()
        return None

    async def _connect(self, target: _Target, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if target.ssl:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(min(timeout_s, 10.0)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    target.host,
                    target.port,
                    ssl=context,
                    server_hostname=target.host if context else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("connect timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}") from None
        return conn

    async def request(
        self, method: str, url: str, headers: dict[str, str], body: bytes, timeout_s: float
    ) -> H1Response:
        """Send a request; return once the response headers are in.

        ``timeout_s`` bounds connecting and each wait for data."""
        target = self._target(url)
        lines = [f"{method} {target.path} HTTP/1.1\r\nhost: {target.host_header}\r\n"]
        lines.extend(f"{k}: {v}\r\n" for k, v in headers.items())
        lines.append(f"content-length: {len(body)}\r\n\r\n")
        text = "".join(lines)
        if text.count("\n") != len(headers) + 4 or text.count("\r") != len(headers) + 4:
            # A header with a line break (a key file's trailing newline) would inject headers.
            raise UpstreamUnreachable("InvalidHeader: a header name or value holds a line break")
        head = text.encode("latin-1")
        for attempt in range(2):
            conn = self._pooled(target.key) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target, timeout_s)
            conn._begin()
            transport = conn.transport
            assert transport is not None, "a connected connection has its transport"
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(timeout_s)
            except UpstreamBroken:
                conn.close()
                if reused and not conn.received:
                    continue  # the server had closed this idle connection: the request never arrived
                raise
            except BaseException:
                conn.close()
                raise
            return H1Response(self, target.key, conn, timeout_s)
        raise UpstreamBroken("the server closed the connection")

    async def post(
        self, url: str, headers: dict[str, str], body: bytes, timeout_s: float, connect: ConnectOptions = DIRECT
    ) -> H1Response:
        return await self.request("POST", url, headers, body, timeout_s)

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        response = await self.request("GET", url, {}, b"", timeout_s)
        try:
            return response.status, await response.read()
        finally:
            await response.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
