"""Outbound proxies: which one a request takes, and the CONNECT tunnel for HTTPS through it.

The environment is read as curl, httpx and aiohttp read it: ``https_proxy``
for https URLs, ``http_proxy`` for http ones, ``all_proxy`` for either, each
also in upper case with the lower-case name winning, and ``no_proxy`` for the
hosts that bypass them. A provider's own ``proxy`` setting overrides all of
it. Only ``http://`` proxies are spoken; credentials in the proxy URL become
a ``Proxy-Authorization: Basic`` header and never appear in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from collections.abc import Mapping
from typing import cast
from urllib.parse import unquote, urlsplit

from gateway.upstream.base import UpstreamUnreachable

#: The longest CONNECT reply head we read before giving up on the proxy.
MAX_PROXY_REPLY = 16 * 1024


class Proxy:
    """One proxy: where it listens and the credentials it wants (never in ``repr``)."""

    __slots__ = ("authorization", "host", "key", "port")

    def __init__(self, host: str, port: int, authorization: str | None) -> None:
        self.host = host
        self.port = port
        #: The ``Proxy-Authorization`` value, or None.
        self.authorization = authorization
        #: What distinguishes this proxy in a pool key.
        self.key = (host, port, authorization)

    def __repr__(self) -> str:
        return f"Proxy({self.host}:{self.port}{', with credentials' if self.authorization else ''})"


def parse_proxy(url: str) -> Proxy:
    """A proxy URL (``http://user:pass@host:port``; a bare ``host:port`` means http)."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme.lower() != "http":
        raise UpstreamUnreachable(f"unsupported proxy scheme {parts.scheme[:16]!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise UpstreamUnreachable("invalid proxy URL") from None
    if not parts.hostname:
        raise UpstreamUnreachable("invalid proxy URL")
    authorization = None
    if parts.username is not None:
        user = unquote(parts.username)
        password = unquote(parts.password or "")
        authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return Proxy(parts.hostname, port, authorization)


def _split_port(entry: str) -> tuple[str, int | None] | None:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare v6 address; None if the port is bad."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if not rest:
            return host, None
        if rest[:1] != ":" or not rest[1:].isdigit():
            return None
        return host, int(rest[1:])
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return (host, int(port)) if port.isdigit() else None
    return entry, None


class NoProxy:
    """A ``no_proxy`` list: ``*``, host names (matching the name and its subdomains,
    with or without a leading dot), IP addresses and CIDR ranges, each with an
    optional ``:port``."""

    def __init__(self, value: str) -> None:
        self.everything = False
        self.names: list[tuple[str, int | None]] = []
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for raw in value.replace(" ", ",").replace("\t", ",").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.everything = True
                continue
            split = _split_port(entry)
            if split is None:
                continue
            host, port = split
            try:
                self.networks.append((ipaddress.ip_network(host, strict=False), port))
                continue
            except ValueError:
                pass
            name = host.removeprefix("*").lstrip(".").rstrip(".")
            if name:
                self.names.append((name, port))

    def matches(self, host: str, port: int) -> bool:
        """Whether a request to ``host:port`` bypasses the proxy."""
        if self.everything:
            return True
        host = host.lower().rstrip(".")
        if self.networks:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                for network, only in self.networks:
                    if (only is None or only == port) and address.version == network.version and address in network:
                        return True
        for name, only in self.names:
            if (only is None or only == port) and (host == name or host.endswith("." + name)):
                return True
        return False


def _env(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name)
    if value is None:
        value = environ.get(name.upper())
    return (value or "").strip()


class ProxyEnvironment:
    """The proxy settings of an environment, read once."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        every = _env(environ, "all_proxy")
        self._urls = {"http": _env(environ, "http_proxy") or every, "https": _env(environ, "https_proxy") or every}
        self.no_proxy = NoProxy(_env(environ, "no_proxy"))

    def select(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for a request, or None to connect directly."""
        url = self._urls.get(scheme, "")
        if not url or self.no_proxy.matches(host, port):
            return None
        return parse_proxy(url)


class _TunnelReply(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT: the status line, up to the end of the head."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.status: asyncio.Future[int] = loop.create_future()
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport

    def data_received(self, data: bytes) -> None:
        if self.status.done():
            return  # a refusal's body (ignored: the connection is dropped); nothing follows a 2xx
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_PROXY_REPLY:
                self.status.set_exception(UpstreamUnreachable("proxy reply head too large"))
            return
        line = bytes(self._buffer[: self._buffer.find(b"\r\n")])
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
            self.status.set_exception(UpstreamUnreachable("invalid proxy reply"))
            return
        status = int(parts[1])
        if 200 <= status < 300 and end + 4 != len(self._buffer):
            self.status.set_exception(UpstreamUnreachable("proxy sent data after its CONNECT reply"))
            return
        self.status.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.status.done():
            self.status.set_exception(UpstreamUnreachable("proxy closed the connection"))


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """A TCP connection to the proxy, tunnelled by CONNECT to ``host:port``.

    The caller starts TLS over the returned transport and bounds the whole
    exchange with its timeout. A refusal (any non-2xx, 407 among them) is
    ``UpstreamUnreachable`` naming only the status.
    """
    transport, reply = await loop.create_connection(lambda: _TunnelReply(loop), proxy.host, proxy.port)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        auth = f"proxy-authorization: {proxy.authorization}\r\n" if proxy.authorization else ""
        transport.write(f"CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n{auth}\r\n".encode("latin-1"))
        status = await reply.status
        if not 200 <= status < 300:
            raise UpstreamUnreachable(f"proxy refused CONNECT: {status}")
    except BaseException:
        transport.close()
        raise
    return transport, reply
