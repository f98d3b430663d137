"""A lean HTTP/1.1 client for upstream calls: keep-alive pools over asyncio, httptools parsing.

Upstream calls need little of a general-purpose client: one POST with a bytes
body, the status and headers, then the body read whole or as it arrives. So
this module writes the request bytes itself and lets httptools (the C parser
uvicorn uses) parse the response, which costs a worker far less per request
than aiohttp or httpx did (``bench/NOTES.md`` has the profiles).

What it does: HTTP and HTTPS (per-provider CA file and client certificate,
:mod:`gateway.upstream.tls`), proxies from the environment or the provider
(:mod:`gateway.upstream.proxy`: CONNECT tunnels for https, absolute-form
requests for http), keep-alive with idle connections reused last-in first-out
and dropped after ``keepalive_s``, Content-Length, chunked and
read-until-close bodies, gzip and deflate ``Content-Encoding``. No redirects,
cookies or HTTP/2.

What it refuses, so that a hostile or broken upstream costs a bounded amount:
a response head over ``MAX_HEAD_BYTES`` or ``MAX_HEADERS``, a decoded body
over the caller's limit (inflated in bounded steps, never whole), an SSE line
over ``MAX_LINE_BYTES``, a head not complete within ``timeout_s`` of the call,
and any byte after a response's end (the connection is dropped, so nothing of
one response can answer another request). A request whose bytes were handed
to the connection is never sent again: only a write that failed on the spot
is retried, once, on a fresh connection. Errors are the seam's own
(``UpstreamTimeout``, ``UpstreamUnreachable``, ``UpstreamBroken``), never
this module's.
"""

from __future__ import annotations

import asyncio
import os
import select
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from importlib import metadata
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
from gateway.upstream.proxy import Proxy, ProxyEnvironment, open_tunnel, parse_proxy
from gateway.upstream.tls import TLSContexts, TLSKey

#: The most bytes a response head (status line and headers, interim responses included) may take.
MAX_HEAD_BYTES = 64 * 1024
#: The most header lines a response may have.
MAX_HEADERS = 100
#: The longest line ``line_batches`` holds while waiting for its newline.
MAX_LINE_BYTES = 1024 * 1024
#: The default cap on open connections per pool (per origin, proxy and TLS settings).
MAX_CONNECTIONS_PER_HOST = 512
#: The most decoded bytes inflated in one step of ``line_batches``.
_INFLATE_STEP = 256 * 1024
#: Connecting alone never waits longer than this, whatever the caller's timeout.
_CONNECT_CAP_S = 10.0

try:
    _VERSION = metadata.version("llm-gateway")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0"
USER_AGENT = f"llm-gateway/{_VERSION}"
ACCEPT_ENCODING = "gzip, deflate"
_USER_AGENT_LINE = f"user-agent: {USER_AGENT}\r\n"
_ACCEPT_ENCODING_LINE = f"accept-encoding: {ACCEPT_ENCODING}\r\n"

#: A pool: the origin (scheme, host, port), the proxy's key, and the TLS options.
_PoolKey = tuple[tuple[str, str, int], tuple[str, int, str | None] | None, TLSKey | None]


class _Target:
    """What a URL means to the pool, parsed once per distinct URL."""

    __slots__ = ("host", "host_header", "key", "path", "port", "scheme", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamUnreachable("InvalidURL")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.ssl = parts.scheme == "https"
        try:
            self.port = parts.port or (443 if self.ssl else 80)
        except ValueError:
            raise UpstreamUnreachable("InvalidURL") from None
        self.key = (parts.scheme, self.host, self.port)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = 443 if self.ssl else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"


class _Pool:
    """The connections to one pool key: the idle ones, how many are open, who waits for one."""

    __slots__ = ("idle", "open", "waiters")

    def __init__(self) -> None:
        self.idle: list[_Connection] = []
        self.open = 0  # connected or connecting, idle or busy
        self.waiters: deque[asyncio.Future[None]] = deque()

    def wake(self) -> None:
        """Let one waiting request look again (a connection came back or went away)."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class _Route:
    """How to send to one URL with one set of connect options: decided once, then cached."""

    __slots__ = ("context", "extra", "pool", "proxy", "request_line_tail", "target", "tunnel")

    def __init__(self, target: _Target, proxy: Proxy | None, context: ssl.SSLContext | None, pool: _Pool) -> None:
        self.target = target
        self.proxy = proxy
        self.context = context
        self.pool = pool
        self.tunnel = proxy is not None and target.ssl  # CONNECT, then TLS to the origin through it
        forward = proxy is not None and not target.ssl  # absolute-form requests to the proxy
        request_target = f"{target.scheme}://{target.host_header}{target.path}" if forward else target.path
        self.request_line_tail = f" {request_target} HTTP/1.1\r\nhost: {target.host_header}\r\n"
        # Credentials ride on each request only when the proxy sees the requests (plain http).
        self.extra = (
            f"proxy-authorization: {proxy.authorization}\r\n" if forward and proxy and proxy.authorization else ""
        )


class _HeadTooLarge(Exception):
    """Raised inside a parser callback to stop parsing an oversized head."""


class _Leftover(Exception):
    """Raised inside a parser callback when bytes follow a complete response."""


def _expire(waiter: asyncio.Future[None], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(message))


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the response being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # the socket's descriptor, to look for data or EOF while idle
        self.pool: _Pool | None = None  # set once connected: the pool whose open count includes it
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
        self.complete = False  # the response ended: any later byte is not part of it
        self.keep_alive = False
        self.received = False
        self.error: Exception | None = None
        self.chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._header_bytes = 0  # names and values of the headers parsed
        self._header_count = 0
        self._fault = "invalid HTTP response"

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(cast(asyncio.Transport, transport))  # a stream connection's transport

    def data_received(self, data: bytes) -> None:
        if self.complete:
            # Bytes after the response's end (a second response, junk, or anything
            # while idle in the pool): the connection can no longer be trusted.
            self.close()
            return
        self.received = True
        if not self.headers_done:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.complete:  # else: the bytes after a complete response began another (_Leftover)
                self.error = UpstreamBroken(self._fault)
            self.close()
        else:
            if not self.headers_done and self._head_bytes > MAX_HEAD_BYTES:
                self.error = UpstreamBroken("response head too large")
                self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._gone()
        if not self.complete and self.error is None:
            if self.headers_done and not self.sized and exc is None:
                self.complete = True  # the body ran until the connection closed
            else:
                self.error = UpstreamBroken("the server closed the connection")
        self._wake()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            raise _Leftover

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > MAX_HEADERS or self._header_bytes > MAX_HEAD_BYTES:
            self._fault = "too many response headers" if self._header_count > MAX_HEADERS else "response head too large"
            raise _HeadTooLarge
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

    async def wait(self, deadline: float, message: str) -> None:
        """Until more of the response arrives, the connection ends, or the loop's clock reaches ``deadline``."""
        self._waiter = waiter = self.loop.create_future()
        timer = self.loop.call_at(deadline, _expire, waiter, message)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def _gone(self) -> None:
        """Give back this connection's place in its pool's open count (once)."""
        pool = self.pool
        if pool is not None:
            self.pool = None
            pool.open -= 1
            if pool.waiters:
                pool.wake()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self._gone()


class _Decoder:
    """gzip (one or more members) and deflate bodies, inflated in bounded steps as they arrive."""

    __slots__ = ("_capped", "_fresh", "_gzip", "_seen", "_tail", "_wbits", "_z")

    def __init__(self, encoding: str) -> None:
        self._gzip = "gzip" in encoding
        self._wbits = 16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS
        self._z = zlib.decompressobj(self._wbits)
        self._tail = b""  # input held back because the output reached its cap
        self._capped = False  # the last step stopped at its cap: more output may follow without input
        self._seen = False  # any compressed byte arrived
        self._fresh = True  # nothing inflated yet: a "deflate" body may still turn out raw

    def pending(self) -> bool:
        """Whether output is held back for the next call."""
        return self._capped or bool(self._tail)

    def __call__(self, data: bytes, room: int) -> bytes:
        """Inflate ``data`` after any held-back input, giving at most ``room`` bytes; the rest waits."""
        if self._tail:
            data = self._tail + data
        if data:
            self._seen = True
        given = data
        out: list[bytes] = []
        left = room
        z = self._z
        try:
            while left > 0:
                if z.eof:
                    if not data:
                        break
                    if not self._gzip:
                        raise UpstreamBroken("ContentEncodingError: data after the deflate stream")
                    z = self._z = zlib.decompressobj(self._wbits)  # the next gzip member
                elif not data and not self._capped:
                    break
                piece = z.decompress(data, left)
                left -= len(piece)
                self._capped = left == 0
                if piece:
                    out.append(piece)
                data = z.unused_data if z.eof else z.unconsumed_tail
        except zlib.error:
            if self._fresh and self._wbits == zlib.MAX_WBITS:
                # "deflate" sent as a raw stream without the zlib wrapper (as some servers do).
                self._wbits = -zlib.MAX_WBITS
                self._z = zlib.decompressobj(self._wbits)
                self._tail = b""
                return self(given, room)
            raise UpstreamBroken("ContentEncodingError") from None
        if given:
            self._fresh = False
        self._tail = data
        return out[0] if len(out) == 1 else b"".join(out)

    def finish(self) -> None:
        """At the body's end: a compressed stream cut before its trailer is broken."""
        if self._seen and not self._z.eof:
            raise UpstreamBroken("ContentEncodingError: truncated compressed body")


class H1Response:
    """A response whose headers are in; the body is read with ``read`` or ``line_batches``."""

    def __init__(
        self, client: H1Client, pool: _Pool, conn: _Connection, timeout_s: float, stream_deadline: float | None
    ) -> None:
        self._client = client
        self._pool = pool
        self._conn: _Connection | None = conn
        self._timeout_s = timeout_s
        self._stream_deadline = stream_deadline
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
        deadline = conn.loop.time() + self._timeout_s
        stream_deadline = self._stream_deadline
        if stream_deadline is not None and stream_deadline < deadline:
            await conn.wait(stream_deadline, "the stream took longer than max_stream_s")
        else:
            await conn.wait(deadline, "read timed out")  # may set conn.error
        if conn.error is not None and not conn.chunks:
            raise conn.error
        return True

    def _take(self, conn: _Connection) -> bytes:
        data = b"".join(conn.chunks) if len(conn.chunks) != 1 else conn.chunks[0]
        conn.chunks.clear()
        return data

    async def read(self, limit: int = BODY_LIMIT) -> bytes:
        conn = self._conn
        assert conn is not None, "response already closed"
        length = conn.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise UpstreamBroken("upstream body too large")
        decode = self._decode
        parts: list[bytes] = []
        size = 0
        while True:
            if conn.chunks:
                data = self._take(conn)
                if decode is not None:
                    data = decode(data, limit - size + 1)  # one byte over the limit is enough to know
                size += len(data)
                if size > limit:
                    raise UpstreamBroken("upstream body too large")
                parts.append(data)
            if not await self._more(conn):
                if conn.chunks:
                    continue
                if decode is not None:
                    decode.finish()
                return parts[0] if len(parts) == 1 else b"".join(parts)

    async def line_batches(self) -> AsyncIterator[list[str]]:
        """Lines of the body, grouped as they arrived: all complete lines of one read.

        A line longer than ``MAX_LINE_BYTES`` fails the stream (``UpstreamBroken``).
        """
        conn = self._conn
        assert conn is not None, "response already closed"
        decode = self._decode
        pending = bytearray()
        while True:
            if conn.chunks or (decode is not None and decode.pending()):
                data = self._take(conn) if conn.chunks else b""
                if decode is not None:
                    data = decode(data, _INFLATE_STEP)
                if b"\n" not in data:
                    if len(pending) + len(data) > MAX_LINE_BYTES:
                        raise UpstreamBroken("upstream line too long")
                    pending += data
                    continue
                total = len(pending) + len(data)
                if pending:
                    pending += data
                    lines: list[bytes] | list[bytearray] = pending.split(b"\n")
                    pending = bytearray(lines.pop())
                else:
                    lines = data.split(b"\n")
                    rest = lines.pop()
                    if rest:
                        pending += rest
                # Only a block longer than the cap can hold a line over it.
                if total > MAX_LINE_BYTES and (len(pending) > MAX_LINE_BYTES or max(map(len, lines)) > MAX_LINE_BYTES):
                    raise UpstreamBroken("upstream line too long")
                yield [line.rstrip(b"\r").decode("utf-8", "replace") for line in lines]
                continue
            if not await self._more(conn):
                if conn.chunks:
                    continue
                break
        if decode is not None:
            decode.finish()
        if pending:
            yield [pending.rstrip(b"\r").decode("utf-8", "replace")]

    async def close(self) -> None:
        """Back to the pool when the body was read to its end; else the connection is dropped."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable():
            self._client._release(self._pool, conn)
        else:
            conn.close()


class H1Client:
    """Keep-alive connection pools per origin, proxy and TLS settings; created inside the event loop.

    ``max_connections_per_host`` caps the open connections of one pool: a
    request beyond it waits, within its timeout, for one to come free.
    ``max_stream_s`` (None: no limit) bounds a whole response, body included,
    from the call. ``environ`` (default ``os.environ``) is read once, here,
    for the proxy settings.
    """

    def __init__(
        self,
        *,
        keepalive_s: float = 15.0,
        max_idle_per_host: int = 256,
        max_connections_per_host: int = MAX_CONNECTIONS_PER_HOST,
        max_stream_s: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.keepalive_s = keepalive_s
        self.max_idle_per_host = max_idle_per_host
        self.max_connections_per_host = max_connections_per_host
        self.max_stream_s = max_stream_s
        self._proxies = ProxyEnvironment(os.environ if environ is None else environ)
        self._tls = TLSContexts()
        self._pools: dict[_PoolKey, _Pool] = {}
        self._routes: dict[ConnectOptions, dict[str, _Route]] = {}
        self._route_count = 0
        self._poll = select.poll()

    # --- routes and pools

    def _route(self, url: str, connect: ConnectOptions) -> _Route:
        routes = self._routes.get(connect)
        if routes is None:
            routes = self._routes[connect] = {}
        route = routes.get(url)
        if route is None:
            if self._route_count > 1024:
                self._routes.clear()
                self._route_count = 0
                routes = self._routes[connect] = {}
            route = routes[url] = self._new_route(url, connect)
            self._route_count += 1
        return route

    def _new_route(self, url: str, connect: ConnectOptions) -> _Route:
        target = _Target(url)
        if connect.proxy is None:
            proxy = self._proxies.select(target.scheme, target.host, target.port)
        else:
            proxy = parse_proxy(connect.proxy) if connect.proxy else None
        context = None
        tls_key: TLSKey | None = None
        if target.ssl:
            tls_key = (connect.ca_file, connect.client_cert, connect.client_key)
            context = self._tls.get(tls_key)
        key: _PoolKey = (target.key, proxy.key if proxy is not None else None, tls_key)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool()
        return _Route(target, proxy, context, pool)

    def _release(self, pool: _Pool, conn: _Connection) -> None:
        if len(pool.idle) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        pool.idle.append(conn)
        if pool.waiters:
            pool.wake()

    def _quiet(self, conn: _Connection) -> bool:
        """No byte and no EOF wait on an idle connection's socket (any would end it)."""
        fd = conn.fd
        if fd < 0:
            return True
        poll = self._poll
        poll.register(fd, select.POLLIN)
        try:
            return not poll.poll(0)
        finally:
            poll.unregister(fd)

    def _pooled(self, pool: _Pool) -> _Connection | None:
        idle = pool.idle
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
                and self._quiet(conn)
            ):
                return conn
            conn.close()
        return None

    async def _acquire(
        self, route: _Route, loop: asyncio.AbstractEventLoop, deadline: float, fresh: bool = False
    ) -> _Connection:
        """An idle connection that is still quiet (unless ``fresh``), a new one, or the first to come free."""
        pool = route.pool
        while True:
            conn = None if fresh else self._pooled(pool)
            if conn is not None:
                return conn
            if pool.open < self.max_connections_per_host:
                pool.open += 1
                try:
                    conn = await self._connect(route, loop, deadline)
                except BaseException:
                    pool.open -= 1
                    if pool.waiters:
                        pool.wake()
                    raise
                conn.pool = pool
                if conn.closed:
                    conn._gone()
                    raise UpstreamUnreachable("the connection closed as it opened")
                return conn
            waiter: asyncio.Future[None] = loop.create_future()
            pool.waiters.append(waiter)
            timer = loop.call_at(deadline, _expire, waiter, "no free connection within the timeout")
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    pool.wake()  # woken, then cancelled: pass the turn on
                raise
            finally:
                timer.cancel()

    async def _connect(self, route: _Route, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        target = route.target
        proxy = route.proxy
        context = route.context
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + _CONNECT_CAP_S)):
                if proxy is None:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop),
                        target.host,
                        target.port,
                        ssl=context,
                        server_hostname=target.host if context else None,
                    )
                elif route.tunnel:
                    assert context is not None, "a tunnel carries https"
                    raw, _ = await open_tunnel(loop, proxy, target.host, target.port)
                    conn = _Connection(loop)
                    try:
                        tls = await loop.start_tls(raw, conn, context, server_hostname=target.host)
                    except BaseException:
                        raw.close()
                        raise
                    if tls is None:
                        raw.close()
                        raise UpstreamUnreachable("TLS through the proxy failed")
                    conn.attach(tls)
                else:
                    _, conn = await loop.create_connection(lambda: _Connection(loop), proxy.host, proxy.port)
        except TimeoutError:
            raise UpstreamTimeout("connect timed out") from None
        except (OSError, ValueError) as exc:  # ssl.SSLError and certificate errors are OSErrors
            where = "via proxy: " if proxy is not None else ""
            raise UpstreamUnreachable(f"{where}{type(exc).__name__}") from None
        return conn

    # --- requests

    def _head(self, method: str, route: _Route, headers: dict[str, str], length: int) -> bytes:
        block = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        expected = 4 + len(headers) + (1 if route.extra else 0)
        defaults = ""
        # The caller's own User-Agent or Accept-Encoding (any case) wins over ours.
        lowered = "\n" + block.lower()
        if "\nuser-agent:" not in lowered:
            defaults = _USER_AGENT_LINE
            expected += 1
        if "\naccept-encoding:" not in lowered:
            defaults += _ACCEPT_ENCODING_LINE
            expected += 1
        text = f"{method}{route.request_line_tail}{route.extra}{block}{defaults}content-length: {length}\r\n\r\n"
        if text.count("\n") != expected or text.count("\r") != expected:
            # A header with a line break (a key file's trailing newline) would inject headers.
            raise UpstreamUnreachable("InvalidHeader: a header name or value holds a line break")
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            raise UpstreamUnreachable("InvalidHeader: a header is not latin-1") from None

    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        timeout_s: float,
        connect: ConnectOptions = DIRECT,
    ) -> H1Response:
        """Send a request; return once the response headers are in.

        Waiting for a connection, connecting and the whole response head share
        ``timeout_s``; each later wait for body data gets ``timeout_s`` anew."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + timeout_s
        stream_deadline = None
        if self.max_stream_s is not None:
            stream_deadline = start + self.max_stream_s
            deadline = min(deadline, stream_deadline)
        route = self._route(url, connect)
        head = self._head(method, route, headers, len(body))
        for attempt in range(2):
            conn = await self._acquire(route, loop, deadline, fresh=attempt > 0)
            conn._begin()
            transport = conn.transport
            assert transport is not None, "a connected connection has its transport"
            small = len(body) < 65536
            transport.write(head + body if small else head)
            if transport.is_closing():
                # The write failed on the spot (the peer had already gone): none of
                # the request reached it, so one fresh connection may carry it.
                conn.close()
                if attempt == 0:
                    continue
                raise UpstreamBroken("the server closed the connection")
            if not small:
                transport.write(body)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(deadline, "timed out waiting for the response head")
                if conn.status == 407 and route.proxy is not None and not route.tunnel:
                    raise UpstreamUnreachable("proxy refused the request: 407")
            except BaseException:
                conn.close()
                raise
            return H1Response(self, route.pool, conn, timeout_s, stream_deadline)
        raise UpstreamBroken("the server closed the connection")

    async def post(
        self, url: str, headers: dict[str, str], body: bytes, timeout_s: float, connect: ConnectOptions = DIRECT
    ) -> H1Response:
        return await self.request("POST", url, headers, body, timeout_s, connect)

    async def get(self, url: str, timeout_s: float, connect: ConnectOptions = DIRECT) -> tuple[int, bytes]:
        response = await self.request("GET", url, {}, b"", timeout_s, connect)
        try:
            return response.status, await response.read()
        finally:
            await response.close()

    async def close(self) -> None:
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
