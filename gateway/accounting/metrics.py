"""Prometheus metrics, summed over every worker process.

``gateway serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before any worker starts, so each worker writes its samples there and
``/metrics`` (answered by any worker) adds them up. Labels stay low in
cardinality: model, provider, endpoint, key name, status, never a request id.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# *_created series double the output and no dashboard reads them. (prometheus_client leaves it unannotated.)
disable_created_metrics()  # type: ignore[no-untyped-call]
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

REQUESTS = Counter(
    "gateway_requests",
    "Requests answered, per API (chat, responses, messages, embeddings)",
    ["api", "model", "provider", "key", "status"],
)
DURATION = Histogram(
    "gateway_request_duration_seconds",
    "Request time, start to last byte",
    ["api", "model", "provider"],
    buckets=_LATENCY,
)
OVERHEAD = Histogram(
    "gateway_overhead_seconds", "Gateway time: request time minus time spent in upstream attempts", buckets=_FAST
)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "Streams: request start to the first chunk sent",
    ["model", "provider"],
    buckets=_LATENCY,
)
INTER_CHUNK = Histogram(
    "gateway_inter_chunk_seconds", "Streams: time between chunks sent", ["model", "provider"], buckets=(*_FAST, 2.5, 10)
)
TOKENS = Counter("gateway_tokens", "Tokens used", ["model", "provider", "key", "kind"])
COST = Counter("gateway_cost_usd", "Estimated cost in USD", ["model", "provider", "key"])
UPSTREAM_ERRORS = Counter("gateway_upstream_errors", "Failed upstream attempts", ["provider", "type"])
FAILOVERS = Counter("gateway_failovers", "Attempts made after an earlier attempt of the same request failed", ["model"])
CIRCUIT = Gauge(
    "gateway_circuit_state",
    "Circuit per endpoint: 0 closed, 1 half-open, 2 open",
    ["provider", "endpoint"],
    multiprocess_mode="livemax",
)
AVAILABLE = Gauge(
    "gateway_endpoint_available",
    "1 when the endpoint can take traffic now",
    ["model", "provider", "endpoint"],
    multiprocess_mode="livemin",
)
LIMIT_REJECTIONS = Counter("gateway_limit_rejections", "Requests refused by a key's limits", ["key", "reason"])
LIMIT_STORE_ERRORS = Counter("gateway_limit_store_errors", "Rate-limit store (Redis) calls that failed or timed out")
IN_FLIGHT = Gauge("gateway_requests_in_flight", "Requests being served", multiprocess_mode="livesum")
BUDGET = Gauge("gateway_budget_usd", "Configured budget per key", ["key", "period"], multiprocess_mode="livemax")
#: Config reloads (SIGHUP, ``POST /admin/reload``), per worker: ``ok`` applied, ``error`` kept the old config.
CONFIG_RELOADS = Counter("gateway_config_reloads", "Config reloads, by result (ok or error)", ["result"])


def render() -> tuple[bytes, str]:
    """The exposition text, across workers when running multi-process."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
