"""The ASGI entry point: the APIs' POST routes straight over ASGI, the rest through litestar.

``POST /v1/chat/completions`` is nearly all of a gateway's traffic, and
``/v1/responses``, ``/v1/messages`` and ``/v1/embeddings`` are its kin, so
they are answered here from the raw ASGI messages, without a framework's
routing, middleware and response classes (``bench/NOTES.md`` has the
measurements): check the key from the headers, read the body (with the size
limit), run the path's pipeline (``ROUTES``), write the reply. Every other
route, and the lifespan, go to the litestar app unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from typing import Any

from gateway.errors import GatewayError
from gateway.limits.keys import GatewayKey
from gateway.pipeline import chat, embeddings, outcome
from gateway.pipeline.api import CHAT, Api, Edge
from gateway.pipeline.embeddings import EMBEDDINGS
from gateway.pipeline.messages import MESSAGES, MESSAGES_PATH
from gateway.pipeline.outcome import Reply
from gateway.pipeline.responses import RESPONSES, RESPONSES_PATH
from gateway.pipeline.services import Services
from gateway.pipeline.stream import LastPiece
from gateway.state import Gateway

log = logging.getLogger("gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


def _header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _check_length(scope: Scope, limit: int) -> None:
    """Refuse (413) a body whose declared length is past ``limit``, before reading any of it."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    raise _TooLarge
            except ValueError:
                pass
            break


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, refused (413) past ``limit`` bytes."""
    message = await receive()
    if message["type"] != "http.request":
        raise _Disconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _TooLarge
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_json(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", b"%d" % len(body)), *_header_list(headers)],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: GatewayError, edge: Edge = CHAT) -> None:
    await send_json(send, exc.status, edge.error_body(exc), exc.headers)


def credentials(scope: Scope, api: Edge) -> str | None:
    """The gateway key as an ``Authorization`` value, from the first of the
    API's key headers present (``x-api-key`` carries the bare key)."""
    names = api.key_headers
    best: tuple[bytes, bytes] | None = None
    rank = len(names)
    for name, value in scope["headers"]:
        if name in names:
            i = names.index(name)
            if i < rank:
                best, rank = (name, value), i
                if i == 0:
                    break
    if best is not None:
        name, value = best
        text = value.decode("latin-1")
        return text if name == b"authorization" else f"Bearer {text.strip()}"
    return None


async def send_stream(
    receive: Receive, send: Send, status: int, headers: dict[str, str], stream: AsyncGenerator[bytes, None]
) -> None:
    """Relay an SSE stream; a client that goes away cancels it (and so the upstream call)."""
    await send({"type": "http.response.start", "status": status, "headers": [*_SSE, *_header_list(headers)]})
    task = asyncio.current_task()
    assert task is not None  # ASGI servers run each request in a task
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    ended = False
    try:
        async for piece in stream:
            if type(piece) is LastPiece:  # the stream's end, sent with the response's end
                watcher.cancel()  # first: a completed response reads as a disconnect
                ended = True
                await send({"type": "http.response.body", "body": piece})
            else:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        watcher.cancel()
        if not ended:
            await send({"type": "http.response.body", "body": b""})
    except asyncio.CancelledError:
        if not gone:
            raise  # the server is shutting down, not the client leaving
        task.uncancel()
    finally:
        watcher.cancel()
        await stream.aclose()


#: A pipeline's entry: the config's view, the key the HTTP layer found, and the raw body.
Answer = Callable[[Services, GatewayKey, bytes], Awaitable[Reply]]


def on_chat_path(api: Api) -> Answer:
    """The chat pipeline, answering in ``api``'s format."""

    async def answer(gw: Services, key: GatewayKey, body: bytes) -> Reply:
        return await chat.chat_completions(gw, key, body, api)

    return answer


async def serve(gw: Gateway, edge: Edge, answer: Answer, scope: Scope, receive: Receive, send: Send) -> None:
    """One POST of an API, from its ASGI messages to its reply: the key is
    checked from the headers before the body is read (a 401 does not wait
    for it), then the body is read with its limit and answered."""
    if gw.tracer is not None:  # the caller's W3C trace context, for the request's span
        gw.tracer.incoming(scope["headers"])
    # The config's view, read once: a reload while the request runs does not change it.
    view = gw.view
    try:
        limit = view.config.server.max_body_bytes
        _check_length(scope, limit)
        key = outcome.authenticate(view, credentials(scope, edge), edge.name)
        body = await _read_body(receive, limit)
        reply = await answer(view, key, body)
    except GatewayError as exc:
        await send_error(send, exc, edge)
        return
    except _TooLarge:
        await send_error(send, GatewayError(413, "request body too large", code="request_too_large"), edge)
        return
    except _Disconnected:
        return
    except Exception:
        # Never a traceback to the caller; the log has it, without request bodies.
        log.exception("unhandled error on POST %s", scope["path"])
        await send_error(send, GatewayError(500, "internal error", code="internal_error"), edge)
        return
    if reply.stream is not None:
        await send_stream(receive, send, reply.status, reply.headers, reply.stream)
    else:
        await send_json(send, reply.status, reply.body or b"", reply.headers)


#: The POST routes answered here: each path's API edge and pipeline.
ROUTES: dict[str, tuple[Edge, Answer]] = {
    CHAT_PATH: (CHAT, on_chat_path(CHAT)),
    RESPONSES_PATH: (RESPONSES, on_chat_path(RESPONSES)),
    MESSAGES_PATH: (MESSAGES, on_chat_path(MESSAGES)),
    EMBEDDINGS_PATH: (EMBEDDINGS, embeddings.embeddings),
}


class App:
    """The ASGI application ``gateway serve`` runs: the fast paths, then litestar."""

    def __init__(self, gw: Gateway, fallback: ASGIApp) -> None:
        self.gateway = gw
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is not None and scope["method"] == "POST":
            await serve(self.gateway, *route, scope, receive, send)
        else:
            await self.fallback(scope, receive, send)
