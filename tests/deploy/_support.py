"""Shared helpers of the deploy tests: paths, tools, the documented metrics."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The metrics the gateway and the local backend export (README / issue 6),
# as queried: counters with _total, histograms by their base name.
GATEWAY_METRICS = {
    "gateway_requests_total",
    "gateway_request_duration_seconds",
    "gateway_overhead_seconds",
    "gateway_time_to_first_token_seconds",
    "gateway_inter_chunk_seconds",
    "gateway_tokens_total",
    "gateway_cost_usd_total",
    "gateway_upstream_errors_total",
    "gateway_failovers_total",
    "gateway_circuit_state",
    "gateway_endpoint_available",
    "gateway_limit_rejections_total",
    "gateway_limit_store_errors_total",
    "gateway_requests_in_flight",
    "gateway_budget_usd",
    "gateway_config_reloads_total",
}
LOCAL_BACKEND_METRICS = {
    "local_backend_queue_depth",
    "local_backend_batch_size",
    "local_backend_generated_tokens_total",
}
HISTOGRAMS = {
    "gateway_request_duration_seconds",
    "gateway_overhead_seconds",
    "gateway_time_to_first_token_seconds",
    "gateway_inter_chunk_seconds",
}
DOCUMENTED = GATEWAY_METRICS | LOCAL_BACKEND_METRICS

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])((?:gateway|local_backend)_[A-Za-z0-9_:]*)")
_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def metric_names(expr: str) -> set[str]:
    """`gateway_*` / `local_backend_*` identifiers of a PromQL expression (string
    literals such as label values removed), histogram suffixes stripped."""
    names = set()
    for name in _METRIC.findall(_STRING.sub('""', expr)):
        base = _SUFFIX.sub("", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def tool(name: str, *fallbacks: str, apt: str) -> str:
    """A required binary: missing is a failure with a clear message, never a skip."""
    found = shutil.which(name) or next((p for p in fallbacks if os.access(p, os.X_OK)), None)
    if not found:
        pytest.fail(f"`{name}` is not installed (looked on PATH and in {', '.join(fallbacks)}): "
                    f"the deploy tests need it. Install the Debian package: apt-get install -y {apt}",
                    pytrace=False)
    return found
