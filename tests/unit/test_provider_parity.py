"""Issue 13, scope 2: OpenRouter's ``provider`` fields, each honoured where
the catalog or the health tracker can answer, the rest named in ``x-gateway-ignored``."""

from __future__ import annotations

import json

import msgspec
import pytest

from gateway.errors import GatewayError
from gateway.protocol import ChatRequest
from tests.unit.conftest import V02, chat, make_gateway
from tests.unit.test_providers import fakes, h1_gateway, seed_fakes

__all__ = ["fakes", "seed_fakes"]

DI = "deepinfra:mistralai/Mistral-7B-Instruct-v0.2"
OR = "openrouter:mistralai/mistral-7b-instruct-v0.2"


def plan(gw, **provider):
    body = {"model": V02, "messages": [{"role": "user", "content": "Hello!"}], "provider": provider}
    request = msgspec.json.decode(json.dumps(body), type=ChatRequest)
    return [c.endpoint.provider.name for c in gw.router.plan(request)]


def refused(gw, **provider) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        plan(gw, **provider)
    return err.value


def test_data_collection_deny_keeps_providers_that_do_not_collect():
    # The seeds state no data policy for DeepInfra or OpenRouter: unknown counts as retaining.
    err = refused(make_gateway(), data_collection="deny")
    assert err.status == 404 and err.code == "no_endpoints_found" and "data_policy" in err.message
    assert plan(make_gateway(), data_collection="allow", sort="price") == ["deepinfra", "openrouter"]
    gw = make_gateway('[providers.deepinfra]\ndata_policy = "no_training"\n')
    assert plan(gw, data_collection="deny") == ["deepinfra"]


def test_zdr_needs_zero_data_retention():
    gw = make_gateway('[providers.deepinfra]\ndata_policy = "no_training"\n'
                      '[providers.openrouter]\ndata_policy = "no_retention"\n')
    assert plan(gw, zdr=True) == ["openrouter"]
    assert plan(gw, zdr=False, sort="price") == ["deepinfra", "openrouter"]
    assert refused(make_gateway(), zdr=True).code == "no_endpoints_found"


def test_quantizations_match_the_catalog_case_insensitively():
    gw = make_gateway()
    assert plan(gw, quantizations=["FP8"]) == ["deepinfra"]  # OpenRouter's v0.2 states none
    err = refused(gw, quantizations=["int4"])
    assert err.code == "no_endpoints_found" and "quantization" in err.message


def test_sort_as_an_object():
    gw = make_gateway()
    assert plan(gw, sort={"by": "price"}) == ["deepinfra", "openrouter"]
    assert plan(gw, sort={"by": "price", "partition": "model"}) == ["deepinfra", "openrouter"]
    gw.health.success(OR, 0.1)
    gw.health.success(DI, 0.9)
    assert plan(gw, sort={"by": "latency", "partition": "none"}) == ["openrouter", "deepinfra"]


def test_max_price_request_is_accepted():
    gw = make_gateway()
    assert plan(gw, max_price={"prompt": 0.1, "request": 0.5}) == ["deepinfra"]


@pytest.mark.parametrize("cutoff", [50, {"p50": 50}, {"p50": 50, "p90": 10}])
def test_preferred_min_throughput_moves_slow_endpoints_last(cutoff):
    gw = make_gateway()
    gw.health.throughput(DI, 10, 1.0)
    gw.health.throughput(OR, 100, 1.0)
    assert plan(gw, sort="price", preferred_min_throughput=cutoff) == ["openrouter", "deepinfra"]
    assert plan(gw, sort="price", preferred_min_throughput=5) == ["deepinfra", "openrouter"]


@pytest.mark.parametrize("cutoff", [0.5, {"p50": 0.5}])
def test_preferred_max_latency_moves_slow_endpoints_last(cutoff):
    gw = make_gateway()
    gw.health.success(DI, 2.0)
    assert plan(gw, sort="price", preferred_max_latency=cutoff) == ["openrouter", "deepinfra"]
    # No figure yet for an endpoint: not penalised.
    assert plan(make_gateway(), sort="price", preferred_max_latency=cutoff) == ["deepinfra", "openrouter"]


def test_ignored_fields_are_named_in_a_header(client_for, fakes):
    """Through the production client to DeepInfra's fake, which refuses unknown
    parameters: none of the routing object reaches it."""
    client = client_for(h1_gateway(fakes))
    provider = {"only": ["deepinfra"], "sort": {"by": "price", "partition": "none"}, "max_price": {"request": 1},
                "preferred_max_latency": {"p50": 5, "p99": 9}, "quantizations": ["fp8"], "zdr": False,
                "data_collection": "allow", "preferred_min_throughput": 1, "require_parameters": False}
    r = client.post("/v1/chat/completions", json=chat(provider=provider))
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-ignored"] == "sort.partition,max_price.request,preferred_max_latency.p99"
    r = client.post("/v1/chat/completions", json=chat(provider={"only": ["deepinfra"]}))
    assert r.status_code == 200, r.text
    assert "x-gateway-ignored" not in r.headers
    sent = [req["body"] for req in fakes["deepinfra"].requests(chat_only=True)]
    assert len(sent) == 2 and all("provider" not in body for body in sent)


@pytest.mark.parametrize(("provider", "named"), [
    ({"quantisations": ["fp8"]}, "quantisations"),
    ({"sort": {"by": "price", "bogus": 1}}, "bogus"),
    ({"max_price": {"image": 1}}, "image"),
    ({"preferred_max_latency": {"p42": 1}}, "p42"),
])
def test_unknown_fields_still_400_naming_the_field(client_for, provider, named):
    client = client_for(make_gateway())
    r = client.post("/v1/chat/completions", json=chat(provider=provider))
    assert r.status_code == 400
    error = r.json()["error"]
    assert named in error["message"] or named in (error["param"] or "")
