"""TLS per provider: a private CA via ``ca_file``, mutual TLS, and servers that skip close_notify."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest

from gateway.upstream.base import ConnectOptions, UpstreamError, UpstreamUnreachable
from gateway.upstream.h1 import H1Client
from tests.unit.test_h1 import keep_alive, response
from tests.upstream.servers import TLSServer

T = 3.0


@pytest.fixture
async def client():
    c = H1Client(environ={})
    try:
        yield c
    finally:
        await c.close()


async def fetch(client, url, connect, body=b"{}"):
    resp = await client.post(url, {}, body, T, connect)
    try:
        return resp.status, await resp.read()
    finally:
        await resp.close()


async def test_ca_file_trusts_a_private_ca(client, certs):
    async with TLSServer(keep_alive(lambda r: response(b"secure")), certs.server_context()) as srv:
        trusted = ConnectOptions(ca_file=certs.ca_file)
        assert await fetch(client, srv.url + "/v1", trusted) == (200, b"secure")
        assert await fetch(client, srv.url + "/v1", ConnectOptions(ca_file=certs.ca_file)) == (200, b"secure")
        with pytest.raises(UpstreamUnreachable, match="SSLCertVerificationError"):
            await fetch(client, srv.url + "/v1", ConnectOptions())  # the system store does not know the CA
    assert srv.connections == 1  # equal options share one pool (a failed handshake never reaches the handler)
    assert len(client._tls._contexts) == 2  # one context per distinct option set


async def test_pools_are_keyed_by_tls_options(client, certs):
    async with TLSServer(keep_alive(lambda r: response(b"ok")), certs.server_context()) as srv:
        a = ConnectOptions(ca_file=certs.ca_file)
        b = ConnectOptions(ca_file=certs.ca_file, client_cert=certs.client_cert, client_key=certs.client_key)
        for _ in range(2):
            assert await fetch(client, srv.url, a) == (200, b"ok")
            assert await fetch(client, srv.url, b) == (200, b"ok")
    assert srv.connections == 2


async def test_mutual_tls_with_a_client_certificate(client, certs):
    async with TLSServer(keep_alive(lambda r: response(b"hello client")),
                         certs.server_context(require_client_cert=True)) as srv:
        mtls = ConnectOptions(ca_file=certs.ca_file, client_cert=certs.client_cert, client_key=certs.client_key)
        assert await fetch(client, srv.url, mtls) == (200, b"hello client")
        with pytest.raises(UpstreamError):  # no certificate: the server refuses (during or after the handshake)
            await fetch(client, srv.url, ConnectOptions(ca_file=certs.ca_file))


async def test_unreadable_tls_files_are_unreachable_not_raw(client, tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(UpstreamUnreachable, match="CA file"):
        await fetch(client, "https://127.0.0.1:1/", ConnectOptions(ca_file=missing))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(UpstreamUnreachable, match="client certificate"):
        await fetch(client, "https://127.0.0.1:1/", ConnectOptions(client_cert=str(tmp_path / "junk.pem")))


def serve_without_close_notify(context: ssl.SSLContext, answers: list[bytes]) -> tuple[int, threading.Thread]:
    """A blocking TLS server: each connection reads one request, answers, and closes the socket
    without a TLS close_notify (Python's ``SSLSocket.close`` never sends one)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            for answer in answers:
                raw, _ = listener.accept()
                with context.wrap_socket(raw, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += tls.recv(65536)
                    tls.sendall(answer)
                    # the with-block closes it: a TCP FIN with no close_notify before it

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


async def test_close_without_close_notify_after_a_complete_body(client, certs):
    answers = [response(b"complete-1"), response(b"complete-2")]
    port, thread = serve_without_close_notify(certs.server_context(), answers)
    trusted = ConnectOptions(ca_file=certs.ca_file)
    url = f"https://127.0.0.1:{port}/"
    assert await fetch(client, url, trusted) == (200, b"complete-1")
    await asyncio.sleep(0.05)
    assert await fetch(client, url, trusted) == (200, b"complete-2")  # a new connection: the old one ended
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()


async def test_close_without_close_notify_mid_body_is_broken(client, certs):
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    port, thread = serve_without_close_notify(certs.server_context(), [cut])
    with pytest.raises(UpstreamError):
        await fetch(client, f"https://127.0.0.1:{port}/", ConnectOptions(ca_file=certs.ca_file))
    await asyncio.to_thread(thread.join, 5)
