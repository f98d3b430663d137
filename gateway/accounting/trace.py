"""One request's trace: what it asked, who served it, what it cost, how long it took.

The pipeline writes the trace as the request goes; at the end the accountant
turns it into metrics, one access-log line and a generation record, so all
three always agree and no metric is written on the request path.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.accounting.generations import AttemptOut, Generation
from gateway.limits.limiter import Admission
from gateway.protocol import ChatRequest, ChoiceOut, Usage
from gateway.routing.router import Candidate

access_log = logging.getLogger("gateway.access")


@dataclass(slots=True)
class AttemptRecord:
    """What one attempt at an endpoint did."""

    provider: str
    endpoint: str
    model: str
    #: pending | ok | failed | failed_mid_stream | rejected | at_quota
    outcome: str = "pending"
    #: For failures: connect | timeout | status | invalid | stream.
    kind: str | None = None
    status: int | None = None
    error: str | None = None
    latency_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    #: With tracing on: the id of this attempt's span, sent upstream in its ``traceparent``.
    span_id: int | None = None

    @property
    def duration_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started


@dataclass(slots=True)
class RequestSpan:
    """With tracing on, the request's place in a distributed trace (W3C trace
    context). Its ids are chosen when the request begins, so that each
    upstream attempt can name its own span in the ``traceparent`` it sends;
    the spans themselves are built from the finished trace
    (``gateway/accounting/tracing.py``)."""

    trace_id: int
    span_id: int
    #: The caller's span, from its ``traceparent``; None when this request starts the trace.
    parent_id: int | None
    sampled: bool
    #: The caller's ``tracestate``, passed on upstream unchanged.
    tracestate: str | None
    #: ``monotonic()`` when the request began: attempts are timed on that clock.
    began: float
    #: ``[tracing] content``: prompt and completion text go on the span.
    content: bool
    #: The chat request (its parameters, and its messages when ``content``); None for embeddings.
    request: ChatRequest | None = None
    #: A plain answer's choices, kept when ``content``.
    output: Sequence[ChoiceOut] | None = None

    def attempt(self, record: AttemptRecord, headers: dict[str, str]) -> None:
        """Give the attempt a span id and put it, in a ``traceparent``, in the headers sent upstream."""
        span_id = record.span_id = random.getrandbits(64) or 1
        headers["traceparent"] = f"00-{self.trace_id:032x}-{span_id:016x}-{'01' if self.sampled else '00'}"
        if self.tracestate:
            headers["tracestate"] = self.tracestate


def traces_endpoint(env: Mapping[str, str]) -> str | None:
    """Where spans go (OTLP/HTTP), as the OpenTelemetry variables say; None
    when no endpoint is set, or the SDK or the traces exporter is turned off:
    then tracing is off and its code is never imported."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if endpoint:
        return endpoint
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return base.rstrip("/") + "/v1/traces" if base else None


#: The span of the request being served (set by the tracer as the request
#: begins; never set while tracing is off). The failover loop reads it once per request.
REQUEST_SPAN: ContextVar[RequestSpan | None] = ContextVar("gateway_request_span", default=None)


class Tracer(Protocol):
    """What the HTTP layer and the accountant call when tracing is on
    (``gateway/accounting/tracing.py``, imported only then)."""

    def incoming(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Read the caller's W3C trace context from the request headers."""
        ...

    def begin(self, trace: Trace) -> None:
        """Give a new request its span ids."""
        ...

    def export(self, batch: list[Trace]) -> None:
        """Hand finished requests' spans to the exporter."""
        ...

    def shutdown(self) -> None:
        """Send what is queued and stop the exporter."""
        ...


@dataclass(slots=True)
class Trace:
    id: str
    key: str = ""
    #: Which API the request came in on: chat, responses, messages, embeddings.
    api: str = "chat"
    requested_model: str | None = None
    streamed: bool = False
    started: float = field(default_factory=time.perf_counter)
    created_at: float = field(default_factory=time.time)
    status: int = 200
    error: str | None = None
    #: Why the key's limits refused the request (``requests``, ``budget_day``, ...).
    refusal: str | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    ttft_s: float | None = None
    #: Streams: seconds between the chunks sent.
    chunk_gaps: list[float] = field(default_factory=list)
    admission: Admission | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    served: Candidate | None = None
    #: perf_counter() when the request ended (set by the accountant).
    ended: float | None = None
    #: With tracing on: the request's span ids.
    span: RequestSpan | None = None

    def labels(self) -> tuple[str, str]:
        """(model, provider) of whoever served, or of what was asked."""
        served = self.served
        if served is not None:
            return served.model.id, served.endpoint.provider.name
        return self.requested_model or "", ""

    def elapsed(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    def durations(self) -> tuple[float, float]:
        """(request time, gateway overhead): the time minus what upstream attempts took."""
        duration = self.elapsed()
        upstream = sum(a.duration_s for a in self.attempts)
        return duration, max(duration - upstream, 0.0)

    def log_fields(self, model: str, provider: str, duration: float, overhead: float) -> dict[str, Any]:
        """The access-log line's fields. Never prompt or completion text."""
        usage = self.usage
        return {
            "id": self.id,
            "api": self.api,
            "key": self.key,
            "model": model,
            "provider": provider,
            "status": self.status,
            "stream": self.streamed,
            "attempts": len(self.attempts),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "cost_usd": usage.estimated_cost if usage else None,
            "duration_ms": round(duration * 1000, 2),
            "overhead_ms": round(overhead * 1000, 3),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 2),
            "finish_reason": self.finish_reason,
            "error": self.error,
        }

    def record(self) -> Generation:
        model, provider = self.labels()
        usage = self.usage
        return Generation(
            id=self.id,
            key=self.key,
            api=self.api,
            created_at=self.created_at,
            model=model or None,
            provider=provider or None,
            requested_model=self.requested_model,
            streamed=self.streamed,
            status=self.status,
            finish_reason=self.finish_reason,
            tokens_prompt=usage.prompt_tokens if usage else 0,
            tokens_completion=usage.completion_tokens if usage else 0,
            total_cost=usage.estimated_cost if usage else None,
            latency_ms=round(self.elapsed() * 1000, 2),
            ttft_ms=None if self.ttft_s is None else round(self.ttft_s * 1000, 2),
            error=self.error,
            attempts=[
                AttemptOut(
                    a.provider,
                    a.endpoint,
                    a.outcome,
                    a.status,
                    a.error,
                    None if a.latency_s is None else round(a.latency_s * 1000, 2),
                )
                for a in self.attempts
            ],
        )
