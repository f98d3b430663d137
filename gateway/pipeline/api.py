"""The seam between an API's wire format and the chat pipeline.

Every API the gateway speaks (chat completions, Responses, Anthropic
Messages) is answered by the same phases in ``pipeline/chat.py``: routing,
limits, safety, failover and accounting do not know which API a request came
in on. An :class:`Api` says only how its wire maps onto a chat request and
back: how a body becomes a :class:`~gateway.protocol.ChatRequest`, how the
gateway's chat answer and stream chunks are written in its format, and how
its errors look. Chat completions is the identity mapping, :data:`CHAT`.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from gateway.errors import GatewayError
from gateway.limits.keys import GatewayKey
from gateway.pipeline.decode import decode_request
from gateway.pipeline.services import Services
from gateway.protocol import ChatChunkOut, ChatCompletionOut, ChatRequest

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def sse(chunk: ChatChunkOut) -> bytes:
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


class Events(Protocol):
    """One stream's events in an API's format, written from the gateway's chat
    chunks as they are relayed. Stateful: one per stream."""

    #: Sent while the first chunk is awaited (an SSE comment, or a ping event).
    keepalive: bytes

    def chunk(self, chunk: ChatChunkOut) -> bytes:
        """Any number of events (possibly none) for one chunk. Chunks come in
        order; a choice's last carries its ``finish_reason``, and the stream's
        usage rides on the last chunk or comes in a chunk of its own."""
        ...

    def done(self) -> bytes:
        """The end of a stream that ended normally."""
        ...

    def failed(self, chunk: ChatChunkOut, message: str) -> bytes:
        """The end of a stream that broke: ``chunk`` closes every open choice
        with ``finish_reason: "error"`` and carries the error."""
        ...


class Exchange(Protocol):
    """One request of an API, decoded: the chat request to run, and how to write its answer."""

    request: ChatRequest

    def answer(self, out: ChatCompletionOut) -> bytes:
        """The JSON body of a plain answer."""
        ...

    def events(self) -> Events:
        """The writer of a streamed answer."""
        ...


class Edge(Protocol):
    """What the HTTP layer needs to know of an API: its name, where its key
    is, and the shape of its errors."""

    #: The ``api`` label on metrics, logs and generation records.
    name: str
    #: Request headers that may carry the gateway key, in the order tried;
    #: ``x-api-key`` holds the bare key, ``authorization`` ``Bearer KEY``.
    key_headers: tuple[bytes, ...]

    def error_body(self, exc: GatewayError) -> bytes:
        """An error in this API's own shape."""
        ...


class Api(Edge, Protocol):
    """An API served on the chat pipeline."""

    async def exchange(self, gw: Services, key: GatewayKey, raw: bytes, request_id: str) -> Exchange:
        """Decode a body; raises the GatewayError (a 400) that names what is wrong."""
        ...


class ChatEvents:
    """Chat completions' own stream: each chunk as an SSE ``data:`` line, then ``[DONE]``."""

    __slots__ = ()
    keepalive = KEEPALIVE

    def chunk(self, chunk: ChatChunkOut) -> bytes:
        return sse(chunk)

    def done(self) -> bytes:
        return DONE

    def failed(self, chunk: ChatChunkOut, message: str) -> bytes:
        return sse(chunk) + DONE


_CHAT_EVENTS = ChatEvents()


class ChatExchange:
    __slots__ = ("request",)

    def __init__(self, request: ChatRequest) -> None:
        self.request = request

    def answer(self, out: ChatCompletionOut) -> bytes:
        return msgspec.json.encode(out)

    def events(self) -> Events:
        return _CHAT_EVENTS


class OpenAIEdge:
    """An OpenAI API's edge: ``Authorization: Bearer KEY``, OpenAI-shaped errors."""

    key_headers: tuple[bytes, ...] = (b"authorization",)

    def __init__(self, name: str) -> None:
        self.name = name

    def error_body(self, exc: GatewayError) -> bytes:
        return exc.to_json()


class ChatApi(OpenAIEdge):
    """``POST /v1/chat/completions``: the pipeline's own format."""

    async def exchange(self, gw: Services, key: GatewayKey, raw: bytes, request_id: str) -> Exchange:
        return ChatExchange(decode_request(raw))


CHAT: Api = ChatApi("chat")
