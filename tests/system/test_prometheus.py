"""A real Prometheus server scrapes a running gateway; PromQL over the documented metrics returns data."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import GATEWAY_KEY
from tests.fakes.servers import free_port
from tests.system.binaries import require

V02 = "mistralai/mistral-7b-instruct-v0.2"

QUERIES = [
    "sum(gateway_requests_total)",
    'sum by (model, provider, status) (increase(gateway_requests_total[1m]))',
    "histogram_quantile(0.99, sum by (le) (rate(gateway_overhead_seconds_bucket[1m])))",
    "histogram_quantile(0.5, sum by (le, model) (rate(gateway_request_duration_seconds_bucket[1m])))",
    "histogram_quantile(0.5, sum by (le) (rate(gateway_time_to_first_token_seconds_bucket[1m])))",
    "sum by (kind) (gateway_tokens_total)",
    "sum by (key, model) (gateway_cost_usd_total)",
    "sum by (provider, type) (gateway_upstream_errors_total)",
    "sum(gateway_failovers_total)",
    "max by (endpoint) (gateway_circuit_state)",
    "sum by (model) (gateway_endpoint_available)",
    "sum(gateway_requests_in_flight)",
]


@pytest.fixture
def prometheus():
    binary = require("prometheus")
    started = []

    def start(target: str) -> str:
        d = Path(tempfile.mkdtemp(prefix="gw-prom-"))
        (d / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: gateway\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        port = free_port()
        proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_prometheus_scrapes_the_documented_metrics(start_gateway, fakes, prometheus):
    gw = start_gateway(args=["--workers", "2"])
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    url = prometheus(f"127.0.0.1:{gw.port}")
    fakes["deepinfra"].control("status", status=500, count=1)
    deadline = time.monotonic() + 60
    missing = QUERIES
    while time.monotonic() < deadline and missing:
        client.chat.completions.create(model=V02, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"provider": {"sort": "price"}})
        list(client.chat.completions.create(model=V02, messages=[{"role": "user", "content": "hi"}], stream=True))
        time.sleep(0.5)
        missing = [q for q in missing
                   if not httpx.get(url + "/api/v1/query", params={"query": q}).json()["data"]["result"]]
    assert not missing, f"queries with no data: {missing}"
    up = httpx.get(url + "/api/v1/query", params={"query": "up"}).json()["data"]["result"]
    assert up[0]["value"][1] == "1"
