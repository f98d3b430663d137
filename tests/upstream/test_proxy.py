"""Proxies: CONNECT tunnels to a TLS origin, absolute-form http, credentials, the environment, NO_PROXY."""

from __future__ import annotations

import base64
import os

import pytest

from gateway.upstream.base import DIRECT, ConnectOptions, UpstreamUnreachable
from gateway.upstream.h1 import H1Client
from gateway.upstream.proxy import NoProxy, ProxyEnvironment, parse_proxy
from tests.unit.test_h1 import Server, free_port, keep_alive, response
from tests.upstream.servers import Proxy, TLSServer, probe

T = 3.0


async def fetch(client, url, connect=DIRECT, body=b"{}"):
    resp = await client.post(url, {}, body, T, connect)
    try:
        return resp.status, await resp.read()
    finally:
        await resp.close()


def echo(request):
    return response(f"{request.method} {request.path} {request.body.decode()}".encode())


# --- CONNECT to a TLS origin --------------------------------------------------------------------


async def test_connect_tunnel_to_a_tls_origin_trusted_by_ca_file(certs):
    client = H1Client(environ={})
    try:
        async with TLSServer(keep_alive(echo), certs.server_context()) as origin, Proxy() as proxy:
            via = ConnectOptions(proxy=proxy.url, ca_file=certs.ca_file)
            url = f"https://localhost:{origin.port}/v1/chat"  # SNI and the certificate check use the origin's name
            assert await fetch(client, url, via, b"1") == (200, b"POST /v1/chat 1")
            assert await fetch(client, url, via, b"2") == (200, b"POST /v1/chat 2")
        assert proxy.seen == [("CONNECT", f"localhost:{origin.port}", None)]  # one tunnel, reused
        assert origin.requests[0].headers["host"] == f"localhost:{origin.port}"
        assert "proxy-authorization" not in origin.requests[0].headers
    finally:
        await client.close()


async def test_connect_with_basic_auth_percent_decoded(certs):
    client = H1Client(environ={})
    try:
        async with TLSServer(keep_alive(echo), certs.server_context()) as origin, \
                Proxy(user="us@er", password="p:ss/w%rd") as proxy:
            via = ConnectOptions(proxy=proxy.url_with("us%40er:p%3Ass%2Fw%25rd"), ca_file=certs.ca_file)
            assert await fetch(client, f"https://127.0.0.1:{origin.port}/x", via) == (200, b"POST /x {}")
        expected = "Basic " + base64.b64encode(b"us@er:p:ss/w%rd").decode()
        assert proxy.seen == [("CONNECT", f"127.0.0.1:{origin.port}", expected)]
    finally:
        await client.close()


async def test_wrong_proxy_password_is_unreachable_and_not_echoed(certs):
    client = H1Client(environ={})
    try:
        async with TLSServer(keep_alive(echo), certs.server_context()) as origin, \
                Proxy(user="alice", password="right") as proxy:
            via = ConnectOptions(proxy=proxy.url_with("alice:wrong-s3cret"), ca_file=certs.ca_file)
            with pytest.raises(UpstreamUnreachable, match="407") as info:
                await fetch(client, f"https://127.0.0.1:{origin.port}/", via)
            text = str(info.value) + repr(info.value)
            assert "wrong-s3cret" not in text and "alice" not in text
            assert base64.b64encode(b"alice:wrong-s3cret").decode() not in text
        assert origin.requests == []
    finally:
        await client.close()


async def test_unreachable_proxy_error_has_no_credentials():
    client = H1Client(environ={})
    try:
        via = ConnectOptions(proxy=f"http://bob:hunter2@127.0.0.1:{free_port()}")
        for url in ("https://example.invalid/", "http://example.invalid/"):
            with pytest.raises(UpstreamUnreachable) as info:
                await fetch(client, url, via)
            assert "hunter2" not in str(info.value) and "bob" not in str(info.value)
    finally:
        await client.close()


# --- the environment ------------------------------------------------------------------------------


async def test_https_proxy_from_the_environment_lower_case_wins(certs):
    async with TLSServer(keep_alive(echo), certs.server_context()) as origin, Proxy() as proxy:
        client = H1Client(environ={"https_proxy": proxy.url, "HTTPS_PROXY": f"http://127.0.0.1:{free_port()}"})
        try:
            trusted = ConnectOptions(ca_file=certs.ca_file)
            assert await fetch(client, f"https://127.0.0.1:{origin.port}/env", trusted) == (200, b"POST /env {}")
            # the provider's proxy = "" turns the environment's proxy off
            direct = ConnectOptions(proxy="", ca_file=certs.ca_file)
            assert await fetch(client, f"https://127.0.0.1:{origin.port}/direct", direct) == (200, b"POST /direct {}")
        finally:
            await client.close()
    assert proxy.seen == [("CONNECT", f"127.0.0.1:{origin.port}", None)]


async def test_environment_is_read_once_at_construction(monkeypatch):
    async with Server(keep_alive(echo)) as origin:
        monkeypatch.delenv("http_proxy", raising=False)
        monkeypatch.delenv("all_proxy", raising=False)
        monkeypatch.delenv("ALL_PROXY", raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        client = H1Client()
        monkeypatch.delenv("HTTP_PROXY")
        try:
            with pytest.raises(UpstreamUnreachable, match="via proxy"):
                await fetch(client, origin.url + "/x")
        finally:
            await client.close()


async def test_ssl_cert_file_in_a_subprocess_environment(certs):
    """No ca_file option: the subprocess trusts the private CA through ``SSL_CERT_FILE``, via a proxy."""
    async with TLSServer(keep_alive(echo), certs.server_context()) as origin, Proxy() as proxy:
        env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "", "SSL_CERT_FILE": certs.ca_file}
        report = await probe("read", f"https://localhost:{origin.port}/", env=env)
        assert report["outcome"] == "ok" and report["size"] == len(b"POST / {}"), report
        env["SSL_CERT_FILE"] = os.devnull  # and without it the origin is not trusted
        report = await probe("read", f"https://localhost:{origin.port}/", env=env)
        assert report["outcome"].startswith("UpstreamUnreachable: via proxy: SSLCertVerificationError"), report
    assert [seen[0] for seen in proxy.seen] == ["CONNECT", "CONNECT"]


# --- plain http through the proxy -----------------------------------------------------------------


async def test_plain_http_goes_in_absolute_form_with_credentials():
    async with Server(keep_alive(echo)) as origin, Proxy(user="u", password="p w") as proxy:
        client = H1Client(environ={"http_proxy": proxy.url_with("u:p%20w")})
        try:
            url = f"http://127.0.0.1:{origin.port}/v1/x?q=1"
            absolute = f"POST http://127.0.0.1:{origin.port}/v1/x?q=1 {{}}".encode()
            assert await fetch(client, url) == (200, absolute)
            assert await fetch(client, url) == (200, absolute)
        finally:
            await client.close()
    expected = "Basic " + base64.b64encode(b"u:p w").decode()
    assert proxy.seen == [("POST", f"http://127.0.0.1:{origin.port}/v1/x?q=1", expected)]
    assert proxy.connections == 1
    assert origin.requests[0].headers["host"] == f"127.0.0.1:{origin.port}"


async def test_plain_http_proxy_answering_407_is_unreachable():
    client = H1Client(environ={})
    try:
        async with Proxy(user="u", password="right") as proxy:
            via = ConnectOptions(proxy=proxy.url_with("u:wrong"))
            with pytest.raises(UpstreamUnreachable, match="407"):
                await fetch(client, "http://origin.example/", via)
    finally:
        await client.close()


async def test_no_proxy_bypass_the_proxy_sees_nothing(certs):
    async with Server(keep_alive(echo)) as origin, Proxy() as proxy:
        env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": "example.com, 127.0.0.0/8"}
        client = H1Client(environ=env)
        try:
            assert await fetch(client, origin.url + "/direct") == (200, b"POST /direct {}")
        finally:
            await client.close()
    assert proxy.seen == [] and proxy.connections == 0


# --- the rules, without sockets --------------------------------------------------------------------


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypass"), [
    ("*", "anything.example", 443, True),
    ("example.com", "example.com", 443, True),
    ("example.com", "api.example.com", 443, True),
    (".example.com", "example.com", 443, True),
    (".example.com", "api.example.com", 443, True),
    ("*.example.com", "api.example.com", 443, True),
    ("example.com", "badexample.com", 443, False),
    ("example.com", "example.com.evil.net", 443, False),
    ("EXAMPLE.com", "Api.Example.COM", 443, True),
    ("example.com:8443", "example.com", 8443, True),
    ("example.com:8443", "example.com", 443, False),
    ("10.0.0.0/8", "10.1.2.3", 80, True),
    ("10.0.0.0/8", "11.1.2.3", 80, False),
    ("10.0.0.0/8", "ten.example", 80, False),
    ("192.168.1.5", "192.168.1.5", 80, True),
    ("192.168.1.5:8080", "192.168.1.5", 80, False),
    ("::1", "::1", 80, True),
    ("[::1]:8080", "::1", 8080, True),
    ("fd00::/8", "fd12::1", 80, True),
    ("fd00::/8", "10.0.0.1", 80, False),
    ("localhost,  internal.corp ,10.0.0.0/8", "internal.corp", 80, True),
    ("", "example.com", 80, False),
])
def test_no_proxy_matching(no_proxy, host, port, bypass):
    assert NoProxy(no_proxy).matches(host, port) is bypass


def test_proxy_selection_by_scheme_and_case():
    env = ProxyEnvironment({"HTTP_PROXY": "http://upper:1", "http_proxy": "http://lower:2",
                            "ALL_PROXY": "http://every:3", "no_proxy": "skip.me"})
    assert env.select("http", "a.example", 80).key == ("lower", 2, None)
    assert env.select("https", "a.example", 443).key == ("every", 3, None)  # all_proxy fills in
    assert env.select("https", "x.skip.me", 443) is None
    assert ProxyEnvironment({}).select("https", "a.example", 443) is None
    assert ProxyEnvironment({"https_proxy": "", "HTTPS_PROXY": "http://upper:1"}).select("https", "a", 443) is None


def test_parse_proxy():
    proxy = parse_proxy("proxy.corp:3128")
    assert (proxy.host, proxy.port, proxy.authorization) == ("proxy.corp", 3128, None)
    proxy = parse_proxy("http://a%3Ab:c%40d@10.0.0.1")
    assert (proxy.host, proxy.port) == ("10.0.0.1", 80)
    assert proxy.authorization == "Basic " + base64.b64encode(b"a:b:c@d").decode()
    assert "c@d" not in repr(proxy) and "Basic" not in repr(proxy)
    for bad in ("socks5://h:1", "https://h:1", "http://h:99999", "http://"):
        with pytest.raises(UpstreamUnreachable):
            parse_proxy(bad)
