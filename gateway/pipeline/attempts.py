"""Calling upstreams: one attempt at a time, failing over between candidates.

An attempt fails over (to the next candidate) on a connection error, a
timeout, HTTP 408/429/5xx, an upstream auth or not-found error, or a body that
cannot be read, but only until the first byte of the answer has reached the
client. A 4xx that is the caller's fault (400, 413, 422) goes back as it is.
For streams, every chunk is normalized (role once, no ``</s>``), counted and
classified on the way through; a failure after the first chunk becomes an
in-band error chunk and ``[DONE]``, never a silent cut.
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

from gateway.safety import results as content_filter
from gateway.safety.moderation import Moderation
from gateway.safety import Policy
from gateway.accounting.usage import usage_for
from gateway.routing.catalog import Endpoint
from gateway.errors import GatewayError
from gateway.routing.health import HealthTracker
from gateway.limits.limiter import Limiter
from gateway.accounting.metrics import FAILOVERS, UPSTREAM_ERRORS
from gateway.protocol import (
    AssistantMessage,
    ChatChunk,
    ChatChunkOut,
    ChatCompletion,
    ChatRequest,
    ChoiceOut,
    ChunkChoiceOut,
    Delta,
    PromptFilterResult,
    UpstreamUsage,
    Usage,
)
from gateway.routing.router import Candidate
from gateway.upstream.base import (
    UpstreamBroken,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.upstream.adapter import clean_content, clean_delta, error_message, request_body

log = logging.getLogger("gateway.relay")

#: Upstream statuses that are the caller's fault: answered as they are.
CALLER_FAULT = frozenset({400, 413, 422})
_ERROR_BODY_LIMIT = 64 * 1024


class AttemptFailed(Exception):
    """One attempt failed in a way that lets the next candidate try."""

    def __init__(self, kind: str, detail: str, status: int | None = None, retry_after: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind  # connect | timeout | status | invalid
        self.detail = detail
        self.status = status
        self.retry_after = retry_after


class _StreamCut(AttemptFailed):
    """The upstream closed the stream without ``[DONE]``."""

    def __init__(self) -> None:
        super().__init__("invalid", "upstream closed the stream without [DONE]")


@dataclass(slots=True)
class AttemptRecord:
    """What one attempt did, for headers, logs and generation records."""

    provider: str
    endpoint: str
    outcome: str = "pending"
    status: int | None = None
    error: str | None = None
    latency_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def duration_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started


@dataclass(slots=True)
class Call:
    """Everything one chat request needs while it is being served."""

    request: ChatRequest
    generation_id: str
    client: UpstreamClient
    health: HealthTracker
    moderation: Moderation
    policy: Policy
    candidates: list[Candidate]
    deadline: float
    prompt_filter: list[PromptFilterResult]
    limiter: Limiter
    #: Tokens reserved against quotas until the real usage is known.
    estimate: int = 0
    attempts: list[AttemptRecord] = field(default_factory=list)
    served: Candidate | None = None

    @property
    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    async def release(self, cand: Candidate, tokens: int) -> None:
        """Hand back an attempt's share of its upstream's quota, with the real tokens."""
        if cand.endpoint.quotas:
            await self.limiter.release_upstream(cand.endpoint.quotas, self.generation_id, tokens)


def _headers(endpoint: Endpoint) -> dict[str, str]:
    provider = endpoint.provider
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    headers.update(provider.headers)
    if provider.api_key and provider.spec.bearer_auth:
        headers["authorization"] = f"Bearer {provider.api_key}"
    return headers


def _scrub(text: str, endpoint: Endpoint) -> str:
    """Upstream messages go back to callers: never with our upstream key in them."""
    key = endpoint.provider.api_key
    if key:
        text = text.replace(key, "***")
    return text[:500]


async def _error_message(response: UpstreamResponse, endpoint: Endpoint) -> str:
    """The upstream's own message, read where its provider declares it."""
    try:
        raw = await response.read(_ERROR_BODY_LIMIT)
    except UpstreamError:
        return f"HTTP {response.status}"
    return error_message(endpoint.provider.spec, raw) or f"HTTP {response.status}"


async def _open(call: Call, cand: Candidate, stream_usage: bool) -> UpstreamResponse:
    """Send one attempt and check its status; raises AttemptFailed or GatewayError."""
    endpoint = cand.endpoint
    body = request_body(call.request, endpoint.provider.spec, endpoint.upstream_model, cand.dropped, stream_usage=stream_usage)
    timeout_s = max(0.001, min(endpoint.provider.timeout_s, call.remaining_s))
    try:
        response = await call.client.post(endpoint.provider.chat_url, _headers(endpoint), body, timeout_s)
    except UpstreamTimeout:
        raise AttemptFailed("timeout", "timed out") from None
    except (UpstreamUnreachable, UpstreamBroken) as exc:
        raise AttemptFailed("connect", f"connection failed ({exc})") from None
    if 200 <= response.status < 300:
        return response
    try:
        message = _scrub(await _error_message(response, endpoint), endpoint)
    finally:
        await response.close()
    if response.status in CALLER_FAULT:
        raise GatewayError(response.status, message, code="upstream_rejected_request", type="invalid_request_error")
    raise AttemptFailed("status", f"HTTP {response.status}: {message}", response.status, response.headers.get("retry-after"))


def _final_error(call: Call, failures: list[AttemptFailed]) -> GatewayError:
    """The error to answer when every attempt failed."""
    summary = "; ".join(f"{a.provider}: {a.error}" for a in call.attempts) or "no attempt could be made"
    if not failures and any(a.outcome == "at_quota" for a in call.attempts):
        return GatewayError(503, f"every provider is at its quota ({summary})", code="upstream_quota_exhausted",
                            headers={"retry-after": "1"})
    if not failures or call.remaining_s <= 0 and failures[-1].kind == "timeout":
        return GatewayError(504, f"upstream timed out ({summary})", code="upstream_timeout")
    last = failures[-1]
    if all(f.status == 429 for f in failures):
        return GatewayError(429, f"every provider is rate limited ({summary})", code="upstream_rate_limited",
                            headers={"retry-after": last.retry_after or "1"})
    if last.kind == "timeout":
        return GatewayError(504, f"upstream timed out ({summary})", code="upstream_timeout")
    if last.kind == "invalid":
        return GatewayError(502, f"invalid answer from upstream ({summary})", code="upstream_invalid_response")
    if last.kind == "connect":
        return GatewayError(503, f"no provider could be reached ({summary})", code="no_provider_available",
                            headers={"retry-after": "5"})
    return GatewayError(502, f"upstream error ({summary})", code="upstream_error")


_FAILURES = (TimeoutError, UpstreamTimeout, UpstreamBroken, AttemptFailed)


def _as_failure(exc: BaseException) -> AttemptFailed:
    """What made an attempt fail, in the terms failover and health use."""
    if isinstance(exc, AttemptFailed):
        return exc
    if isinstance(exc, UpstreamTimeout):
        return AttemptFailed("timeout", "timed out")
    if isinstance(exc, TimeoutError):
        return AttemptFailed("timeout", "deadline exceeded")
    return AttemptFailed("invalid", f"the answer broke off ({exc})")


class _Attempts:
    """Iterates candidates within the attempt budget and the deadline."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.failures: list[AttemptFailed] = []

    async def __aiter__(self):
        call = self.call
        for cand in call.candidates:
            if call.remaining_s <= 0:
                break
            if not call.health.available(cand.endpoint.key):
                continue
            record = AttemptRecord(cand.endpoint.provider.name, cand.endpoint.key)
            call.attempts.append(record)
            if cand.endpoint.quotas and not await call.limiter.acquire_upstream(
                    cand.endpoint.quotas, call.generation_id, call.estimate):
                record.outcome, record.error = "at_quota", "at its quota"
                continue
            call.health.begin(cand.endpoint.key)
            if any(a.outcome == "failed" for a in call.attempts):
                FAILOVERS.labels(cand.model.id).inc()
            yield cand, record

    async def rejected(self, cand: Candidate, record: AttemptRecord, exc: GatewayError) -> None:
        """The upstream refused the request as the caller's fault: no failover,
        and no mark against the endpoint's health."""
        record.outcome, record.status, record.error = "rejected", exc.status, exc.message
        record.ended = time.monotonic()
        self.call.health.success(cand.endpoint.key)
        await self.call.release(cand, 0)

    async def failed(self, cand: Candidate, record: AttemptRecord, exc: AttemptFailed) -> None:
        record.outcome, record.status, record.error = "failed", exc.status, exc.detail
        record.ended = time.monotonic()
        UPSTREAM_ERRORS.labels(cand.endpoint.provider.name, exc.kind).inc()
        self.failures.append(exc)
        self.call.health.failure(cand.endpoint.key, exc.kind)
        await self.call.release(cand, 0)
        log.info("attempt failed: %s %s (%s)", cand.endpoint.key, exc.kind, exc.detail)


# --- non-streaming -----------------------------------------------------------


@dataclass(slots=True)
class Completion:
    answer: ChatCompletion
    choices: list[ChoiceOut]
    usage: Usage


async def complete(call: Call) -> Completion:
    """Try candidates in order until one answers; raises the GatewayError to send."""
    attempts = _Attempts(call)
    async for cand, record in attempts:
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, call.remaining_s)):
                response = await _open(call, cand, stream_usage=False)
                try:
                    raw = await response.read()
                finally:
                    await response.close()
            answer = _decode_completion(raw)
        except _FAILURES as exc:
            await attempts.failed(cand, record, _as_failure(exc))
            continue
        except GatewayError as exc:
            await attempts.rejected(cand, record, exc)
            raise
        elapsed = time.monotonic() - started
        record.outcome, record.status, record.latency_s = "ok", 200, elapsed
        record.ended = time.monotonic()
        call.health.success(cand.endpoint.key, elapsed)
        call.served = cand
        done = await _finish_completion(call, cand, answer, elapsed)
        await call.release(cand, done.usage.total_tokens)
        return done
    raise _final_error(call, attempts.failures)


def _decode_completion(raw: bytes) -> ChatCompletion:
    try:
        answer = msgspec.json.decode(raw, type=ChatCompletion)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise AttemptFailed("invalid", "unreadable JSON body") from None
    if not answer.choices:
        raise AttemptFailed("invalid", "answer has no choices")
    return answer


async def _finish_completion(call: Call, cand: Candidate, answer: ChatCompletion, elapsed: float) -> Completion:
    spec = cand.endpoint.provider.spec
    choices = []
    texts = []
    for choice in answer.choices:
        message = choice.message
        content = clean_content(spec, message.content)
        texts.append(content or "")
        results = call.moderation.decide(
            await call.moderation.classify(content or ""),
            content_filter.decode_upstream(choice.content_filter_results or None),
            call.policy,
        )
        finish_reason = choice.finish_reason
        if call.moderation.blocked(results):
            content, finish_reason = None, "content_filter"  # Azure's way: no filtered text
        if content is not message.content:
            message = msgspec.structs.replace(message, content=content)
        choices.append(
            ChoiceOut(
                index=choice.index,
                message=message,
                finish_reason=finish_reason,
                content_filter_results=results,
                logprobs=choice.logprobs if choice.logprobs is not UNSET else None,
            )
        )
    prompt_tokens = cand.prompt.exact if answer.usage is None or answer.usage.prompt_tokens is None else 0
    usage = usage_for(cand.endpoint, cand.model.tokenizer, answer.usage, prompt_tokens, "".join(texts))
    call.health.throughput(cand.endpoint.key, usage.completion_tokens, elapsed)
    return Completion(answer, choices, usage)


# --- streaming ---------------------------------------------------------------

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


class LastPiece(bytes):
    """A stream's final bytes (they end with ``[DONE]``): the HTTP layer sends
    them with the end of the response, in one write instead of two."""


def sse(chunk: ChatChunkOut) -> bytes:
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


@dataclass(slots=True)
class _ChoiceState:
    scanner: object  # StreamScanner: classifies the text as it streams, never from the start again
    text: list[str] = field(default_factory=list)
    role_sent: bool = False
    finished: ChunkChoiceOut | None = None


class StreamRelay:
    """One streamed answer: opens an upstream (failing over), then relays it."""

    def __init__(self, call: Call, include_usage: bool) -> None:
        self.call = call
        self.include_usage = include_usage
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

    async def open(self) -> Candidate:
        """Find a candidate whose stream yields a first valid chunk."""
        attempts = _Attempts(self.call)
        async for cand, record in attempts:
            started = time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, self.call.remaining_s)):
                    response = await _open(self.call, cand, stream_usage=True)
                    self._batches, self._pending = response.line_batches(), deque()
                    try:
                        first = await self._next_chunk()
                    except BaseException:
                        await response.close()
                        raise
                if first is None:
                    await response.close()
                    raise AttemptFailed("invalid", "stream ended before the first chunk")
            except _FAILURES as exc:
                await attempts.failed(cand, record, _as_failure(exc))
                continue
            except GatewayError as exc:
                await attempts.rejected(cand, record, exc)
                raise
            except asyncio.CancelledError:
                self.call.health.release(cand.endpoint.key)
                with anyio.CancelScope(shield=True):
                    await self.call.release(cand, 0)
                raise
            self._first_at = time.monotonic()
            record.outcome, record.status, record.latency_s = "ok", 200, self._first_at - started
            self.call.health.success(cand.endpoint.key, self._first_at - started)
            self.call.served = cand
            self._response, self._first = response, first
            return cand
        raise _final_error(self.call, attempts.failures)

    async def _next_chunk(self) -> ChatChunk | None:
        """The next data chunk; None at ``[DONE]``. Reads the network only when
        no line is pending."""
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
        assert self._batches is not None and self._first is not None and self.call.served is not None
        cand = self.call.served
        out_buf: list[bytes] = []
        try:
            out = self._relay(self._first, first=True)
            if out is not None:
                out_buf.append(sse(out))
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
                out = self._relay(chunk, first=False)
                if out is not None:
                    out_buf.append(sse(out))
            yield LastPiece(b"".join(out_buf + self._ending(cand)))
        except (AttemptFailed, UpstreamTimeout, UpstreamBroken) as exc:
            detail = exc.detail if isinstance(exc, AttemptFailed) else f"stream broke ({exc})"
            log.info("stream failed after first chunk: %s %s", cand.endpoint.key, detail)
            self.call.health.failure(cand.endpoint.key, "stream")
            UPSTREAM_ERRORS.labels(cand.endpoint.provider.name, "stream").inc()
            self.call.attempts[-1].outcome, self.call.attempts[-1].error = "failed_mid_stream", detail
            self.finish_reason = "error"
            yield LastPiece(b"".join([*out_buf, sse(self.error_chunk(f"upstream stream failed: {detail}")), DONE]))
        finally:
            self.call.attempts[-1].ended = time.monotonic()
            with anyio.CancelScope(shield=True):
                await self.close()

    def _relay(self, chunk: ChatChunk, first: bool) -> ChatChunkOut | None:
        if chunk.usage is not None:
            self._usage = chunk.usage
        spec = self.call.served.endpoint.provider.spec
        choices = []
        for c in chunk.choices:
            state = self._choices.get(c.index)
            if state is None:
                state = self._choices[c.index] = _ChoiceState(self.call.moderation.scanner())
            if state.finished is not None:
                continue  # this choice was cut by the content policy
            delta = clean_delta(spec, c.delta, first=not state.role_sent)
            if delta is not None and delta.role is UNSET and not state.role_sent:
                delta = msgspec.structs.replace(delta, role="assistant")
            # Block mode scans chunk by chunk, to cut the stream at the offending
            # delta; annotate mode needs results only at the end, and scans the
            # whole text once then (one pass instead of one per chunk).
            block = self.call.policy.mode == "block"
            if delta is not None and isinstance(delta.content, str):
                state.text.append(delta.content)
                if block:
                    state.scanner.feed(delta.content)
            state.role_sent = True
            upstream = content_filter.decode_upstream(c.content_filter_results or None)
            results = None
            if block:
                results = self.call.moderation.decide(state.scanner.result(), upstream, self.call.policy)
            if results is not None and self.call.moderation.blocked(results):
                # Stop this choice here; the offending delta is not relayed.
                state.finished = ChunkChoiceOut(index=c.index, delta=Delta(), finish_reason="content_filter",
                                                content_filter_results=results)
                self.blocked = True
                continue
            if c.finish_reason is not None:
                if results is None:
                    state.scanner.feed("".join(state.text))
                    results = self.call.moderation.decide(state.scanner.result(), upstream, self.call.policy)
                state.finished = ChunkChoiceOut(index=c.index, delta=delta or Delta(), finish_reason=c.finish_reason,
                                                content_filter_results=results)
                continue  # held back until the end, so usage can ride on it
            if delta is None:
                continue
            out = ChunkChoiceOut(index=c.index, delta=delta)
            if c.logprobs not in (UNSET, None):
                out.logprobs = c.logprobs
            choices.append(out)
        if not choices and not first:
            return None
        out = self._chunk(choices)
        if first:
            out.prompt_filter_results = self.call.prompt_filter
        return out

    def _chunk(self, choices: list[ChunkChoiceOut]) -> ChatChunkOut:
        cand = self.call.served or self.call.candidates[0]
        return ChatChunkOut(
            id=self.call.generation_id,
            object="chat.completion.chunk",
            created=self.created,
            model=cand.model.id,
            provider=cand.endpoint.provider.name if self.call.served else "",
            choices=choices,
        )

    def usage(self) -> Usage:
        cand = self.call.served
        text = "".join("".join(s.text) for s in self._choices.values())
        prompt = cand.prompt.exact if self._usage is None or self._usage.prompt_tokens is None else 0
        return usage_for(cand.endpoint, cand.model.tokenizer, self._usage, prompt, text)

    def _ending(self, cand: Candidate) -> list[bytes]:
        usage = self.usage()
        self.call.health.throughput(cand.endpoint.key, usage.completion_tokens, time.monotonic() - self._first_at)
        finished = [s.finished for _, s in sorted(self._choices.items()) if s.finished is not None]
        if finished:
            self.finish_reason = finished[0].finish_reason
        pieces = []
        for i, choice in enumerate(finished):
            out = self._chunk([choice])
            if i == len(finished) - 1 and not self.include_usage:
                out.usage = usage
            pieces.append(sse(out))
        if self.include_usage or not finished:
            pieces.append(sse(msgspec.structs.replace(self._chunk([]), usage=usage)))
        pieces.append(DONE)
        self.final_usage = usage
        return pieces

    def error_chunk(self, message: str) -> ChatChunkOut:
        """The in-band error: ``finish_reason: "error"`` on every open choice."""
        indexes = [i for i, s in sorted(self._choices.items()) if s.finished is None] or [0]
        out = self._chunk([ChunkChoiceOut(index=i, delta=Delta(), finish_reason="error") for i in indexes])
        out.error = msgspec.Raw(msgspec.json.encode({"message": message, "type": "upstream_error", "code": "stream_failed"}))
        return out

    async def close(self) -> None:
        if self._response is not None:
            response, self._response = self._response, None
            await response.close()
