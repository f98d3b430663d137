"""Accounting for finished requests, behind the responses.

When a request ends, its key's reservation is settled with the real usage
and cost, and its generation record is written, both as deferred Redis
commands (``gateway/redis_pipeline.py``): they ride with the next admission's
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
import time
from collections import Counter

from gateway.accounting.generations import GenerationStore
from gateway.limits.limiter import Limiter
from gateway.accounting.logs import log_lines
from gateway.accounting.metrics import COST, DURATION, OVERHEAD, REQUESTS, TOKENS, TTFT
from gateway.accounting.trace import Trace, access_log

log = logging.getLogger("gateway")


def observe(batch: list[Trace]) -> None:
    """Metrics for a batch of finished requests, and their access-log lines."""
    requests: Counter[tuple[str, ...]] = Counter()
    tokens: Counter[tuple[str, ...]] = Counter()
    cost: Counter[tuple[str, ...]] = Counter()
    lines = []
    for trace in batch:
        model, provider = trace.labels()
        duration, overhead = trace.durations()
        requests[(model, provider, trace.key, str(trace.status))] += 1
        DURATION.labels(model, provider).observe(duration)
        OVERHEAD.observe(overhead)
        if trace.ttft_s is not None:
            TTFT.labels(model, provider).observe(trace.ttft_s)
        usage = trace.usage
        if usage is not None:
            tokens[(model, provider, trace.key, "prompt")] += usage.prompt_tokens
            tokens[(model, provider, trace.key, "completion")] += usage.completion_tokens
            if usage.estimated_cost:
                cost[(model, provider, trace.key)] += usage.estimated_cost
        lines.append(trace.log_fields(model, provider, duration, overhead))
    for labels, n in requests.items():
        REQUESTS.labels(*labels).inc(n)
    for labels, n in tokens.items():
        TOKENS.labels(*labels).inc(n)
    for labels, usd in cost.items():
        COST.labels(*labels).inc(usd)
    log_lines(access_log, "request", lines)


def _record_failed(generation_id: str, future: asyncio.Future) -> None:
    exc = None if future.cancelled() else future.exception()
    if exc is not None:  # a lost record must not fail anything else
        log.warning("generation record %s not stored (%s)", generation_id, type(exc).__name__)


class Accountant:
    """Settles and records each finished request at once; observes them in batches."""

    def __init__(self, limiter: Limiter, generations: GenerationStore, interval_s: float = 0.005) -> None:
        self.limiter = limiter
        self.generations = generations
        self.interval_s = interval_s
        self._queue: list[Trace] = []
        self._timer: asyncio.TimerHandle | None = None

    def add_after_response(self, trace: Trace) -> None:
        """``add``, once the current task has written its response: called
        while a reply is being returned, it costs that reply nothing. It still
        runs before this worker reads the client's next request (the loop runs
        callbacks scheduled now before the I/O that follows)."""
        asyncio.get_running_loop().call_soon(self.add, trace)

    def add(self, trace: Trace) -> None:
        trace.ended = time.perf_counter()  # its durations, whenever its batch is observed
        usage = trace.usage
        if trace.admission is not None:
            self.limiter.settle_key_soon(trace.admission, usage.total_tokens if usage else 0,
                                         usage.estimated_cost if usage else None)
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
            except Exception:  # noqa: BLE001 - never let metrics break the worker
                log.exception("metrics for %d requests failed", len(batch))
