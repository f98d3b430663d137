"""/metrics across workers, generation records, and the JSON access log."""

from __future__ import annotations

import hashlib
import json

import httpx
import openai
import pytest

from tests.e2e.conftest import GATEWAY_KEY
from tests.e2e.test_limits_e2e import redis_section

V02 = "mistralai/mistral-7b-instruct-v0.2"
ASK = [{"role": "user", "content": "Say hi"}]
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}


def samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def test_metrics_add_up_across_workers(start_gateway, fakes):
    gw = start_gateway(args=["--workers", "2"])
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    fakes["deepinfra"].control("status", status=500, count=1)
    for _ in range(12):
        client.chat.completions.create(model=V02, messages=ASK, extra_body={"provider": {"sort": "price"}})
    for _ in range(3):
        list(client.chat.completions.create(model=V02, messages=ASK, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no/such", messages=ASK)
    text = httpx.get(gw.url + "/metrics").text
    ok = samples(text, "gateway_requests_total")
    assert sum(v for k, v in ok.items() if 'status="200"' in k) == 15  # all workers, added up
    assert sum(v for k, v in ok.items() if 'status="404"' in k) == 1
    assert 'key="e2e"' in next(iter(ok))
    assert sum(samples(text, "gateway_upstream_errors_total").values()) == 1
    assert sum(samples(text, "gateway_failovers_total").values()) == 1
    assert sum(samples(text, "gateway_cost_usd_total").values()) > 0
    assert sum(samples(text, "gateway_tokens_total").values()) > 0
    assert sum(samples(text, "gateway_time_to_first_token_seconds_count").values()) == 3
    assert sum(samples(text, "gateway_overhead_seconds_count").values()) == 16
    assert samples(text, "gateway_requests_in_flight") == {"gateway_requests_in_flight": 0.0}
    available = samples(text, "gateway_endpoint_available")
    assert any('provider="deepinfra"' in k and v == 1.0 for k, v in available.items())
    assert "gateway_circuit_state{" in text
    for secret in ("di-key-e2e", "or-key-e2e", GATEWAY_KEY):
        assert secret not in text


def test_generation_records(start_gateway, fakes):
    gw = start_gateway()
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    fakes["deepinfra"].control("status", status=503, count=1)
    raw = client.chat.completions.with_raw_response.create(model=V02, messages=ASK,
                                                           extra_body={"provider": {"sort": "price"}})
    r = raw.parse()
    assert raw.headers["x-request-id"] == r.id
    rec = httpx.get(f"{gw.base_url}/generation", params={"id": r.id}, headers=AUTH).json()["data"]
    assert rec["id"] == r.id and rec["provider"] == "openrouter" and rec["model"] == V02
    assert rec["tokens_prompt"] == r.usage.prompt_tokens and rec["tokens_completion"] == r.usage.completion_tokens
    assert rec["total_cost"] == pytest.approx(r.usage.model_extra["estimated_cost"])
    assert rec["finish_reason"] == "stop" and rec["latency_ms"] > 0
    assert [a["outcome"] for a in rec["attempts"]] == ["failed", "ok"]
    assert "HTTP 503" in rec["attempts"][0]["error"]
    chunks = list(client.chat.completions.create(model=V02, messages=ASK, stream=True))
    rec = httpx.get(f"{gw.base_url}/generation", params={"id": chunks[0].id}, headers=AUTH).json()["data"]
    assert rec["streamed"] is True and rec["ttft_ms"] is not None and rec["tokens_completion"] > 0
    missing = httpx.get(f"{gw.base_url}/generation", params={"id": "gen-nope"}, headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "generation_not_found"


@pytest.mark.parametrize("workers", [1, 2])
def test_access_log_is_one_json_line_per_request_without_text(start_gateway, workers):
    """With one worker or several: a spawned worker sets up the same JSON log."""
    gw = start_gateway(args=["--workers", str(workers)])
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    secret_prompt = "my-private-prompt-text"
    r = client.chat.completions.create(model=V02, messages=[{"role": "user", "content": secret_prompt}])
    gw.stop()
    lines = [json.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry["logger"] == "gateway.access"]
    assert len(access) == 1
    assert not [entry for entry in lines if entry["logger"] == "uvicorn.access"]  # one line per request, ours
    assert access[0]["id"] == r.id and access[0]["key"] == "e2e" and access[0]["status"] == 200
    assert access[0]["cost_usd"] > 0 and access[0]["duration_ms"] > 0
    assert secret_prompt not in gw.log_text()
    assert "Hello from" not in gw.log_text()


OTHER_KEY = "sk-gw-e2e-other-key"


@pytest.mark.parametrize("store", ["in-process", "redis"])
def test_a_generation_record_is_hidden_from_other_keys(start_gateway, redis_server, store):
    """Key B asking for key A's generation gets the same 404 as for an id that
    does not exist, and the other way round; each key finds its own."""
    extra = "\n".join(["[[auth.keys]]", 'name = "other"',
                       f'sha256 = "{hashlib.sha256(OTHER_KEY.encode()).hexdigest()}"', ""])
    if store == "redis":
        extra += redis_section(redis_server.url)
    gw = start_gateway(extra)
    ids = {}
    for key in (GATEWAY_KEY, OTHER_KEY):
        client = openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
        ids[key] = client.chat.completions.create(model=V02, messages=ASK).id
    for owner, stranger in ((GATEWAY_KEY, OTHER_KEY), (OTHER_KEY, GATEWAY_KEY)):
        own = httpx.get(f"{gw.base_url}/generation", params={"id": ids[owner]},
                        headers={"authorization": f"Bearer {owner}"})
        assert own.status_code == 200 and own.json()["data"]["id"] == ids[owner]
        theirs = httpx.get(f"{gw.base_url}/generation", params={"id": ids[owner]},
                           headers={"authorization": f"Bearer {stranger}"})
        assert theirs.status_code == 404, theirs.text
        assert theirs.json()["error"]["code"] == "generation_not_found"
        assert "data" not in theirs.json()  # nothing of the record
