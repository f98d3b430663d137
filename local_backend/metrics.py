"""Prometheus metrics of the local backend, served at GET /metrics.

The engine thread only bumps plain ints in an `EngineStats` (local_backend.stats:
one int add per token, a few per request); the exposition is built at scrape time by
a custom collector that reads them through the narrow `EngineView` protocol, so
nothing prometheus-related runs in the decode loop and this module never imports
the engine.

We deliberately use no prometheus_client Counter/Gauge/Histogram objects: the
gateway starts us with its own PROMETHEUS_MULTIPROC_DIR in the environment, and
those objects would then write their samples into the gateway's multiprocess
directory. A private CollectorRegistry also keeps the page free of process_* /
python_* series, so the gateway can append it to its own page without duplicate
names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .stats import TTFT_BUCKETS, EngineStats


class EngineView(Protocol):
    """What a scrape reads from the engine (`local_backend.engine.Engine` provides it)."""

    @property
    def stats(self) -> EngineStats: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def batch_size(self) -> int: ...


class EngineCollector:
    """Reads the engine (or zeros while the model loads) at scrape time."""

    def __init__(self, get_engine: Callable[[], EngineView | None]) -> None:
        self.get_engine = get_engine

    def collect(self) -> Iterator[Metric]:
        engine = self.get_engine()
        stats = engine.stats if engine is not None else EngineStats()
        yield GaugeMetricFamily(
            "local_backend_queue_depth",
            "Requests waiting for a batch slot",
            value=engine.num_waiting if engine is not None else 0,
        )
        yield GaugeMetricFamily(
            "local_backend_batch_size",
            "Sequences in the running decode batch",
            value=engine.batch_size if engine is not None else 0,
        )
        yield CounterMetricFamily(
            "local_backend_generated_tokens", "Completion tokens generated", value=stats.generated_tokens
        )
        req = CounterMetricFamily(
            "local_backend_requests",
            "Requests by outcome: finish reason, aborted (client left), rejected (queue full)",
            labels=["status"],
        )
        for status, n in dict(stats.requests).items():
            req.add_metric([status], n)
        yield req
        counts = list(stats.ttft_counts)
        cum, buckets = 0, []
        for bound, n in zip((*map(str, TTFT_BUCKETS), "+Inf"), counts, strict=True):
            cum += n
            buckets.append((bound, cum))
        yield HistogramMetricFamily(
            "local_backend_time_to_first_token_seconds",
            "Request arrival to its first generated token",
            buckets=buckets,
            sum_value=stats.ttft_sum,
        )


def make_registry(get_engine: Callable[[], EngineView | None]) -> CollectorRegistry:
    """A private registry (no process_*/python_* collectors) holding only the engine collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(get_engine))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition page and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
