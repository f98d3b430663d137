"""One request's trace: what it asked, who served it, what it cost, how long it took.

The pipeline writes the trace as the request goes; at the end the accountant
turns it into metrics, one access-log line and a generation record, so all
three always agree and no metric is written on the request path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.accounting.generations import AttemptOut, Generation
from gateway.limits.limiter import Admission
from gateway.protocol import Usage
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

    @property
    def duration_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started


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
