"""Prometheus metrics of the local backend, served at GET /metrics.

The engine thread only bumps plain ints in an `EngineStats` (one int add per token,
a few per request); the exposition is built at scrape time by a custom collector
that reads them, so nothing prometheus-related runs in the decode loop.

We deliberately use no prometheus_client Counter/Gauge/Histogram objects: the
gateway starts us with its own PROMETHEUS_MULTIPROC_DIR in the environment, and
those objects would then write their samples into the gateway's multiprocess
directory. A private CollectorRegistry also keeps the page free of process_* /
python_* series, so the gateway can append it to its own page without duplicate
names.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from .engine import Engine

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Fixed set, pre-seeded at 0: the dict never changes size, so a scrape can copy it
# while the engine thread updates it.
STATUSES = ("stop", "length", "error", "aborted", "rejected")


class EngineStats:
    """Counters the engine thread updates; `rejected` is bumped under the engine's lock."""

    def __init__(self) -> None:
        self.generated_tokens = 0
        self.requests = dict.fromkeys(STATUSES, 0)
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # last one is +Inf
        self.ttft_sum = 0.0

    def finished(self, status: str) -> None:
        self.requests[status] += 1

    def first_token(self, seconds: float) -> None:
        self.ttft_counts[bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds


class EngineCollector:
    """Reads the engine (or zeros while the model loads) at scrape time."""

    def __init__(self, get_engine: Callable[[], Engine | None]) -> None:
        self.get_engine = get_engine

    def collect(self) -> Iterator[Metric]:
        engine = self.get_engine()
        stats = engine.stats if engine is not None else EngineStats()
        yield GaugeMetricFamily("local_backend_queue_depth", "Requests waiting for a batch slot",
                                value=engine.num_waiting if engine is not None else 0)
        yield GaugeMetricFamily("local_backend_batch_size", "Sequences in the running decode batch",
                                value=engine.batch_size if engine is not None else 0)
        yield CounterMetricFamily("local_backend_generated_tokens", "Completion tokens generated",
                                  value=stats.generated_tokens)
        req = CounterMetricFamily("local_backend_requests", "Requests by outcome: finish reason, "
                                  "aborted (client left), rejected (queue full)", labels=["status"])
        for status, n in dict(stats.requests).items():
            req.add_metric([status], n)
        yield req
        counts = list(stats.ttft_counts)
        cum, buckets = 0, []
        for bound, n in zip((*map(str, TTFT_BUCKETS), "+Inf"), counts):
            cum += n
            buckets.append((bound, cum))
        yield HistogramMetricFamily("local_backend_time_to_first_token_seconds",
                                    "Request arrival to its first generated token",
                                    buckets=buckets, sum_value=stats.ttft_sum)


def make_registry(get_engine: Callable[[], Engine | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(get_engine))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
