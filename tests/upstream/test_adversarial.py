"""The HTTP/1.1 client against hostile and broken upstreams, over real sockets.

Each case ends in a clean ``UpstreamError`` (or the right answer) within its
timeout, with bounded memory, and nothing from one response reaches another
request. The memory cases run the client in a subprocess
(``tests/upstream/probe.py``) and read its peak RSS.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib

import pytest

from gateway.upstream.base import UpstreamBroken, UpstreamTimeout
from gateway.upstream.h1 import MAX_HEAD_BYTES, MAX_HEADERS, MAX_LINE_BYTES, H1Client
from tests.unit.test_h1 import CHUNKED_HEAD, Server, chunk, fetch, keep_alive, response
from tests.upstream.servers import probe

T = 2.0


@pytest.fixture
async def client():
    c = H1Client()
    try:
        yield c
    finally:
        await c.close()


def answer_then(extra: bytes):
    """Each request is answered with its own response, and the first one also with ``extra`` glued on."""

    async def handler(server, reader, writer, conn):
        while (request := await server.next_request(reader, conn)) is not None:
            data = response(b"answer-" + request.body)
            if len(server.requests) == 1:
                data += extra
            writer.write(data)
            await writer.drain()

    return handler


# --- 1. nothing after a response's end ------------------------------------------------------


async def test_full_second_response_in_the_same_write_is_never_served(client):
    smuggled = response(b"SMUGGLED", headers=(("X-Smuggled", "1"),))
    async with Server(answer_then(smuggled)) as srv:
        resp = await client.post(srv.url, {}, b"1", T)
        assert resp.status == 200 and "x-smuggled" not in resp.headers
        assert await resp.read() == b"answer-1"
        await resp.close()
        assert await fetch(client, srv.url, b"2") == (200, b"answer-2")
        assert await fetch(client, srv.url, b"3") == (200, b"answer-3")
    assert srv.connections == 2  # the connection that carried the extra response was dropped


async def test_partial_second_response_in_the_same_write_is_dropped(client):
    async with Server(answer_then(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nSMUG")) as srv:
        assert await fetch(client, srv.url, b"1") == (200, b"answer-1")
        assert await fetch(client, srv.url, b"2") == (200, b"answer-2")
    assert srv.connections == 2


async def test_extra_bytes_arriving_after_the_response_drop_the_connection(client):
    """The extra bytes come in a later packet, while the caller still holds the response."""

    async def handler(server, reader, writer, conn):
        while (request := await server.next_request(reader, conn)) is not None:
            writer.write(response(b"answer-" + request.body))
            await writer.drain()
            if conn == 1:
                await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\nSMUG")
                await writer.drain()

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"1", T)
        assert await resp.read() == b"answer-1"
        await asyncio.sleep(0.15)
        await resp.close()
        assert await fetch(client, srv.url, b"2") == (200, b"answer-2")
    assert srv.connections == 2


async def test_response_sent_while_idle_in_the_pool_is_not_read(client):
    """An unsolicited (partial) response on an idle connection must not answer the next request."""

    async def handler(server, reader, writer, conn):
        while (request := await server.next_request(reader, conn)) is not None:
            writer.write(response(b"answer-" + request.body))
            await writer.drain()
            if conn == 1:
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nEVIL")
                await writer.drain()

    async with Server(handler) as srv:
        assert await fetch(client, srv.url, b"1") == (200, b"answer-1")
        await asyncio.sleep(0.1)
        assert await fetch(client, srv.url, b"2") == (200, b"answer-2")
    assert srv.connections == 2
    assert [r.body for r in srv.requests] == [b"1", b"2"]


async def test_data_waiting_unread_on_an_idle_socket_drops_it(client):
    """The stray bytes are in the socket, not yet seen by the event loop, when the connection is picked."""

    async def handler(server, reader, writer, conn):
        while (request := await server.next_request(reader, conn)) is not None:
            writer.write(response(b"answer-" + request.body))
            await writer.drain()
            if conn == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
                await writer.drain()

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"1", T)
        assert resp.status == 200
        body = await resp.read()
        await resp.close()
        assert body == b"answer-1"
        assert await fetch(client, srv.url, b"2") == (200, b"answer-2")


# --- 2. bounded decompression -----------------------------------------------------------------


def gzip_of_zeros(megabytes: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join([*(z.compress(block) for _ in range(megabytes)), z.flush()])


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_of_zeros(512)  # 512 MiB of zeros in about 500 KB


@pytest.mark.parametrize("pause_s", [0.0, 0.3])
async def test_gzip_bomb_fails_with_bounded_memory(bomb, pause_s):
    """Read as it arrives, and read once all of it has arrived (a slow reader)."""
    async with Server(keep_alive(lambda r: response(bomb, headers=(("Content-Encoding", "gzip"),)))) as srv:
        report = await probe("read", srv.url, pause_s=pause_s)
    assert len(bomb) < 1_000_000
    assert report["outcome"].startswith("UpstreamBroken: upstream body too large"), report
    assert report["rss_rise_mib"] < 120, report  # the 32 MiB body limit, inflated once, and its copy
    assert report["elapsed"] < 5, report


async def test_gzip_bomb_in_a_stream_fails_on_the_line_cap_with_bounded_memory(bomb):
    raw = CHUNKED_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n") + chunk(bomb) + b"0\r\n\r\n"
    async with Server(keep_alive(lambda r: raw)) as srv:
        report = await probe("lines", srv.url, pause_s=0.3)
    assert report["outcome"].startswith("UpstreamBroken: upstream line too long"), report
    assert report["rss_rise_mib"] < 50, report


async def test_two_member_gzip_decodes_whole(client):
    first, second = b'{"part": 1, ' * 100, b'"part": 2}' * 100
    body = gzip.compress(first) + gzip.compress(second)
    streamed = CHUNKED_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
    streamed += chunk(body[:30]) + chunk(body[30:]) + b"0\r\n\r\n"

    async with Server(keep_alive(lambda r: response(body, headers=(("Content-Encoding", "gzip"),))
                                 if r.path == "/" else streamed)) as srv:
        assert await fetch(client, srv.url) == (200, first + second)
        resp = await client.post(srv.url + "/stream", {}, b"", T)
        lines = [line async for batch in resp.line_batches() for line in batch]
        await resp.close()
        assert "".join(lines) == (first + second).decode()


@pytest.mark.parametrize("cut", [4, 8, 100])
async def test_truncated_gzip_is_broken(client, cut):
    whole = gzip.compress(bytes(range(256)) * 2 + b"hello world, " * 500)
    assert len(whole) > 300
    body = whole[:-cut]  # the stream ends before its trailer (CRC and size), or mid-data
    async with Server(keep_alive(lambda r: response(body, headers=(("Content-Encoding", "gzip"),)))) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken, match="truncated"):
            await resp.read()
        await resp.close()
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken, match="truncated"):
            async for _ in resp.line_batches():
                pass
        await resp.close()


async def test_raw_deflate_is_decoded(client):
    text = b"raw deflate, no zlib wrapper " * 50
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = z.compress(text) + z.flush()
    async with Server(keep_alive(lambda r: response(raw, headers=(("Content-Encoding", "deflate"),)))) as srv:
        assert await fetch(client, srv.url) == (200, text)


async def test_gzip_at_exactly_the_limit_is_fine_and_one_over_is_not(client):
    body = gzip.compress(b"a" * 10_000)
    async with Server(keep_alive(lambda r: response(body, headers=(("Content-Encoding", "gzip"),)))) as srv:
        resp = await client.post(srv.url, {}, b"", T)
        assert await resp.read(limit=10_000) == b"a" * 10_000
        await resp.close()
        resp = await client.post(srv.url, {}, b"", T)
        with pytest.raises(UpstreamBroken, match="too large"):
            await resp.read(limit=9_999)
        await resp.close()


# --- 3. the SSE line cap ------------------------------------------------------------------------


async def test_forty_megabyte_line_fails_fast_with_bounded_memory():
    block = b"x" * (1 << 20)

    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(CHUNKED_HEAD)
        for _ in range(40):
            writer.write(chunk(block))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with Server(handler) as srv:
        report = await probe("lines", srv.url)
    assert report["outcome"] == "UpstreamBroken: upstream line too long", report
    assert report["elapsed"] < 2, report
    assert report["rss_rise_mib"] < 50, report


async def test_line_just_under_the_cap_passes_and_long_complete_line_fails(client):
    ok_line = b"y" * (MAX_LINE_BYTES - 1)
    long_line = b"z" * (MAX_LINE_BYTES + 10)

    def respond(request):
        line = ok_line if request.path == "/ok" else long_line
        return CHUNKED_HEAD + b"".join(chunk(line[i:i + 65536]) for i in range(0, len(line), 65536)) \
            + chunk(b"\n\n") + b"0\r\n\r\n"

    async with Server(keep_alive(respond)) as srv:
        resp = await client.post(srv.url + "/ok", {}, b"", T)
        lines = [line async for batch in resp.line_batches() for line in batch]
        await resp.close()
        assert lines == [ok_line.decode(), ""]
        resp = await client.post(srv.url + "/long", {}, b"", T)
        with pytest.raises(UpstreamBroken, match="line too long"):
            async for _ in resp.line_batches():
                pass
        await resp.close()


# --- 4. response head caps --------------------------------------------------------------------------


async def test_forty_thousand_duplicate_headers_fail_fast(client):
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Dup: value\r\n" * 40_000 + b"Content-Length: 2\r\n\r\nok"
    async with Server(keep_alive(lambda r: head)) as srv:
        start = time.monotonic()
        with pytest.raises(UpstreamBroken, match=r"too many response headers|head too large"):
            await client.post(srv.url, {}, b"", T)
        assert time.monotonic() - start < 0.5


async def test_header_count_cap(client):
    def respond(request):
        n = int(request.path[1:])
        return (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(n - 1))
                + b"Content-Length: 2\r\n\r\nok")

    async with Server(keep_alive(respond)) as srv:
        assert await fetch(client, f"{srv.url}/{MAX_HEADERS}") == (200, b"ok")
        with pytest.raises(UpstreamBroken, match="too many response headers"):
            await client.post(f"{srv.url}/{MAX_HEADERS + 1}", {}, b"", T)


async def test_oversized_header_fails(client):
    """One 70 KiB header in a head that arrives whole, and a head that never ends."""
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (MAX_HEAD_BYTES + 6000) + b"\r\nContent-Length: 2\r\n\r\nok"
    endless = b"HTTP/1.1 200 OK\r\nX-Endless: " + b"e" * (4 * MAX_HEAD_BYTES)

    async def handler(server, reader, writer, conn):
        request = await server.next_request(reader, conn)
        writer.write(big if request.path == "/big" else endless)
        await writer.drain()
        await asyncio.sleep(30)

    async with Server(handler) as srv:
        for path in ("/big", "/endless"):
            start = time.monotonic()
            with pytest.raises(UpstreamBroken, match="head too large"):
                await client.post(srv.url + path, {}, b"", T)
            assert time.monotonic() - start < 0.5


# --- 6. deadlines ------------------------------------------------------------------------------------


async def test_head_trickled_byte_by_byte_times_out_at_timeout_s(client):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        for i in range(len(head)):
            writer.write(head[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.5)

    async with Server(handler) as srv:
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await client.post(srv.url, {}, b"", 1.2)
        assert 1.1 < time.monotonic() - start < 1.6


async def test_body_keeps_the_per_read_gap_timeout(client):
    """A body that keeps coming, each piece within the gap, outlives ``timeout_s`` in total."""

    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(CHUNKED_HEAD)
        for i in range(8):
            writer.write(chunk(b"data: %d\n\n" % i))
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")

    async with Server(handler) as srv:
        resp = await client.post(srv.url, {}, b"", 0.3)
        lines = [line async for batch in resp.line_batches() for line in batch if line]
        await resp.close()
    assert lines == [f"data: {i}" for i in range(8)]


async def test_max_stream_s_bounds_a_whole_stream():
    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(CHUNKED_HEAD)
        while True:
            writer.write(chunk(b"data: tick\n\n"))
            await writer.drain()
            await asyncio.sleep(0.05)

    client = H1Client(max_stream_s=0.5)
    try:
        async with Server(handler) as srv:
            resp = await client.post(srv.url, {}, b"", T)
            start = time.monotonic()
            with pytest.raises(UpstreamTimeout, match="max_stream_s"):
                async for _ in resp.line_batches():
                    pass
            assert time.monotonic() - start < 0.8
            await resp.close()
    finally:
        await client.close()


# --- 5. the per-host connection cap -------------------------------------------------------------------


async def test_connection_cap_makes_requests_wait_for_a_free_connection():
    open_now = peak = 0

    async def handler(server, reader, writer, conn):
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            while (request := await server.next_request(reader, conn)) is not None:
                await asyncio.sleep(0.05)
                writer.write(response(request.body))
                await writer.drain()
        finally:
            open_now -= 1

    client = H1Client(max_connections_per_host=2)
    try:
        async with Server(handler) as srv:
            results = await asyncio.gather(*(fetch(client, srv.url, b"%d" % i) for i in range(8)))
            assert results == [(200, b"%d" % i) for i in range(8)]
            assert srv.connections == 2 and peak == 2
            # all connections busy longer than the timeout: the waiter times out
            slow = [asyncio.create_task(fetch(client, srv.url, b"s")) for _ in range(2)]
            await asyncio.sleep(0.01)
            with pytest.raises(UpstreamTimeout, match="no free connection"):
                await client.post(srv.url, {}, b"late", 0.02)
            assert await asyncio.gather(*slow) == [(200, b"s")] * 2
    finally:
        await client.close()


async def test_a_failed_connect_frees_its_place():
    client = H1Client(max_connections_per_host=1)
    try:
        from tests.unit.test_h1 import free_port

        url = f"http://127.0.0.1:{free_port()}"
        for _ in range(3):
            with pytest.raises(Exception) as info:
                await client.post(url, {}, b"", 0.5)
            assert type(info.value).__name__ == "UpstreamUnreachable"
    finally:
        await client.close()


# --- 7. no replay -------------------------------------------------------------------------------------


async def test_a_fully_written_request_is_never_sent_again(client):
    """The reused connection takes the request, then the server closes without answering."""

    async def handler(server, reader, writer, conn):
        await server.next_request(reader, conn)
        writer.write(response(b"first"))
        await writer.drain()
        await server.next_request(reader, conn)  # read whole, never answered

    async with Server(handler) as srv:
        assert await fetch(client, srv.url, b"one") == (200, b"first")
        with pytest.raises(UpstreamBroken):
            await client.post(srv.url, {}, b"charge-me-once", T)
        await asyncio.sleep(0.05)
    assert [r.body for r in srv.requests].count(b"charge-me-once") == 1
    assert srv.connections == 1


async def test_idle_connections_closed_by_the_server_are_skipped_not_replayed(client):
    """Both pooled connections were closed by the server while idle: the request goes out once, fresh."""

    async def handler(server, reader, writer, conn):
        request = await server.next_request(reader, conn)
        await asyncio.sleep(0.05)
        writer.write(response(b"c%d-" % conn + request.body))
        await writer.drain()
        writer.close()  # an idle close, unannounced

    async with Server(handler) as srv:
        first = await asyncio.gather(fetch(client, srv.url, b"a"), fetch(client, srv.url, b"b"))
        assert sorted(body[3:] for _, body in first) == [b"a", b"b"]
        assert await fetch(client, srv.url, b"third") == (200, b"c3-third")
    assert [r.body for r in srv.requests].count(b"third") == 1
