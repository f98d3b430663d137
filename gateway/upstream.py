"""The one seam between the gateway and upstream HTTP.

Everything the gateway sends upstream goes through an :class:`UpstreamClient`.
Two implementations share the interface and raise the same three errors:

- :class:`gateway.h1.H1Client`, the default: HTTP/1.1 written by hand over
  asyncio, parsed by httptools. It replaced aiohttp, whose per-request setup
  cost more worker time than the gateway's own work (``bench/NOTES.md``);
  aiohttp in turn had replaced httpx, whose pool scans every pooled
  connection on each request.
- :class:`HttpxClient`, used when a test injects an ``httpx`` transport
  (respx mocks, ``httpx.MockTransport``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import httpx


class UpstreamTimeout(Exception):
    """Connecting or reading took longer than the timeout."""


class UpstreamUnreachable(Exception):
    """No connection could be made."""


class UpstreamBroken(Exception):
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
    async def post(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> UpstreamResponse:
        """Send a request; return once the response headers are in.

        ``timeout_s`` bounds connecting and each read, so a hung upstream is
        noticed; the caller bounds the whole attempt with its deadline.
        """
        ...

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        """Status and body of a GET, for backends we started (readiness, metrics)."""
        ...

    async def close(self) -> None: ...


BODY_LIMIT = 32 * 1024 * 1024


# --- httpx -------------------------------------------------------------------


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers

    async def read(self, limit: int = BODY_LIMIT) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in self._response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise UpstreamBroken("upstream body too large")
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise UpstreamTimeout("read timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamBroken(type(exc).__name__) from None
        return b"".join(chunks)

    async def line_batches(self) -> AsyncIterator[list[str]]:
        try:
            async for line in self._response.aiter_lines():
                yield [line]
        except httpx.TimeoutException:
            raise UpstreamTimeout("read timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamBroken(type(exc).__name__) from None

    async def close(self) -> None:
        await self._response.aclose()


class HttpxClient:
    """The same over httpx, for tests that inject a transport."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30),
            follow_redirects=False,
            trust_env=False,
        )

    async def post(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> UpstreamResponse:
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        request = self._client.build_request("POST", url, headers=headers, content=body, timeout=timeout)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            raise UpstreamTimeout("timed out") from None
        except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise UpstreamBroken(type(exc).__name__) from None
        return _HttpxResponse(response)

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        try:
            response = await self._client.get(url, timeout=timeout_s)
        except httpx.TimeoutException:
            raise UpstreamTimeout("timed out") from None
        except httpx.ConnectError as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise UpstreamBroken(type(exc).__name__) from None
        return response.status_code, response.content

    async def close(self) -> None:
        await self._client.aclose()


def make_client(transport: httpx.AsyncBaseTransport | None = None) -> UpstreamClient:
    """Our HTTP/1.1 client by default; httpx when a transport is injected."""
    if transport is not None:
        return HttpxClient(transport)
    from gateway.h1 import H1Client  # imports this module's errors

    return H1Client()
