"""Streamed answers: open an upstream stream (failing over), then relay it.

Every chunk is normalized (role once, no ``</s>``), counted and screened on
the way through. A failure after the first chunk becomes an in-band error
chunk and ``[DONE]``, never a silent cut.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import msgspec
from msgspec import UNSET

from gateway.accounting.usage import usage_for
from gateway.errors import GatewayError
from gateway.pipeline.api import Events
from gateway.pipeline.attempts import FAILURES, AttemptFailed, Attempts, as_failure, scrub
from gateway.protocol import (
    AssistantMessage,
    ChatChunk,
    ChatChunkOut,
    ChoiceOut,
    ChunkChoiceOut,
    ContentFilterResults,
    Delta,
    PromptFilterResult,
    UpstreamUsage,
    Usage,
)
from gateway.routing.router import Candidate
from gateway.safety.moderation import ChoiceScreen, CompletionFilter
from gateway.upstream.adapter import ToolCallDeltas, clean_delta
from gateway.upstream.base import UpstreamError, UpstreamResponse

log = logging.getLogger("gateway.relay")


class LastPiece(bytes):
    """A stream's final bytes (its last events): the HTTP layer sends
    them with the end of the response, in one write instead of two."""


class _StreamCut(AttemptFailed):
    """The upstream closed the stream without ``[DONE]``."""

    def __init__(self) -> None:
        super().__init__("invalid", "upstream closed the stream without [DONE]")


@dataclass(slots=True)
class _ChoiceState:
    screen: ChoiceScreen
    text: list[str] = field(default_factory=list)
    role_sent: bool = False
    finished: ChunkChoiceOut | None = None
    #: Made on this choice's first tool_calls delta.
    tools: ToolCallDeltas | None = None


class StreamRelay:
    """One streamed answer: opens an upstream (failing over), then relays it."""

    def __init__(
        self,
        attempts: Attempts,
        screen: CompletionFilter,
        prompt_filter: list[PromptFilterResult],
        include_usage: bool,
        events: Events,
    ) -> None:
        self.attempts = attempts
        self.screen = screen
        self.prompt_filter = prompt_filter
        self.include_usage = include_usage
        #: Writes the chunks in the API's own format.
        self.events = events
        self.created = int(time.time())
        self._response: UpstreamResponse | None = None
        self._batches: AsyncIterator[list[str]] | None = None
        #: Data lines already read from the network and not relayed yet.
        self._pending: deque[str] = deque()
        self._first: ChatChunk | None = None
        self._choices: dict[int, _ChoiceState] = {}
        self._usage: UpstreamUsage | None = None
        self._first_at = 0.0
        #: Set once the stream ended normally; until then usage() counts what came so far.
        self.final_usage: Usage | None = None
        self.finish_reason: str | None = None
        self.blocked = False

    @property
    def served(self) -> Candidate | None:
        return self.attempts.served

    async def open(self) -> Candidate:
        """Find a candidate whose stream yields a first valid chunk."""
        attempts = self.attempts
        async for cand, record in attempts.tries():
            started = time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, attempts.remaining_s)):
                    response = await attempts.send(cand, stream_usage=True)
                    self._batches, self._pending = response.line_batches(), deque()
                    try:
                        first = await self._next_chunk()
                    except BaseException:
                        await response.close()
                        raise
                if first is None:
                    await response.close()
                    raise AttemptFailed("invalid", "stream ended before the first chunk")
            except FAILURES as exc:
                await attempts.failed(cand, record, as_failure(exc))
                continue
            except GatewayError as exc:
                await attempts.rejected(cand, record, exc)
                raise
            except asyncio.CancelledError:
                attempts.cancelled(cand)
                with anyio.CancelScope(shield=True):
                    await attempts.give_back(cand, 0)
                raise
            self._first_at = time.monotonic()
            attempts.succeeded(cand, record, self._first_at - started)
            self._response, self._first = response, first
            return cand
        raise attempts.final_error()

    async def _next_chunk(self) -> ChatChunk | None:
        """The next data chunk; None at ``[DONE]``. Reads the network only when
        no line is pending."""
        assert self._batches is not None
        while not self._pending:
            batch = await anext(self._batches, None)
            if batch is None:
                raise _StreamCut
            # Blank separators, comments (": OPENROUTER PROCESSING") and event names carry nothing.
            self._pending.extend(line for line in batch if line.startswith("data:"))
        data = self._pending.popleft()[5:].strip()
        if data == "[DONE]":
            return None
        try:
            chunk = msgspec.json.decode(data, type=ChatChunk)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise AttemptFailed("invalid", "unreadable stream chunk") from None
        if chunk.error is not UNSET:
            raise AttemptFailed("status", "upstream sent an error chunk")
        return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        """SSE bytes for the client, from the first chunk to ``[DONE]``.

        Chunks that arrived in one network read leave in one write: each is
        relayed as soon as nothing more is already waiting, so a token-by-token
        upstream is relayed token by token and a bursty one costs one write
        per burst instead of one per chunk.
        """
        cand = self.attempts.served
        assert self._batches is not None and self._first is not None and cand is not None
        record = self.attempts.records[-1]
        out_buf: list[bytes] = []
        write = self.events.chunk
        try:
            out = self._relay(self._first, cand, first=True)
            if out is not None:
                out_buf.append(write(out))
            # Read until [DONE], or until the content policy has cut every choice.
            while not (self.blocked and all(s.finished for s in self._choices.values())):
                if out_buf and not self._pending:
                    yield b"".join(out_buf)  # about to wait on the network: flush first
                    out_buf.clear()
                try:
                    chunk = await self._next_chunk()
                except _StreamCut:
                    if self._choices and all(s.finished for s in self._choices.values()):
                        break  # complete answer, only [DONE] missing
                    raise AttemptFailed("invalid", "upstream closed the stream mid-answer") from None
                if chunk is None:
                    break
                out = self._relay(chunk, cand, first=False)
                if out is not None:
                    out_buf.append(write(out))
            yield LastPiece(b"".join(out_buf + self._ending(cand)))
        except (AttemptFailed, UpstreamError) as exc:
            detail = scrub(exc.detail if isinstance(exc, AttemptFailed) else f"stream broke ({exc})", cand.endpoint)
            log.info("stream failed after first chunk: %s %s", cand.endpoint.key, detail)
            self.attempts.health.failure(cand.endpoint.key, "stream")
            record.outcome, record.kind, record.error = "failed_mid_stream", "stream", detail
            self.finish_reason = "error"
            message = f"upstream stream failed: {detail}"
            yield LastPiece(b"".join([*out_buf, self.events.failed(self.error_chunk(message), message)]))
        finally:
            record.ended = time.monotonic()
            with anyio.CancelScope(shield=True):
                await self.close()

    def _relay(self, chunk: ChatChunk, cand: Candidate, first: bool) -> ChatChunkOut | None:
        if chunk.usage is not None:
            self._usage = chunk.usage
        spec = cand.endpoint.provider.spec
        choices = []
        for c in chunk.choices:
            state = self._choices.get(c.index)
            if state is None:
                state = self._choices[c.index] = _ChoiceState(self.screen.screen())
            if state.finished is not None:
                continue  # this choice was cut by the content policy
            delta = clean_delta(spec, c.delta, first=not state.role_sent)
            if delta is not None and delta.tool_calls is not UNSET:
                if state.tools is None:
                    state.tools = ToolCallDeltas()
                delta = msgspec.structs.replace(delta, tool_calls=state.tools.normalize(delta.tool_calls))
            if delta is not None and delta.role is UNSET and not state.role_sent:
                delta = msgspec.structs.replace(delta, role="assistant")
            if delta is not None and isinstance(delta.content, str):
                state.text.append(delta.content)
                state.screen.feed(delta.content)
            state.role_sent = True
            upstream = c.content_filter_results or None
            results = state.screen.check(upstream)
            if results is not None and self.screen.blocked(results):
                # Stop this choice here; the offending delta is not relayed.
                state.finished = ChunkChoiceOut(
                    index=c.index, delta=Delta(), finish_reason="content_filter", content_filter_results=results
                )
                self.blocked = True
                continue
            if c.finish_reason is not None:
                if results is None:
                    results = state.screen.final("".join(state.text), upstream)
                state.finished = ChunkChoiceOut(
                    index=c.index, delta=delta or Delta(), finish_reason=c.finish_reason, content_filter_results=results
                )
                continue  # held back until the end, so usage can ride on it
            if delta is None:
                continue
            out = ChunkChoiceOut(index=c.index, delta=delta)
            if c.logprobs not in (UNSET, None):
                out.logprobs = c.logprobs
            choices.append(out)
        if not choices and not first:
            return None
        out_chunk = self._chunk(choices)
        if first:
            out_chunk.prompt_filter_results = self.prompt_filter
        return out_chunk

    def _chunk(self, choices: list[ChunkChoiceOut]) -> ChatChunkOut:
        served = self.attempts.served
        cand = served or self.attempts.candidates[0]
        return ChatChunkOut(
            id=self.attempts.request_id,
            object="chat.completion.chunk",
            created=self.created,
            model=cand.model.id,
            provider=cand.endpoint.provider.name if served else "",
            choices=choices,
        )

    def usage(self) -> Usage:
        """What the stream used so far (all of it, once it ended)."""
        cand = self.attempts.served
        assert cand is not None
        text = "".join("".join(s.text) for s in self._choices.values())
        prompt = cand.prompt.exact if self._usage is None or self._usage.prompt_tokens is None else 0
        return usage_for(cand.endpoint, cand.model.tokenizer, self._usage, prompt, text)

    def _ending(self, cand: Candidate) -> list[bytes]:
        usage = self.usage()
        self.attempts.health.throughput(cand.endpoint.key, usage.completion_tokens, time.monotonic() - self._first_at)
        finished = [s.finished for _, s in sorted(self._choices.items()) if s.finished is not None]
        if finished:
            self.finish_reason = finished[0].finish_reason
        write = self.events.chunk
        pieces = []
        for i, choice in enumerate(finished):
            out = self._chunk([choice])
            if i == len(finished) - 1 and not self.include_usage:
                out.usage = usage
            pieces.append(write(out))
        if self.include_usage or not finished:
            pieces.append(write(msgspec.structs.replace(self._chunk([]), usage=usage)))
        pieces.append(self.events.done())
        self.final_usage = usage
        span = self.attempts.span
        if span is not None and span.content:  # with [tracing] content on, the text the client got
            span.output = [
                ChoiceOut(
                    index=i,
                    message=AssistantMessage(content="".join(s.text)),
                    finish_reason=s.finished.finish_reason if s.finished is not None else None,
                    content_filter_results=ContentFilterResults(),
                )
                for i, s in sorted(self._choices.items())
            ]
        return pieces

    def error_chunk(self, message: str) -> ChatChunkOut:
        """The in-band error: ``finish_reason: "error"`` on every open choice."""
        indexes = [i for i, s in sorted(self._choices.items()) if s.finished is None] or [0]
        out = self._chunk([ChunkChoiceOut(index=i, delta=Delta(), finish_reason="error") for i in indexes])
        error = {"message": message, "type": "upstream_error", "code": "stream_failed"}
        out.error = msgspec.Raw(msgspec.json.encode(error))
        return out

    async def close(self) -> None:
        if self._response is not None:
            response, self._response = self._response, None
            await response.close()
