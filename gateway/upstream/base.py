"""The seam between the gateway and upstream HTTP: the client protocol and its errors.

Two clients implement it: :class:`gateway.upstream.h1.H1Client`, the default,
and :class:`gateway.upstream.httpx_client.HttpxClient`, used when a test
injects an httpx transport. Both raise only the :class:`UpstreamError`
family below, so callers catch one base class.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

BODY_LIMIT = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to reach one upstream: its proxy and TLS settings (``[providers.NAME]``)."""

    #: None: from the environment (``HTTPS_PROXY``, ``NO_PROXY``, ...); "": none.
    proxy: str | None = None
    #: PEM file of CAs to trust instead of the system store.
    ca_file: str | None = None
    #: Client certificate and key (PEM) for mutual TLS.
    client_cert: str | None = None
    client_key: str | None = None


#: The default: the environment's proxy settings and the system's trust store.
DIRECT = ConnectOptions()


class UpstreamError(Exception):
    """An upstream HTTP exchange failed."""


class UpstreamTimeout(UpstreamError):
    """Connecting or reading took longer than the timeout."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made."""


class UpstreamBroken(UpstreamError):
    """The connection failed mid-response, or the body is over the size limit."""


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read(self, limit: int = ...) -> bytes: ...

    def line_batches(self) -> AsyncIterator[list[str]]:
        """Lines of the body, grouped as they arrived: all complete lines of one read."""
        ...

    async def close(self) -> None: ...


class UpstreamClient(Protocol):
    async def post(
        self, url: str, headers: dict[str, str], body: bytes, timeout_s: float, connect: ConnectOptions = DIRECT
    ) -> UpstreamResponse:
        """Send a request; return once the response headers are in.

        ``timeout_s`` bounds connecting and each read, so a hung upstream is
        noticed; the caller bounds the whole attempt with its deadline.
        ``connect`` says how to reach the upstream (proxy, TLS).
        """
        ...

    async def get(self, url: str, timeout_s: float, connect: ConnectOptions = DIRECT) -> tuple[int, bytes]:
        """Status and body of a GET, for backends we started (readiness, metrics)."""
        ...

    async def close(self) -> None: ...
