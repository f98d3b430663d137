"""The one seam between the gateway and upstream HTTP.

Everything the gateway sends upstream goes through :class:`UpstreamClient`,
so the HTTP library can be swapped (aiohttp, httpx-aiohttp) and tests can
inject a mock transport, without touching the request path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx


class UpstreamResponse:
    """An open upstream response: status now, body later (whole or as lines)."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers

    async def read(self, limit: int = 32 * 1024 * 1024) -> bytes:
        """The whole body, refusing bodies over ``limit`` bytes."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in self._response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise httpx.DecodingError("upstream body too large")
            chunks.append(chunk)
        return b"".join(chunks)

    def lines(self) -> AsyncIterator[str]:
        return self._response.aiter_lines()

    async def close(self) -> None:
        await self._response.aclose()


class UpstreamClient:
    """POSTs JSON to upstreams over pooled keep-alive connections."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._client = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30),
            follow_redirects=False,
            trust_env=False,
        )

    async def post(self, url: str, headers: dict[str, str], body: bytes, timeout_s: float) -> UpstreamResponse:
        """Send the request and return once the response headers are in.

        ``timeout_s`` bounds connecting and each read, so a hung upstream is
        noticed; the caller bounds the whole attempt with its deadline.
        """
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        request = self._client.build_request("POST", url, headers=headers, content=body, timeout=timeout)
        response = await self._client.send(request, stream=True)
        return UpstreamResponse(response)

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        """Status and body of a GET, for backends we started (readiness, metrics)."""
        response = await self._client.get(url, timeout=timeout_s)
        return response.status_code, response.content

    async def close(self) -> None:
        await self._client.aclose()
