"""The one seam between the gateway and upstream HTTP.

Everything the gateway sends upstream goes through an :class:`UpstreamClient`.
Two implementations share the interface and raise the same three errors:

- :class:`AiohttpClient`, the default: on this 2-core box a bare forwarding
  handler reached about 5,200 requests/s over aiohttp against about 930 over
  httpx's default transport, whose connection pool scans every pooled
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


_BODY_LIMIT = 32 * 1024 * 1024


# --- aiohttp -----------------------------------------------------------------


class _AiohttpResponse:
    def __init__(self, response) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers

    async def read(self, limit: int = _BODY_LIMIT) -> bytes:
        import aiohttp

        length = self._response.content_length
        if length is not None and length > limit:
            raise UpstreamBroken("upstream body too large")
        try:
            if length is not None:
                return await self._response.read()  # one call for the common, sized body
            chunks: list[bytes] = []
            size = 0
            async for chunk in self._response.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise UpstreamBroken("upstream body too large")
                chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError:
            raise UpstreamTimeout("read timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(type(exc).__name__) from None

    async def line_batches(self) -> AsyncIterator[list[str]]:
        """Split here, so no line length limit applies."""
        import aiohttp

        pending = b""
        try:
            async for chunk in self._response.content.iter_any():
                pending += chunk
                if b"\n" not in chunk:
                    continue
                *complete, pending = pending.split(b"\n")
                yield [line.rstrip(b"\r").decode("utf-8", "replace") for line in complete]
        except TimeoutError:
            raise UpstreamTimeout("read timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(type(exc).__name__) from None
        if pending:
            yield [pending.rstrip(b"\r").decode("utf-8", "replace")]

    async def close(self) -> None:
        self._response.close()  # drops the connection unless the body was fully read


class AiohttpClient:
    """Pooled keep-alive connections over aiohttp; created inside the event loop."""

    def __init__(self) -> None:
        self._session = None
        self._timeouts: dict[float, object] = {}

    def _get_session(self):
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300)
            # No cookie jar (upstream APIs set none we should send back), no
            # User-Agent; responses are decompressed when an upstream compresses.
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False,
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    def _timeout(self, timeout_s: float):
        """ClientTimeout objects, one per distinct value (they are immutable)."""
        import aiohttp

        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            if len(self._timeouts) > 64:  # the remaining deadline varies: do not grow without bound
                self._timeouts.clear()
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(
                total=None, connect=min(timeout_s, 10.0), sock_read=timeout_s)
        return timeout

    async def post(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> UpstreamResponse:
        import aiohttp

        timeout = self._timeout(round(timeout_s, 1) or 0.1)
        try:
            response = await self._get_session().post(url, data=body, headers=headers, timeout=timeout,
                                                      allow_redirects=False)
        except TimeoutError:
            raise UpstreamTimeout("timed out") from None
        except (aiohttp.ClientConnectorError, aiohttp.InvalidURL) as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(type(exc).__name__) from None
        return _AiohttpResponse(response)

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        import aiohttp

        try:
            async with self._get_session().get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                return response.status, await response.read()
        except TimeoutError:
            raise UpstreamTimeout("timed out") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(type(exc).__name__) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# --- httpx -------------------------------------------------------------------


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers

    async def read(self, limit: int = _BODY_LIMIT) -> bytes:
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
    """aiohttp by default; httpx when a transport is injected."""
    return HttpxClient(transport) if transport is not None else AiohttpClient()
