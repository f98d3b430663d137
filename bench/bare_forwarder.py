"""The Python floor: an ASGI app that forwards each POST to the upstream with the
gateway's own HTTP client (``gateway/upstream/h1.py``), under uvicorn, with no feature at all.

    UPSTREAM_URL=http://127.0.0.1:PORT/json/chat/completions \\
        .venv/bin/uvicorn bench.bare_forwarder:app --workers 2

The benchmark runs it beside the gateway so the gateway's own cost (keys,
limits, routing, content filter, accounting, metrics) reads as the distance
between the two.
"""

from __future__ import annotations

import os

from gateway.upstream.h1 import H1Client

UPSTREAM_URL = os.environ.get("UPSTREAM_URL", "")
_client: H1Client | None = None


async def app(scope, receive, send) -> None:
    global _client
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if _client is None:
        _client = H1Client()
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    response = await _client.post(UPSTREAM_URL, {"content-type": "application/json"}, body, 30.0)
    try:
        data = await response.read()
    finally:
        await response.close()
    await send({"type": "http.response.start", "status": response.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]})
    await send({"type": "http.response.body", "body": data})
