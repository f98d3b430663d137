"""The upstream seam over httpx, for tests that inject a transport (respx, ``httpx.MockTransport``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import httpx

from gateway.upstream.base import (
    BODY_LIMIT,
    DIRECT,
    ConnectOptions,
    UpstreamBroken,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers: Mapping[str, str] = response.headers

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

    async def post(
        self, url: str, headers: dict[str, str], body: bytes, timeout_s: float, connect: ConnectOptions = DIRECT
    ) -> UpstreamResponse:
        """``connect`` is not applied: this client serves tests that inject a transport."""
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

    async def get(self, url: str, timeout_s: float, connect: ConnectOptions = DIRECT) -> tuple[int, bytes]:
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
