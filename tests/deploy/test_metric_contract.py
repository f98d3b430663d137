"""The metric list the dashboard and alerts are checked against is the one the
gateway really exports, and the tool check fails (never skips) without a binary."""

from __future__ import annotations

import pytest

from ._support import GATEWAY_METRICS, HISTOGRAMS, metric_names, tool


def test_gateway_exports_the_documented_metrics():
    from prometheus_client import REGISTRY

    import gateway.accounting.metrics  # noqa: F401  (registers the gateway's metrics)

    exported = {}
    for family in REGISTRY.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        exported[name] = family.type
    missing = GATEWAY_METRICS - set(exported)
    assert not missing, f"documented but not exported by gateway/metrics.py: {sorted(missing)}"
    for name in HISTOGRAMS:
        assert exported[name] == "histogram", name


def test_metric_names_parser():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(gateway_overhead_seconds_bucket{model="gateway_x"}[5m])))'
            ' / sum(rate(gateway_requests_total[5m])) + on() local_backend_queue_depth'
            ' + gateway_requests_count')
    assert metric_names(expr) == {"gateway_overhead_seconds", "gateway_requests_total",
                                  "local_backend_queue_depth", "gateway_requests_count"}


def test_a_missing_tool_fails_with_a_clear_message():
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y no-such-package"):
        tool("no-such-binary-for-tests", "/nonexistent/no-such-binary-for-tests", apt="no-such-package")
