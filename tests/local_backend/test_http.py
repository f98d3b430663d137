"""The HTTP layer in-process over the tiny model: status codes and OpenAI error shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from local_backend.engine import QueueFull
from tests.local_backend.conftest import in_process_server

NAME = "tiny"


@pytest.fixture
async def client(tiny_model_dir: Path):
    async with in_process_server(tiny_model_dir, NAME, max_batch=1, max_queue=1, max_model_len=128) as c:
        yield c


def body(**kw) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, **kw}


async def test_health_models_and_completion(client: AsyncTestClient) -> None:
    assert (await client.get("/health")).status_code == 200
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == [NAME]
    r = await client.post("/v1/chat/completions", json=body(max_tokens=5, ignore_eos=True))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 5


async def test_stream_with_usage(client: AsyncTestClient) -> None:
    r = await client.post("/v1/chat/completions", json=body(
        max_tokens=4, ignore_eos=True, stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("payload,status,param,code", [
    (body(model="nope"), 404, "model", "model_not_found"),
    (body(max_tokens=10_000), 400, "messages", "context_length_exceeded"),
    (body(temperature="hot"), 400, "temperature", None),
    (body(top_p=5), 400, "top_p", None),
    (body(n=2), 400, "n", None),
    ({"model": NAME}, 400, "messages", None),
])
async def test_errors_are_openai_shaped(client: AsyncTestClient, payload, status, param, code) -> None:
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    if code:
        assert err["code"] == code


async def test_full_queue_is_503_with_retry_after(client: AsyncTestClient, monkeypatch) -> None:
    """The engine's QueueFull (tested for real in test_engine) becomes 503 + Retry-After."""
    engine = client.app.state.local_backend.backend.engine

    def full(*args, **kwargs):
        raise QueueFull(retry_after=7)

    monkeypatch.setattr(engine, "submit", full)
    r = await client.post("/v1/chat/completions", json=body(max_tokens=1))
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "queue_full"


def scrape(text: str) -> dict[str, float]:
    """Exposition text -> {sample name with labels: value}, via prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def test_metrics_page(client: AsyncTestClient) -> None:
    before = await client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    m0 = scrape(before.text)
    r = await client.post("/v1/chat/completions", json=body(max_tokens=6, ignore_eos=True, stream=True))
    assert r.status_code == 200
    after = await client.get("/metrics")
    m1 = scrape(after.text)
    for name in ("local_backend_queue_depth", "local_backend_batch_size", "local_backend_generated_tokens_total",
                 "local_backend_requests_total{status=length}", "local_backend_time_to_first_token_seconds_count",
                 "local_backend_time_to_first_token_seconds_sum",
                 "local_backend_time_to_first_token_seconds_bucket{le=+Inf}"):
        assert name in m1, name
    assert m1["local_backend_generated_tokens_total"] - m0["local_backend_generated_tokens_total"] == 6
    assert m1["local_backend_requests_total{status=length}"] - m0["local_backend_requests_total{status=length}"] == 1
    assert m1["local_backend_time_to_first_token_seconds_count"] == m0["local_backend_time_to_first_token_seconds_count"] + 1
    assert m1["local_backend_queue_depth"] == 0 and m1["local_backend_batch_size"] == 0
    # Only our own series: the gateway appends this page to its own, so no process_*/python_* duplicates.
    assert all(k.startswith("local_backend_") for k in m1)
