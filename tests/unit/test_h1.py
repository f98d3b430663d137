"""gateway/h1.py against real TCP servers that write exact bytes.

Every test starts small ``asyncio.start_server`` servers that read the
request and answer with raw HTTP bytes written here, so each fault
(stalls, drops, garbage, idle closes) is produced exactly. No mocks.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import socket
import struct
import time
import zlib

import pytest

from gateway.upstream.h1 import H1Client, _Target
from gateway.upstream.base import UpstreamBroken, UpstreamTimeout, UpstreamUnreachable

T = 2.0  # timeout for calls that should succeed: a hang fails the test in T seconds
SHORT = 0.2  # timeout for the timeout cases


# --- a raw HTTP server ---------------------------------------------------------


class Request:
    """One request as the server read it off the wire."""

    def __init__(self, line: str, names: list[str], headers: dict[str, str], body: bytes, conn: int) -> None:
        self.line = line
        self.method, self.path, self.version = line.split(" ")
        self.names = names  # header names exactly as sent, in order
        self.headers = headers  # lower-cased names
        self.body = body
        self.conn = conn  # which accepted connection (1-based) carried it


class Server:
    """An asyncio TCP server; ``handler(server, reader, writer, conn_index)`` speaks raw bytes."""

    def __init__(self, handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.connections = 0
        self.requests: list[Request] = []
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Server":
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        index = self.connections
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            await self.handler(self, reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # CancelledError: __aexit__ stops handlers that are still sleeping
        finally:
            self._tasks.discard(task)
            writer.close()

    async def next_request(self, reader: asyncio.StreamReader, conn: int) -> Request | None:
        """The next request on this connection, or None at end of stream."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        names: list[str] = []
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            names.append(name)
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        request = Request(lines[0], names, headers, body, conn)
        self.requests.append(request)
        return request


def keep_alive(respond):
    """A handler answering every request on a connection with ``respond(request) -> bytes``."""

    async def handler(server: Server, reader, writer, conn: int) -> None:
        while (request := await server.next_request(reader, conn)) is not None:
            writer.write(respond(request))
            await writer.drain()

    return handler


async def batches_until(resp, error: type[Exception]) -> list[list[str]]:
    """The line batches a stream gave before it raised ``error`` (which it must)."""
    batches = []
    with pytest.raises(error):
        async for batch in resp.line_batches():
            batches.append(batch)
    return batches


def in_parts(*parts: bytes, pause: float = 0.03):
    """A handler answering one request with ``parts``, each followed by a pause, then closing."""

    async def handler(server: Server, reader, writer, conn: int) -> None:
        await server.next_request(reader, conn)
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        writer.close()

    return handler


def response(body: bytes = b"ok", status: str = "200 OK", headers: tuple = ()) -> bytes:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def client():
    c = H1Client()
    try:
        yield c
    finally:
        await c.close()


async def fetch(client: H1Client, url: str, body: bytes = b"{}", headers: dict | None = None) -> tuple[int, bytes]:
    resp = await client.post(url, headers or {}, body, T)
    try:
        return resp.status, await resp.read()
    finally:
        await resp.close()


# --- 1. Content-Length bodies and the request on the wire ------------------------


async def test_content_length_response_and_request_bytes(client):
    body = b'{"error":"slow down"}'
    answer = response(body, "429 Too Many Requests", (("Content-Type", "application/json"), ("Retry-After", "7"),
                                                     ("X-Request-ID", "abc")))
    async with Server(keep_alive(lambda r: answer)) as srv:
        resp = await client.post(f"{srv.url}/v1/chat/completions?x=1&y=2",
                                 {"Authorization": "Bearer k", "content-type": "application/json"}, b'{"a":1}', T)
        assert resp.status == 429
        assert resp.headers.get("retry-after") == "7"
        assert resp.headers["content-type"] == "application/json"
        assert resp.headers.get("x-request-id") == "abc"
        assert all(name == name.lower() for name in resp.headers)
        assert resp.headers.get("Retry-After") is None  # names are lower-cased, lookups are exact
        assert await resp.read() == body
        await resp.close()

    [req] = srv.requests
    assert req.line == "POST /v1/chat/completions?x=1&y=2 HTTP/1.1"
    assert req.headers["host"] == f"127.0.0.1:{srv.port}"
    assert req.headers["authorization"] == "Bearer k"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["content-length"] == "7"
    assert req.body == b'{"a":1}'
    assert [n.lower() for n in req.names].count("content-length") == 1
    assert [n.lower() for n in req.names].count("host") == 1


async def test_path_defaults_to_slash_and_repeated_headers_are_joined(client):
    raw = b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nhi"
    async with Server(keep_alive(lambda r: raw)) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        assert resp.headers["set-cookie"] == "a=1, b=2"
        assert await resp.read() == b"hi"
        await resp.close()
    assert srv.requests[0].line == "POST / HTTP/1.1"
    assert srv.requests[0].headers["content-length"] == "0"
    assert srv.requests[0].body == b""


async def test_large_request_and_response_bodies():
    big_in = bytes(range(256)) * 800  # 204,800 bytes: over the 64 KiB single-write threshold
    big_out = b"z" * (3 * 1024 * 1024 + 17)
    client = H1Client()
    try:
        async with Server(keep_alive(lambda r: response(big_out if r.body == big_in else b"mismatch"))) as srv:
            status, body = await fetch(client, srv.url + "/big", big_in)
            assert status == 200
            assert len(body) == len(big_out) and body == big_out
            # and the connection is fine for the next (small) request
            status, body = await fetch(client, srv.url + "/big", big_in)
            assert body == big_out
        assert srv.connections == 1
        assert srv.requests[0].headers["content-length"] == str(len(big_in))
    finally:
        await client.close()


async def test_ipv6_host_header_has_brackets_and_port(client):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    async with Server(keep_alive(lambda r: response(b"v6")), host="::1") as srv:
        assert await fetch(client, srv.url + "/x") == (200, b"v6")
    assert srv.requests[0].headers["host"] == f"[::1]:{srv.port}"


def test_host_header_omits_default_ports():
    assert _Target("http://example.com/v1").host_header == "example.com"
    assert _Target("https://example.com/v1").host_header == "example.com"
    assert _Target("http://example.com:443/v1").host_header == "example.com:443"
    assert _Target("https://example.com:80/v1").host_header == "example.com:80"
    assert _Target("http://[::1]:8080/").host_header == "[::1]:8080"


# --- 2-4. keep-alive ------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(client):
    async with Server(keep_alive(lambda r: response(r.path.encode()))) as srv:
        for i in range(3):
            assert await fetch(client, f"{srv.url}/r{i}") == (200, f"/r{i}".encode())
    assert srv.connections == 1
    assert [r.conn for r in srv.requests] == [1, 1, 1]


async def test_server_closing_right_after_response_next_request_uses_fresh_connection(client):
    """The server closes each connection as soon as it has answered, without saying so."""

    async def handler(server, reader, writer, conn):
        request = await server.next_request(reader, conn)
        writer.write(response(f"c{conn}".encode()))
        writer.close()

    async with Server(handler) as srv:
        assert await fetch(client, srv.url) == (200, b"c1")
        assert await fetch(client, srv.url) == (200, b"c2")  # no await in between: a stale pooled connection
    assert srv.connections == 2
    assert len(srv.requests) == 2


async def test_request_dropped_on_reused_connection_is_not_sent_again(client):
    """The idle connection looks alive, but the server closes it after reading the next request.

    The request was written whole, so the server may have acted on it (and
    billed it): it fails instead of going out a second time.
    """

    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(response(f"c{conn}".encode()))
        await writer.drain()
        await server.next_request(reader, conn)  # the second request on this connection: dropped unanswered

    async with Server(handler) as srv:
        assert await fetch(client, srv.url) == (200, b"c1")
        with pytest.raises(UpstreamBroken):
            await fetch(client, srv.url, b"second")
    assert srv.connections == 1
    assert [(r.conn, r.body) for r in srv.requests] == [(1, b"{}"), (1, b"second")]


async def test_server_closing_idle_connection_later_is_noticed(client):
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(response(f"c{conn}".encode()))
        await writer.drain()
        await asyncio.sleep(0.05)  # idle timeout on the server side

    async with Server(handler) as srv:
        assert await fetch(client, srv.url) == (200, b"c1")
        await asyncio.sleep(0.2)
        assert await fetch(client, srv.url) == (200, b"c2")
    assert srv.connections == 2
    assert len(srv.requests) == 2


async def test_stale_pooled_connections_are_skipped_for_a_fresh_one(client):
    """Two idle connections that the server has both closed (an upstream
    restarting, or closing its idle connections at once) are both noticed
    before use: the request goes out once, on a fresh connection."""

    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        await asyncio.sleep(0.05)  # keep both first requests in flight at once: two connections
        writer.write(response(f"c{conn}".encode()))
        await writer.drain()
        writer.close()  # then the server drops each connection while it is idle

    async with Server(handler) as srv:
        first = await asyncio.gather(fetch(client, srv.url), fetch(client, srv.url))
        assert sorted(first) == [(200, b"c1"), (200, b"c2")]
        assert srv.connections == 2
        await asyncio.sleep(0.1)
        assert await fetch(client, srv.url, b"third") == (200, b"c3")
    assert srv.connections == 3
    assert [r.body for r in srv.requests].count(b"third") == 1


async def test_connection_close_response_is_not_reused(client):
    """``Connection: close`` is honoured even when the server leaves the socket open."""
    async with Server(keep_alive(lambda r: response(b"bye", headers=(("Connection", "close"),)))) as srv:
        assert await fetch(client, srv.url) == (200, b"bye")
        assert await fetch(client, srv.url) == (200, b"bye")
    assert srv.connections == 2
    assert [r.conn for r in srv.requests] == [1, 2]


async def test_idle_connection_older_than_keepalive_is_not_reused():
    client = H1Client(keepalive_s=0.05)
    try:
        async with Server(keep_alive(lambda r: response(b"ok"))) as srv:
            assert await fetch(client, srv.url) == (200, b"ok")
            await asyncio.sleep(0.1)
            assert await fetch(client, srv.url) == (200, b"ok")
        assert srv.connections == 2
    finally:
        await client.close()


async def test_max_idle_per_host_caps_the_pool():
    client = H1Client(max_idle_per_host=1)

    async def slow(server, reader, writer, conn):
        while (request := await server.next_request(reader, conn)) is not None:
            await asyncio.sleep(0.03)
            writer.write(response(b"ok"))
            await writer.drain()

    try:
        async with Server(slow) as srv:
            assert await asyncio.gather(fetch(client, srv.url), fetch(client, srv.url)) == [(200, b"ok")] * 2
            assert srv.connections == 2
            assert await asyncio.gather(fetch(client, srv.url), fetch(client, srv.url)) == [(200, b"ok")] * 2
        assert srv.connections == 3  # one of the first two was kept, the other closed
    finally:
        await client.close()


async def test_no_content_response_without_length_keeps_connection(client):
    async with Server(keep_alive(lambda r: b"HTTP/1.1 204 No Content\r\n\r\n")) as srv:
        assert await fetch(client, srv.url) == (204, b"")
        assert await fetch(client, srv.url) == (204, b"")
    assert srv.connections == 1


async def test_interim_1xx_response_is_skipped(client):
    """A 1xx interim response is skipped: the final response that follows is the answer.

    RFC 9110 15.2: "A client MUST be able to parse one or more 1xx responses
    received prior to a final response, even if the client does not expect
    one." Taken as final, the 100 would put the connection back in the pool
    and the late 200 would answer the NEXT request on it.
    """

    async def handler(server, reader, writer, conn):
        while (request := await server.next_request(reader, conn)) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(response(b"answer-" + request.body))
            await writer.drain()

    async with Server(handler) as srv:
        results = [await fetch(client, srv.url, b"1"), await fetch(client, srv.url, b"2")]
        assert results == [(200, b"answer-1"), (200, b"answer-2")]


# --- 5-7. body framings -----------------------------------------------------------


async def test_chunked_body_read_whole(client):
    raw = (CHUNKED_HEAD + chunk(b"hello ") + b"5;ext=1\r\nworld\r\n" + chunk(b"!" * 300)
           + b"0\r\nX-Trailer: t\r\n\r\n")
    async with Server(keep_alive(lambda r: raw)) as srv:
        assert await fetch(client, srv.url) == (200, b"hello world" + b"!" * 300)
        assert await fetch(client, srv.url) == (200, b"hello world" + b"!" * 300)
    assert srv.connections == 1


async def test_line_batches_follow_arrivals(client):
    writes = [
        b"data: a\n\n",
        b"data: b\n\ndata: c\r\n\r\n",
        b"data: hel",  # a line split across two writes
        b"lo\n\n",
        b': keep-alive\n\ndata: {"x": "\xc3\xa9"}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def handler(server, reader, writer, conn):
        while await server.next_request(reader, conn) is not None:
            writer.write(CHUNKED_HEAD)
            for data in writes:
                await writer.drain()
                await asyncio.sleep(0.03)
                writer.write(chunk(data))
            await writer.drain()
            await asyncio.sleep(0.03)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with Server(handler) as srv:
        resp = await client.post(srv.url + "/stream", {}, b"{}", T)
        assert resp.status == 200
        batches = [batch async for batch in resp.line_batches()]
        await resp.close()
        assert batches == [
            ["data: a", ""],
            ["data: b", "", "data: c", ""],
            ["data: hello", ""],
            [": keep-alive", "", 'data: {"x": "é"}', ""],
            ["data: [DONE]", ""],
        ]
        # the stream was read to its end: the connection goes back to the pool
        resp = await client.post(srv.url + "/stream", {}, b"{}", T)
        assert len([batch async for batch in resp.line_batches()]) == 5
        await resp.close()
    assert srv.connections == 1


async def test_line_batches_yield_last_line_without_newline(client):
    async with Server(in_parts(b"HTTP/1.1 200 OK\r\n\r\nfirst\nsec", b"ond")) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        assert [batch async for batch in resp.line_batches()] == [["first"], ["second"]]
        await resp.close()


async def test_response_written_one_byte_at_a_time(client):
    raw = b"HTTP/1.1 201 Created\r\nX-Long-Header-Name: some value\r\nContent-Length: 5\r\n\r\nhello"

    async def handler(server, reader, writer, conn):
        while await server.next_request(reader, conn) is not None:
            for i in range(len(raw)):
                writer.write(raw[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.001)

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        assert resp.status == 201
        assert resp.headers == {"x-long-header-name": "some value", "content-length": "5"}
        assert await resp.read() == b"hello"
        await resp.close()
        assert await fetch(client, srv.url) == (201, b"hello")
    assert srv.connections == 1


async def test_http10_response_is_not_kept_alive(client):
    async with Server(keep_alive(lambda r: b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold")) as srv:
        assert await fetch(client, srv.url) == (200, b"old")
        assert await fetch(client, srv.url) == (200, b"old")
    assert srv.connections == 2


async def test_body_delimited_by_connection_close(client):
    answer = in_parts(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ", b"part two")
    async with Server(answer) as srv:
        assert await fetch(client, srv.url) == (200, b"part one, part two")
        assert await fetch(client, srv.url) == (200, b"part one, part two")
    assert srv.connections == 2


async def test_gzip_and_deflate_bodies_are_decoded(client):
    text = b'{"choices": [' + b'{"text": "hello"},' * 500 + b"{}]}"
    gz = gzip.compress(text)
    deflated = zlib.compress(text)

    def respond(request):
        if request.path == "/gzip":
            return response(gz, headers=(("Content-Encoding", "gzip"),))
        if request.path == "/deflate":
            return response(deflated, headers=(("Content-Encoding", "deflate"),))
        half = len(gz) // 2  # gzip, chunked, split mid-stream
        return (CHUNKED_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
                + chunk(gz[:half]) + chunk(gz[half:]) + b"0\r\n\r\n")

    async with Server(keep_alive(respond)) as srv:
        assert await fetch(client, srv.url + "/gzip") == (200, text)
        assert await fetch(client, srv.url + "/deflate") == (200, text)
        assert await fetch(client, srv.url + "/gzip-chunked") == (200, text)
    assert srv.connections == 1


async def test_corrupt_gzip_body_is_broken(client):
    bad = response(b"not gzip at all", headers=(("Content-Encoding", "gzip"),))
    async with Server(keep_alive(lambda r: bad)) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken):
            await resp.read()
        await resp.close()


# --- 8. timeouts ---------------------------------------------------------------------


async def test_read_times_out_when_body_stalls(client):
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(30)

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"", SHORT)
        assert resp.status == 200
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await resp.read()
        assert 0.1 < time.monotonic() - start < 1.0
        await resp.close()
        # the half-read connection is not reused
        again = await client.post(srv.url, {}, b"", SHORT)  # headers arrive on a new connection
        await again.close()
    assert srv.connections == 2


async def test_post_times_out_when_server_never_answers(client):
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        await asyncio.sleep(30)

    async with Server(handler) as srv:
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await client.post(srv.url, {}, b"{}", SHORT)
        assert 0.1 < time.monotonic() - start < 1.0
        assert len(srv.requests) == 1


async def test_line_batches_time_out_when_stream_stalls(client):
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(CHUNKED_HEAD + chunk(b"data: a\n\n"))
        await writer.drain()
        await asyncio.sleep(30)

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"", SHORT)
        assert await batches_until(resp, UpstreamTimeout) == [["data: a", ""]]
        await resp.close()


# --- 9. unreachable ---------------------------------------------------------------------


async def test_connection_refused_is_unreachable(client):
    with pytest.raises(UpstreamUnreachable):
        await client.post(f"http://127.0.0.1:{free_port()}/v1", {}, b"{}", T)
    with pytest.raises(UpstreamUnreachable):
        await client.get(f"http://127.0.0.1:{free_port()}/health", T)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "ws://127.0.0.1:80/x", "127.0.0.1:8000/v1", "http:///nohost",
                                 "http://127.0.0.1:99999/x"])
async def test_bad_urls_are_unreachable(client, url):
    with pytest.raises(UpstreamUnreachable):
        await client.post(url, {}, b"", T)


@pytest.mark.parametrize("value", ["sk-key\n", "a\r\nx-injected: 1", "v\rw"])
async def test_header_with_a_line_break_is_refused_before_sending(client, value):
    with pytest.raises(UpstreamUnreachable, match="line break"):
        await client.post(f"http://127.0.0.1:{free_port()}/v1", {"authorization": value}, b"{}", T)


# --- 10. size limits -----------------------------------------------------------------------


async def test_content_length_over_limit_is_broken_without_waiting(client):
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")  # the body never comes
        await writer.drain()
        await asyncio.sleep(30)

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        start = time.monotonic()
        with pytest.raises(UpstreamBroken):
            await resp.read(limit=99)
        assert time.monotonic() - start < 0.5  # decided from the header, not after a timeout
        await resp.close()


async def test_body_at_the_limit_is_fine(client):
    async with Server(keep_alive(lambda r: response(b"x" * 100))) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        assert await resp.read(limit=100) == b"x" * 100
        await resp.close()


async def test_chunked_body_over_limit_is_broken(client):
    raw = CHUNKED_HEAD + chunk(b"a" * 8) + chunk(b"b" * 8) + chunk(b"c" * 8) + b"0\r\n\r\n"
    async with Server(keep_alive(lambda r: raw)) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken):
            await resp.read(limit=20)
        await resp.close()
        resp = await client.post(srv.url, {}, b"", T)
        assert await resp.read(limit=24) == b"a" * 8 + b"b" * 8 + b"c" * 8
        await resp.close()


async def test_close_delimited_body_over_limit_is_broken(client):
    async with Server(in_parts(b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * 50, b"y" * 50)) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken):
            await resp.read(limit=60)
        await resp.close()


async def test_limit_applies_to_decoded_gzip_size(client):
    bomb = gzip.compress(b"\0" * 200_000)
    async with Server(keep_alive(lambda r: response(bomb, headers=(("Content-Encoding", "gzip"),)))) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken):
            await resp.read(limit=10_000)
        await resp.close()


# --- 11. broken responses ---------------------------------------------------------------------


async def test_garbage_instead_of_http_is_broken(client):
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(30)  # leaves the socket open: the error must come from parsing

    async with Server(handler) as srv:
        start = time.monotonic()
        with pytest.raises(UpstreamBroken):
            await client.post(srv.url, {}, b"", T)
        assert time.monotonic() - start < 0.5


async def test_connection_dropped_mid_body_is_broken(client):
    async with Server(in_parts(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        assert resp.status == 200
        with pytest.raises(UpstreamBroken):
            await resp.read()
        await resp.close()


async def test_connection_dropped_mid_chunked_stream_is_broken(client):
    async with Server(in_parts(CHUNKED_HEAD + chunk(b"data: a\n\n") + b"40\r\ndata: tru")) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        assert await batches_until(resp, UpstreamBroken) == [["data: a", ""]]
        await resp.close()


async def test_mixed_case_chunked_stream_dropped_is_broken(client):
    """``Transfer-Encoding: Chunked`` is chunked too (coding names are case-insensitive,
    RFC 9112 7): a stream cut mid-chunk raises instead of passing for a body
    that ran to the connection close."""

    answer = in_parts(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n" + chunk(b"part") + b"40\r\ncut")
    async with Server(answer) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken):
            await resp.read()
        await resp.close()


async def test_close_delimited_body_cut_by_reset_is_broken(client):
    """A read-until-close body cut by a TCP reset is broken, not complete: only an
    orderly close (FIN) ends a body with neither Content-Length nor chunked framing."""

    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.03)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken):
            await resp.read()
        await resp.close()


async def test_data_sent_before_the_request_is_broken(client):
    """A non-HTTP service that talks first (a banner on connect)."""

    async def handler(server, reader, writer, conn):
        writer.write(b"220 smtp.example.com ESMTP ready\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async with Server(handler) as srv:
        start = time.monotonic()
        with pytest.raises(UpstreamBroken):
            await client.post(srv.url, {}, b"", T)
        assert time.monotonic() - start < 0.5


async def test_connection_closed_before_response_is_broken_and_not_retried(client):
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)  # read it, answer nothing, close

    async with Server(handler) as srv:
        with pytest.raises(UpstreamBroken):
            await client.post(srv.url, {}, b"", T)
    assert srv.connections == 1  # a fresh connection is never retried: the request may have been acted on


async def test_truncated_headers_are_broken(client):
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await asyncio.sleep(0.03)

    async with Server(handler) as srv:
        with pytest.raises(UpstreamBroken):
            await client.post(srv.url, {}, b"", T)


# --- 12. closing a response early ----------------------------------------------------------------


async def test_closing_unread_response_drops_the_connection(client):
    async def handler(server, reader, writer, conn):
        while await server.next_request(reader, conn) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n0123456789")
            await writer.drain()
            await asyncio.sleep(0.03)  # the rest of the body comes later
            writer.write(b"abcdefghij")
            await writer.drain()

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        await resp.close()  # body not read (and not yet all received)
        await resp.close()  # twice is harmless
        assert await fetch(client, srv.url) == (200, b"0123456789abcdefghij")
        assert await fetch(client, srv.url) == (200, b"0123456789abcdefghij")
    assert srv.connections == 2  # the unread one was dropped; the read one was reused
    assert [r.conn for r in srv.requests] == [1, 2, 2]


async def test_unread_body_already_received_whole_is_discarded_on_reuse(client):
    """A response that arrived whole may go back to the pool unread; its bytes must not leak."""
    async with Server(keep_alive(lambda r: response(b"body-of-" + r.path.encode()))) as srv:
        resp = await client.post(srv.url + "/first", {}, b"", T)
        await asyncio.sleep(0.05)  # the whole response is in
        await resp.close()
        assert await fetch(client, srv.url + "/second") == (200, b"body-of-/second")
    assert srv.connections == 1


async def test_closing_partly_read_stream_drops_the_connection(client):
    async def handler(server, reader, writer, conn):
        while await server.next_request(reader, conn) is not None:
            writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
            await writer.drain()
            await asyncio.sleep(0.03)
            writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")
            await writer.drain()

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        async for batch in resp.line_batches():
            assert batch == ["data: 1", ""]
            break
        await resp.close()
        resp = await client.post(srv.url, {}, b"", T)
        assert await resp.read() == b"data: 1\n\ndata: 2\n\n"
        await resp.close()
    assert srv.connections == 2


# --- 13. get -------------------------------------------------------------------------------------


async def test_get_returns_status_and_body(client):
    async with Server(keep_alive(lambda r: response(b"ready" if r.path == "/health" else b"?",
                                                    "503 Service Unavailable"))) as srv:
        assert await client.get(srv.url + "/health", T) == (503, b"ready")
        assert await client.get(srv.url + "/health", T) == (503, b"ready")
    assert srv.requests[0].line == "GET /health HTTP/1.1"
    assert srv.requests[0].headers["host"] == f"127.0.0.1:{srv.port}"
    assert srv.connections == 1


# --- 14. concurrency -------------------------------------------------------------------------------


async def test_many_concurrent_requests_get_their_own_bodies(client):
    rng = random.Random(7)

    async def handler(server, reader, writer, conn):
        while (request := await server.next_request(reader, conn)) is not None:
            await asyncio.sleep(rng.random() * 0.01)  # finish out of order
            echo = request.path.encode() + b"|" + request.body
            if request.body[:1] in b"02468":
                writer.write(CHUNKED_HEAD + chunk(echo[:3]) + chunk(echo[3:]) + b"0\r\n\r\n")
            else:
                writer.write(response(echo))
            await writer.drain()

    async def one(i: int) -> tuple[int, bytes]:
        return await fetch(client, f"{srv.url}/item/{i}", str(i).encode() * (i + 1))

    async with Server(handler) as srv:
        for _ in range(2):
            results = await asyncio.gather(*(one(i) for i in range(50)))
            for i, (status, body) in enumerate(results):
                assert status == 200
                assert body == f"/item/{i}|".encode() + str(i).encode() * (i + 1)
    assert len(srv.requests) == 100
    assert srv.connections == 50  # 50 in flight at once, then all 50 reused by the second round


# --- 15. default request headers ---------------------------------------------------------------------


async def test_accept_encoding_and_user_agent_are_sent_unless_set(client):
    from gateway.upstream.h1 import USER_AGENT

    async with Server(keep_alive(lambda r: response(b"ok"))) as srv:
        assert await fetch(client, srv.url) == (200, b"ok")
        assert await fetch(client, srv.url, headers={"User-Agent": "mine/1", "ACCEPT-ENCODING": "identity"}) \
            == (200, b"ok")
    first, second = srv.requests
    assert first.headers["accept-encoding"] == "gzip, deflate"
    assert first.headers["user-agent"] == USER_AGENT and USER_AGENT.startswith("llm-gateway/")
    assert second.headers["user-agent"] == "mine/1"
    assert second.headers["accept-encoding"] == "identity"
    assert [n.lower() for n in second.names].count("user-agent") == 1
    assert [n.lower() for n in second.names].count("accept-encoding") == 1
