"""Accounting for requests: the one place their metrics, logs, settlements and records are written.

A request's trace starts with ``begin`` and ends with ``add``, plain and
streamed answers alike. When a request ends, its key's reservation is settled with the real usage
and cost, and its generation record is written, both as deferred Redis
commands (``gateway/storage/autopipeline.py``): they ride with the next admission's
round trip, or leave within 5 ms, and a pipeline runs in order, so the
client's next request is admitted against the settled figures.

Metrics and access-log lines are emitted every ``interval_s`` for the
requests finished since: counters summed per label set, so one lock and one
write per series for the whole batch, and none of it on the path of the next
request. ``/metrics`` flushes this worker's batch first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections import Counter

from gateway.accounting.generations import GenerationStore
from gateway.accounting.logs import log_lines
from gateway.accounting.metrics import (
    COST,
    DURATION,
    FAILOVERS,
    IN_FLIGHT,
    INTER_CHUNK,
    LIMIT_REJECTIONS,
    OVERHEAD,
    REQUESTS,
    TOKENS,
    TTFT,
    UPSTREAM_ERRORS,
)
from gateway.accounting.trace import Trace, Tracer, access_log
from gateway.control.ledger import Ledger
from gateway.limits.limiter import Limiter

log = logging.getLogger("gateway")


def observe(batch: list[Trace]) -> None:
    """Metrics for a batch of finished requests, and their access-log lines."""
    requests: Counter[tuple[str, ...]] = Counter()
    tokens: Counter[tuple[str, ...]] = Counter()
    cost: dict[tuple[str, ...], float] = {}
    refusals: Counter[tuple[str, str]] = Counter()
    errors: Counter[tuple[str, str]] = Counter()
    failovers: Counter[str] = Counter()
    lines = []
    for trace in batch:
        model, provider = trace.labels()
        duration, overhead = trace.durations()
        requests[(trace.api, model, provider, trace.key, str(trace.status))] += 1
        DURATION.labels(trace.api, model, provider).observe(duration)
        OVERHEAD.observe(overhead)
        if trace.ttft_s is not None:
            TTFT.labels(model, provider).observe(trace.ttft_s)
        if trace.chunk_gaps:
            gaps = INTER_CHUNK.labels(model, provider)
            for gap in trace.chunk_gaps:
                gaps.observe(gap)
        if trace.refusal is not None:
            refusals[(trace.key, trace.refusal)] += 1
        failed_before = False
        for a in trace.attempts:
            if a.outcome == "at_quota":
                continue  # skipped, never tried
            if failed_before:
                failovers[a.model] += 1
            if a.outcome == "failed":
                failed_before = True
                errors[(a.provider, a.kind or "")] += 1
            elif a.outcome == "failed_mid_stream":
                errors[(a.provider, "stream")] += 1
        usage = trace.usage
        if usage is not None:
            tokens[(model, provider, trace.key, "prompt")] += usage.prompt_tokens
            tokens[(model, provider, trace.key, "completion")] += usage.completion_tokens
            if usage.estimated_cost:
                priced = (model, provider, trace.key)
                cost[priced] = cost.get(priced, 0.0) + usage.estimated_cost
        lines.append(trace.log_fields(model, provider, duration, overhead))
    for labels, n in requests.items():
        REQUESTS.labels(*labels).inc(n)
    for labels, n in tokens.items():
        TOKENS.labels(*labels).inc(n)
    for labels, usd in cost.items():
        COST.labels(*labels).inc(usd)
    for (key, reason), n in refusals.items():
        LIMIT_REJECTIONS.labels(key, reason).inc(n)
    for (provider, kind), n in errors.items():
        UPSTREAM_ERRORS.labels(provider, kind).inc(n)
    for model_id, n in failovers.items():
        FAILOVERS.labels(model_id).inc(n)
    log_lines(access_log, "request", lines)


def _record_failed(generation_id: str, future: asyncio.Future[object]) -> None:
    exc = None if future.cancelled() else future.exception()
    if exc is not None:  # a lost record must not fail anything else
        log.warning("generation record %s not stored (%s)", generation_id, type(exc).__name__)


class Accountant:
    """Settles and records each finished request at once; observes them in batches."""

    def __init__(
        self, limiter: Limiter, generations: GenerationStore, interval_s: float = 0.005, ledger: Ledger | None = None
    ) -> None:
        self.limiter = limiter
        self.generations = generations
        #: The spend ledger: one aggregate per request served with usage (None: not kept).
        self.ledger = ledger
        self.interval_s = interval_s
        self._queue: list[Trace] = []
        #: Requests of this worker begun and not yet accounted for (streams until they end).
        self.in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        #: OpenTelemetry spans, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (``state.py``).
        self.tracer: Tracer | None = None

    def begin(self) -> Trace:
        """A new request's trace; it is in flight until ``add``."""
        IN_FLIGHT.inc()
        self.in_flight += 1
        trace = Trace(id="gen-" + secrets.token_hex(12))
        if self.tracer is not None:
            self.tracer.begin(trace)
        return trace

    def add_after_response(self, trace: Trace) -> None:
        """``add``, once the current task has written its response: called
        while a reply is being returned, it costs that reply nothing. It still
        runs before this worker reads the client's next request (the loop runs
        callbacks scheduled now before the I/O that follows)."""
        asyncio.get_running_loop().call_soon(self.add, trace)

    def add(self, trace: Trace) -> None:
        """The request has ended: settle its key's reservation, store its record,
        and queue its metrics and log line."""
        trace.ended = time.perf_counter()  # its durations, whenever its batch is observed
        IN_FLIGHT.dec()
        self.in_flight -= 1
        usage = trace.usage
        if trace.admission is not None:
            self.limiter.settle_key_soon(
                trace.admission, usage.total_tokens if usage else 0, usage.estimated_cost if usage else None
            )
        served = trace.served
        if usage is not None and served is not None and self.ledger is not None:
            # Once per request, for what served it; failed attempts cost nothing.
            model = served.model.id
            self.ledger.add(trace.key, model, usage.prompt_tokens, usage.completion_tokens, usage.estimated_cost)
        pending = self.generations.put_soon(trace.record())
        if pending is not None:
            pending.add_done_callback(functools.partial(_record_failed, trace.id))
        self._queue.append(trace)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self.flush)

    def flush(self) -> None:
        """Metrics and log lines for everything queued, now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        if batch:
            try:
                observe(batch)
            except Exception:
                log.exception("metrics for %d requests failed", len(batch))
            if self.tracer is not None:
                try:
                    self.tracer.export(batch)
                except Exception:
                    log.exception("spans for %d requests failed", len(batch))
