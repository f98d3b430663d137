"""Everything the gateway sends upstream goes through an :class:`UpstreamClient`."""

from __future__ import annotations

import httpx

from gateway.upstream.base import UpstreamClient
from gateway.upstream.h1 import H1Client
from gateway.upstream.httpx_client import HttpxClient


def make_client(transport: httpx.AsyncBaseTransport | None = None) -> UpstreamClient:
    """Our HTTP/1.1 client by default; httpx when a transport is injected."""
    if transport is not None:
        return HttpxClient(transport)
    return H1Client()
