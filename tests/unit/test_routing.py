"""Routing rules: price order, context fit, preferences, health, failover."""

from __future__ import annotations

import collections
import json

import httpx
import msgspec
import pytest
import respx

from gateway.errors import GatewayError
from gateway.protocol import ChatRequest
from tests.unit.conftest import DEEPINFRA, OPENROUTER, V02, chat, completion, make_gateway


def plan(gw, **body):
    request = msgspec.convert({"messages": [{"role": "user", "content": "Hello!"}], **body}, ChatRequest)
    return [c.endpoint.provider.name for c in gw.router.plan(request)]


def test_default_order_is_weighted_by_inverse_square_price():
    gw = make_gateway()
    firsts = collections.Counter(plan(gw, model=V02)[0] for _ in range(2000))
    # deepinfra $0.14/Mtok vs openrouter $0.36: weights 1/0.14^2 : 1/0.36^2 = 0.869 : 0.131
    share = firsts["deepinfra"] / 2000
    assert 0.83 < share < 0.91, firsts


def test_local_fallback_comes_last():
    gw = make_gateway(env={"DEEPINFRA_TOKEN": "k", "OPENROUTER_API_KEY": "k", "GATEWAY_LOCAL_URL": "http://127.0.0.1:9/v1"})
    # A backend the gateway started is not a candidate until its /health answers.
    assert plan(gw, model=V02, provider={"sort": "price"}) == ["deepinfra", "openrouter"]
    gw.catalog.providers["local"].ready = True
    assert plan(gw, model=V02, provider={"sort": "price"}) == ["deepinfra", "openrouter", "local"]
    assert plan(gw, model=V02, provider={"sort": "price", "allow_fallbacks": False}) == ["deepinfra", "openrouter"]


def test_sort_and_suffixes_are_deterministic():
    gw = make_gateway()
    assert plan(gw, model=V02, provider={"sort": "price"}) == ["deepinfra", "openrouter"]
    assert plan(gw, model=V02 + ":floor") == ["deepinfra", "openrouter"]
    gw.health.throughput("openrouter:mistralai/mistral-7b-instruct-v0.2", 100, 1.0)
    gw.health.throughput("deepinfra:mistralai/Mistral-7B-Instruct-v0.2", 10, 1.0)
    assert plan(gw, model=V02 + ":nitro") == ["openrouter", "deepinfra"]
    gw.health.success("openrouter:mistralai/mistral-7b-instruct-v0.2", 0.9)
    gw.health.success("deepinfra:mistralai/Mistral-7B-Instruct-v0.2", 0.1)
    assert plan(gw, model=V02, provider={"sort": "latency"}) == ["deepinfra", "openrouter"]


def test_provider_preferences():
    gw = make_gateway()
    assert plan(gw, model=V02, provider={"only": ["OpenRouter"]}) == ["openrouter"]
    assert plan(gw, model=V02, provider={"ignore": ["deepinfra"]}) == ["openrouter"]
    assert plan(gw, model=V02, provider={"order": ["openrouter"], "sort": "price"}) == ["openrouter", "deepinfra"]
    assert plan(gw, model=V02, provider={"order": ["openrouter"], "allow_fallbacks": False}) == ["openrouter"]
    assert plan(gw, model=V02, provider={"max_price": {"prompt": 0.1}}) == ["deepinfra"]
    with pytest.raises(GatewayError) as err:
        plan(gw, model=V02, provider={"max_price": {"completion": 0.01}})
    assert err.value.status == 404 and err.value.code == "no_endpoints_found"


def test_require_parameters_keeps_only_endpoints_that_take_them_all():
    gw = make_gateway()
    # top_k: OpenRouter lists it, DeepInfra v0.2 does not.
    assert plan(gw, model=V02, top_k=5, provider={"require_parameters": True}) == ["openrouter"]
    # n=2 is fine on DeepInfra; n=3 is a value it cannot take, and OpenRouter has no n.
    assert plan(gw, model=V02, n=2, provider={"require_parameters": True}) == ["deepinfra"]
    with pytest.raises(GatewayError):
        plan(gw, model=V02, n=3, provider={"require_parameters": True})


def test_context_window_filters_endpoints():
    gw = make_gateway()
    words = "word " * 3000  # ~3000 tokens: fits 32k, not v0.1's 4096 with max_tokens 2000
    assert plan(gw, model="mistralai/mistral-7b-instruct-v0.1", messages=[{"role": "user", "content": words}],
                max_tokens=1000) == ["openrouter"]
    with pytest.raises(GatewayError) as err:
        plan(gw, model="mistralai/mistral-7b-instruct-v0.1", messages=[{"role": "user", "content": words}],
             max_tokens=2000)
    assert err.value.status == 400 and err.value.code == "context_length_exceeded"


def test_exact_count_only_near_the_limit(monkeypatch):
    from gateway.routing import tokens

    calls = []
    real = tokens.count_prompt
    monkeypatch.setattr(tokens, "count_prompt", lambda *a: calls.append(1) or real(*a))
    gw = make_gateway()
    plan(gw, model=V02, max_tokens=100)
    assert calls == []  # the byte bound fits 32k easily
    plan(gw, model="mistralai/mistral-7b-instruct-v0.1", messages=[{"role": "user", "content": "hi " * 1400}],
         max_tokens=100)
    assert calls == [1]  # 4.2 KB of bytes does not obviously fit 4096 - 100: counted once


def test_model_ids_are_case_insensitive_and_provider_ids_are_aliases():
    gw = make_gateway()
    assert gw.catalog.find("MistralAI/Mistral-7B-Instruct-v0.2").id == V02
    assert gw.catalog.find("mistralai/mistral-7b-instruct").id == "mistralai/mistral-7b-instruct-v0.3"
    assert gw.catalog.find("mistralai/Mistral-Nemo-Instruct-2407").id == "mistralai/mistral-nemo"
    with pytest.raises(GatewayError) as err:
        plan(gw, model="no/such-model")
    assert err.value.status == 404 and err.value.code == "model_not_found"


def test_fallback_models_list():
    gw = make_gateway(env={"NOVITA_API_KEY": "k"})
    assert plan(gw, model=V02, models=["mistralai/mistral-7b-instruct-v0.3"]) == ["novita"]
    assert plan(gw, models=["mistralai/mistral-7b-instruct-v0.3"]) == ["novita"]


def test_circuit_opens_after_threshold_and_half_opens_after_cooldown():
    now = [0.0]
    gw = make_gateway()
    gw.health._clock = lambda: now[0]
    key = "deepinfra:mistralai/Mistral-7B-Instruct-v0.2"
    for _ in range(gw.config.health.failure_threshold):
        assert key.split(":")[0] in plan(gw, model=V02)
        gw.health.begin(key)
        gw.health.failure(key, "status")
    assert plan(gw, model=V02) == ["openrouter"]
    now[0] += gw.config.health.cooldown_s + 0.1
    assert "deepinfra" in plan(gw, model=V02)  # half-open: one probe allowed
    gw.health.begin(key)
    assert plan(gw, model=V02) == ["openrouter"]  # probe in flight: no second one
    gw.health.success(key, 0.1)
    assert "deepinfra" in plan(gw, model=V02)


@respx.mock
def test_failover_on_5xx_then_circuit_open_stops_traffic(client_for):
    gw = make_gateway("[health]\nfailure_threshold = 2\ncooldown_s = 60\n")
    client = client_for(gw)
    bad = respx.post(DEEPINFRA).mock(return_value=httpx.Response(500, json={"error": {"message": "boom"}}))
    good = respx.post(OPENROUTER).mock(return_value=httpx.Response(200, json=completion("from openrouter")))
    for _ in range(2):
        r = client.post("/v1/chat/completions", json=chat(provider={"sort": "price"}))
        assert r.status_code == 200 and r.json()["provider"] == "openrouter"
        assert r.headers["x-gateway-attempts"] == "2"
    assert bad.call_count == 2
    r = client.post("/v1/chat/completions", json=chat(provider={"sort": "price"}))
    assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "1"
    assert bad.call_count == 2 and good.call_count == 3
    status = client.get(f"/v1/models/{V02}/endpoints").json()["data"]["endpoints"][0]["status"]
    assert status["circuit"] == "open"


@respx.mock
@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(429, json={"error": {"message": "slow down"}}),
        httpx.Response(408),
        httpx.Response(503, text="<html>bad gateway</html>"),
        httpx.Response(200, text="{not json"),
        httpx.Response(200, text=""),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ],
    ids=["429", "408", "503-html", "garbage", "empty", "connect", "timeout"],
)
def test_failover_conditions(client_for, failure):
    client = client_for(make_gateway())
    route = respx.post(DEEPINFRA)
    if isinstance(failure, Exception):
        route.mock(side_effect=failure)
    else:
        route.mock(return_value=failure)
    respx.post(OPENROUTER).mock(return_value=httpx.Response(200, json=completion("ok")))
    r = client.post("/v1/chat/completions", json=chat(provider={"sort": "price"}))
    assert r.status_code == 200, r.text
    assert r.json()["provider"] == "openrouter"


@respx.mock
def test_caller_fault_4xx_is_returned_as_is_without_failover(client_for):
    client = client_for(make_gateway())
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(400, json={"error": {"message": "bad messages di-secret"}}))
    other = respx.post(OPENROUTER).mock(return_value=httpx.Response(200, json=completion()))
    r = client.post("/v1/chat/completions", json=chat(provider={"sort": "price"}))
    assert r.status_code == 400
    assert "bad messages" in r.json()["error"]["message"]
    assert "di-secret" not in r.text  # an upstream echoing our key never reaches the caller
    assert other.call_count == 0


@respx.mock
def test_all_failing_maps_to_gateway_errors(client_for):
    client = client_for(make_gateway())
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(500))
    respx.post(OPENROUTER).mock(return_value=httpx.Response(502))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, text="garbage"))
    respx.post(OPENROUTER).mock(return_value=httpx.Response(200, text="garbage"))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code in (502, 503)
    respx.post(DEEPINFRA).mock(side_effect=httpx.ReadTimeout("slow"))
    respx.post(OPENROUTER).mock(side_effect=httpx.ReadTimeout("slow"))
    gw2 = make_gateway("[health]\nfailure_threshold = 100\n")
    r = client_for(gw2).post("/v1/chat/completions", json=chat())
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"


@respx.mock
def test_attempts_are_bounded(client_for):
    client = client_for(make_gateway("[routing]\nmax_attempts = 1\n"))
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(500))
    other = respx.post(OPENROUTER).mock(return_value=httpx.Response(200, json=completion()))
    r = client.post("/v1/chat/completions", json=chat(provider={"sort": "price"}))
    assert r.status_code == 502 and other.call_count == 0


@respx.mock
def test_no_enabled_provider_is_503_with_retry_after(client_for):
    client = client_for(make_gateway(env={}))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503
    assert r.headers["retry-after"]
    assert r.json()["error"]["code"] == "no_provider_available"
