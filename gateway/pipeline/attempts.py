"""The failover loop: one attempt at a time, over the request's candidates.

An attempt fails over (to the next candidate) on a connection error, a
timeout, HTTP 408/429/5xx, an upstream auth or not-found error, or a body that
cannot be read, but only until the first byte of the answer has reached the
client. A 4xx that is the caller's fault (400, 413, 422) goes back as it is,
with the upstream's own message, read where its provider declares it.
Each attempt is recorded in the request's trace; limits and safety are
reached through two narrow hooks, :class:`UpstreamQuota` and
:class:`CompletionFilter`.

:class:`Failover` is the loop whatever the API; :class:`Attempts` is the chat
API's, which builds each attempt's body from the chat request, and
:func:`call_json` runs the loop for an API answered with one JSON body
(embeddings).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from msgspec import UNSET

from gateway.accounting.trace import REQUEST_SPAN, AttemptRecord, RequestSpan
from gateway.accounting.usage import usage_for
from gateway.errors import GatewayError, Redactor
from gateway.limits.limiter import UpstreamQuota
from gateway.protocol import ChatCompletion, ChatRequest, ChoiceOut, Usage
from gateway.routing.catalog import Endpoint
from gateway.routing.health import HealthTracker
from gateway.routing.router import Candidate
from gateway.safety.moderation import CompletionFilter
from gateway.upstream.adapter import clean_content, error_message, request_body, whole_tool_calls
from gateway.upstream.base import UpstreamClient, UpstreamError, UpstreamResponse, UpstreamTimeout

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


def as_failure(exc: BaseException) -> AttemptFailed:
    """What made an attempt fail, in the terms failover and health use."""
    if isinstance(exc, AttemptFailed):
        return exc
    if isinstance(exc, UpstreamTimeout):
        return AttemptFailed("timeout", "timed out")
    if isinstance(exc, TimeoutError):
        return AttemptFailed("timeout", "deadline exceeded")
    return AttemptFailed("invalid", f"the answer broke off ({exc})")


#: What ends one attempt and lets the next candidate try.
FAILURES = (TimeoutError, UpstreamError, AttemptFailed)


def _headers(endpoint: Endpoint) -> dict[str, str]:
    provider = endpoint.provider
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    headers.update(provider.headers)
    if provider.api_key and provider.spec.bearer_auth:
        headers["authorization"] = f"Bearer {provider.api_key}"
    return headers


@functools.lru_cache(maxsize=256)
def _redactor(api_key: str | None, header_values: tuple[str, ...]) -> Redactor:
    return Redactor([api_key] if api_key else [], header_values)


def scrub(text: str, endpoint: Endpoint, limit: int | None = None) -> str:
    """Text about an upstream goes back to callers and into logs and records:
    never with the provider's key (or a run of eight or more of its
    characters) or a configured header value in it. Cut to ``limit`` characters first."""
    provider = endpoint.provider
    return _redactor(provider.api_key, tuple(provider.headers.values()))(text[:limit])


#: An upstream's Retry-After, as passed on to callers, in seconds.
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 60


def retry_after(value: str | None) -> str | None:
    """An upstream's ``Retry-After`` as whole seconds within [1, 60]: integer
    seconds, or an HTTP-date counted from now; ``"1"`` for anything else.
    Passed on verbatim, a huge or malformed value would hold off the caller's
    retries as the upstream chose, or break its parsing."""
    if value is None:
        return None
    text = value.strip()
    seconds: float
    if text.isdigit() and text.isascii():
        seconds = int(text) if len(text) <= 9 else RETRY_AFTER_MAX_S  # int() refuses very long digit strings
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return str(RETRY_AFTER_MIN_S)
        if when.tzinfo is None:  # HTTP-dates are GMT
            when = when.replace(tzinfo=datetime.UTC)
        seconds = math.ceil((when - datetime.datetime.now(datetime.UTC)).total_seconds())
    return str(int(min(max(seconds, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)))


async def _error_message(response: UpstreamResponse, endpoint: Endpoint) -> str:
    """The upstream's own message, read where its provider declares it."""
    try:
        raw = await response.read(_ERROR_BODY_LIMIT)
    except UpstreamError:
        return f"HTTP {response.status}"
    return error_message(endpoint.provider.spec, raw) or f"HTTP {response.status}"


@dataclass(slots=True, kw_only=True)
class Failover:
    """One request's tries at its candidates, in order, within its deadline,
    whatever the API: each attempt posts a JSON body to its endpoint."""

    request_id: str
    candidates: list[Candidate]
    deadline: float
    client: UpstreamClient
    health: HealthTracker
    quota: UpstreamQuota
    #: The trace's list: every attempt made, in order.
    records: list[AttemptRecord]
    served: Candidate | None = None
    failures: list[AttemptFailed] = field(default_factory=list)
    #: The request's span when tracing is on (None otherwise), taken from the
    #: request's context when the loop is made.
    span: RequestSpan | None = field(default_factory=REQUEST_SPAN.get)

    @property
    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    async def tries(self) -> AsyncIterator[tuple[Candidate, AttemptRecord]]:
        """The candidates to attempt now: healthy, within the deadline, and with
        room in their upstream's quota."""
        for cand in self.candidates:
            if self.remaining_s <= 0:
                break
            endpoint = cand.endpoint
            if not self.health.available(endpoint.key):
                continue
            record = AttemptRecord(endpoint.provider.name, endpoint.key, cand.model.id)
            self.records.append(record)
            if not await self.quota.take(endpoint.quotas):
                record.outcome, record.error = "at_quota", "at its quota"
                continue
            self.health.begin(endpoint.key)
            yield cand, record

    async def post(self, cand: Candidate, url: str, body: bytes) -> UpstreamResponse:
        """Send one attempt's body to ``url`` and check the answer's status;
        raises AttemptFailed or GatewayError."""
        endpoint = cand.endpoint
        timeout_s = max(0.001, min(endpoint.provider.timeout_s, self.remaining_s))
        headers = _headers(endpoint)
        if self.span is not None:
            self.traced(self.span, headers)
        try:
            response = await self.client.post(url, headers, body, timeout_s, endpoint.provider.connect)
        except UpstreamTimeout:
            raise AttemptFailed("timeout", "timed out") from None
        except UpstreamError as exc:
            raise AttemptFailed("connect", scrub(f"connection failed ({exc})", endpoint)) from None
        if 200 <= response.status < 300:
            return response
        try:
            message = scrub(await _error_message(response, endpoint), endpoint, 500)
        finally:
            await response.close()
        if response.status in CALLER_FAULT:
            raise GatewayError(response.status, message, code="upstream_rejected_request", type="invalid_request_error")
        after = retry_after(response.headers.get("retry-after"))
        raise AttemptFailed("status", f"HTTP {response.status}: {message}", response.status, after)

    def traced(self, span: RequestSpan, headers: dict[str, str]) -> None:
        """Tracing is on: the attempt being sent (the last one recorded: ``post``
        runs inside ``tries``) gets its span id, and the upstream a ``traceparent`` naming it."""
        span.attempt(self.records[-1], headers)

    def succeeded(self, cand: Candidate, record: AttemptRecord, latency_s: float) -> None:
        record.outcome, record.status, record.latency_s = "ok", 200, latency_s
        self.health.success(cand.endpoint.key, latency_s)
        self.served = cand

    async def rejected(self, cand: Candidate, record: AttemptRecord, exc: GatewayError) -> None:
        """The upstream refused the request as the caller's fault: no failover,
        and no mark against the endpoint's health."""
        record.outcome, record.status, record.error = "rejected", exc.status, exc.message
        record.ended = time.monotonic()
        self.health.success(cand.endpoint.key)
        await self.give_back(cand, 0)

    async def failed(self, cand: Candidate, record: AttemptRecord, exc: AttemptFailed) -> None:
        exc.detail = scrub(exc.detail, cand.endpoint)  # it may quote the upstream's client or answer
        record.outcome, record.kind, record.status, record.error = "failed", exc.kind, exc.status, exc.detail
        record.ended = time.monotonic()
        self.failures.append(exc)
        self.health.failure(cand.endpoint.key, exc.kind)
        await self.give_back(cand, 0)
        log.info("attempt failed: %s %s (%s)", cand.endpoint.key, exc.kind, exc.detail)

    def cancelled(self, cand: Candidate) -> None:
        """The client went away during the attempt: neither a success nor a failure."""
        self.health.release(cand.endpoint.key)

    async def give_back(self, cand: Candidate, tokens: int) -> None:
        """Hand back an attempt's share of its upstream's quota, with the real tokens."""
        await self.quota.give_back(cand.endpoint.quotas, tokens)

    def final_error(self) -> GatewayError:
        """The error to answer when every attempt failed."""
        summary = "; ".join(f"{a.provider}: {a.error}" for a in self.records) or "no attempt could be made"
        failures = self.failures
        if not failures and any(a.outcome == "at_quota" for a in self.records):
            return GatewayError(
                503,
                f"every provider is at its quota ({summary})",
                code="upstream_quota_exhausted",
                headers={"retry-after": "1"},
            )
        if not failures or (self.remaining_s <= 0 and failures[-1].kind == "timeout"):
            return GatewayError(504, f"upstream timed out ({summary})", code="upstream_timeout")
        last = failures[-1]
        if all(f.status == 429 for f in failures):
            return GatewayError(
                429,
                f"every provider is rate limited ({summary})",
                code="upstream_rate_limited",
                headers={"retry-after": last.retry_after or "1"},
            )
        if last.kind == "timeout":
            return GatewayError(504, f"upstream timed out ({summary})", code="upstream_timeout")
        if last.kind == "invalid":
            return GatewayError(502, f"invalid answer from upstream ({summary})", code="upstream_invalid_response")
        if last.kind == "connect":
            return GatewayError(
                503,
                f"no provider could be reached ({summary})",
                code="no_provider_available",
                headers={"retry-after": "5"},
            )
        return GatewayError(502, f"upstream error ({summary})", code="upstream_error")


@dataclass(slots=True, kw_only=True)
class Attempts(Failover):
    """The chat API's tries: each attempt sends the chat request as its endpoint takes it."""

    request: ChatRequest

    def traced(self, span: RequestSpan, headers: dict[str, str]) -> None:
        span.request = self.request  # its parameters (and, with content on, its messages) go on the span
        span.attempt(self.records[-1], headers)

    async def send(self, cand: Candidate, stream_usage: bool) -> UpstreamResponse:
        """Send one attempt and check its status; raises AttemptFailed or GatewayError."""
        endpoint = cand.endpoint
        spec = endpoint.provider.spec
        body = request_body(self.request, spec, endpoint.upstream_model, cand.dropped, stream_usage=stream_usage)
        return await self.post(cand, endpoint.provider.chat_url, body)


# --- one JSON answer, any API ----------------------------------------------------

_T = TypeVar("_T")

#: One attempt's URL and JSON body, for its candidate.
Outbound = Callable[[Candidate], tuple[str, bytes]]


async def call_json(failover: Failover, outbound: Outbound, decode: Callable[[bytes], _T]) -> _T:
    """Try candidates in order until one answers with a body ``decode`` reads
    (it raises AttemptFailed for one it cannot); raises the GatewayError to
    send. The served attempt's quota share is handed back when the request is
    accounted for."""
    async for cand, record in failover.tries():
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, failover.remaining_s)):
                url, body = outbound(cand)
                response = await failover.post(cand, url, body)
                try:
                    raw = await response.read()
                finally:
                    await response.close()
            answer = decode(raw)
        except FAILURES as exc:
            await failover.failed(cand, record, as_failure(exc))
            continue
        except GatewayError as exc:
            await failover.rejected(cand, record, exc)
            raise
        record.ended = time.monotonic()
        failover.succeeded(cand, record, record.ended - started)
        return answer
    raise failover.final_error()


# --- non-streamed answers ------------------------------------------------------


@dataclass(slots=True)
class Completion:
    answer: ChatCompletion
    choices: list[ChoiceOut]
    usage: Usage


async def complete(attempts: Attempts, screen: CompletionFilter) -> Completion:
    """Try candidates in order until one answers; raises the GatewayError to send.
    The served attempt's quota share is handed back when the request is accounted for."""
    async for cand, record in attempts.tries():
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, attempts.remaining_s)):
                response = await attempts.send(cand, stream_usage=False)
                try:
                    raw = await response.read()
                finally:
                    await response.close()
            answer = _decode_completion(raw)
        except FAILURES as exc:
            await attempts.failed(cand, record, as_failure(exc))
            continue
        except GatewayError as exc:
            await attempts.rejected(cand, record, exc)
            raise
        elapsed = time.monotonic() - started
        record.ended = time.monotonic()
        attempts.succeeded(cand, record, elapsed)
        done = await _finish_completion(attempts, cand, answer, elapsed, screen)
        if attempts.span is not None and attempts.span.content:
            attempts.span.output = done.choices
        return done
    raise attempts.final_error()


def _decode_completion(raw: bytes) -> ChatCompletion:
    try:
        answer = msgspec.json.decode(raw, type=ChatCompletion)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise AttemptFailed("invalid", "unreadable JSON body") from None
    if not answer.choices:
        raise AttemptFailed("invalid", "answer has no choices")
    return answer


async def _finish_completion(
    attempts: Attempts, cand: Candidate, answer: ChatCompletion, elapsed: float, screen: CompletionFilter
) -> Completion:
    spec = cand.endpoint.provider.spec
    choices = []
    texts = []
    for choice in answer.choices:
        message = choice.message
        content = clean_content(spec, message.content)
        texts.append(content or "")
        results = await screen.check(content or "", choice.content_filter_results or None)
        finish_reason = choice.finish_reason
        if screen.blocked(results):
            content, finish_reason = None, "content_filter"  # Azure's way: no filtered text
        if content is not message.content:
            message = msgspec.structs.replace(message, content=content)
        if message.tool_calls is not UNSET:
            message = msgspec.structs.replace(message, tool_calls=whole_tool_calls(message.tool_calls))
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
    attempts.health.throughput(cand.endpoint.key, usage.completion_tokens, elapsed)
    return Completion(answer, choices, usage)
