"""Embeddings: decoding at the edge, base64, routing, cost, and the answer
read from upstreams that do not do as asked (mocked by respx)."""

from __future__ import annotations

import base64
import collections
import json
import struct

import httpx
import msgspec
import pytest
import respx

from gateway import config as config_mod
from gateway.errors import GatewayError
from gateway.pipeline.embeddings import decode_request
from gateway.protocol import ProviderPreferences
from gateway.protocol.embeddings import MAX_INPUTS, from_base64, to_base64
from gateway.routing.tokens import ExactCountNeeded, InputTokens, count_text, input_reservation
from gateway.upstream.adapter import embedding_parameters, embeddings_body
from providers import Provider
from tests.unit.conftest import V02, make_gateway

EMB = "test/embed"
DEEPINFRA = "https://api.deepinfra.com/v1/openai/embeddings"
OPENROUTER = "https://openrouter.ai/api/v1/embeddings"
MODEL = f"""
[[models]]
id = "{EMB}"
kind = "embedding"
tokenizer = "v3"
[[models.endpoints]]
provider = "deepinfra"
upstream_model = "BAAI/bge-small"
input_usd_per_mtok = 0.01
context_length = 16
[[models.endpoints]]
provider = "openrouter"
upstream_model = "openai/text-embedding-3-small"
input_usd_per_mtok = 0.02
context_length = 8192
supported_parameters = ["dimensions", "user"]
"""
KEY = {"authorization": "Bearer anything"}  # open mode: no keys configured


def body(**fields: object) -> bytes:
    return json.dumps({"model": EMB, **fields}).encode()


def param_of(raw: bytes) -> str | None:
    with pytest.raises(GatewayError) as err:
        decode_request(raw)
    assert err.value.status == 400
    return err.value.param


# --- decoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value,items",
    [
        ("one text", ["one text"]),
        (["a", "b c"], ["a", "b c"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        (["x"] * MAX_INPUTS, ["x"] * MAX_INPUTS),
    ],
)
def test_each_input_form_gives_one_item_per_vector(value, items):
    request, inputs = decode_request(body(input=value, encoding_format="base64", dimensions=4, user="u"))
    assert inputs == items
    assert request.wants_base64 and request.dimensions == 4
    assert embedding_parameters(request) == [("dimensions", 4), ("user", "u")]


@pytest.mark.parametrize(
    "raw,param",
    [
        (body(input=""), "input"),
        (body(input=[]), "input"),
        (body(input=["a", ""]), "input[1]"),
        (body(input=["a", 1]), "input[1]"),
        (body(input=[1, "a"]), "input[1]"),
        (body(input=[[1], 2]), "input[1]"),
        (body(input=[[1], []]), "input[1]"),
        (body(input=[1, -1]), "input[1]"),
        (body(input=[[1, 2.5]]), "input[0][1]"),
        (body(input=[True]), "input[0]"),
        (body(input={"text": "a"}), "input"),
        (body(input=["x"] * (MAX_INPUTS + 1)), "input"),
        (body(input="x", dimensions=0), "dimensions"),
        (body(input="x", encoding_format="hex"), "encoding_format"),
        (body(input="x", user=5), "user"),
        (body(input="x", provider={"sort": "cheapest"}), "provider.sort"),
        (b'{"model": "m", "input": "\xff"}', None),
        (b'{"model": "m", "input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "input[0][0]"),
        (b'{"model": "m", "input": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        (b"{", None),
        (b"", None),
    ],
)
def test_bad_bodies_are_400s_naming_the_path(raw, param):
    assert param_of(raw) == param


def test_errors_read_well():
    with pytest.raises(GatewayError) as err:
        decode_request(body(input=["a", 1]))
    assert err.value.message == "invalid parameter `input[1]`: expected a string, as input[0] is: " \
                                "a list input holds items of one kind"
    with pytest.raises(GatewayError) as err:
        decode_request(body(input=["a", ""]))
    assert err.value.message == "invalid parameter `input[1]`: Expected `str` of length >= 1"


# --- base64 -------------------------------------------------------------------


def test_base64_is_little_endian_float32():
    assert to_base64([1.0, -2.0]) == base64.b64encode(struct.pack("<2f", 1.0, -2.0)).decode()
    assert to_base64([1.0]) == "AACAPw=="
    assert from_base64("AACAPw==") == [1.0]
    vector = [0.1, -0.25, 3.5e-8, 1234.5]
    assert from_base64(to_base64(vector)) == [struct.unpack("<f", struct.pack("<f", x))[0] for x in vector]
    assert from_base64(to_base64([])) == []
    for bad in ("not base64!", base64.b64encode(b"12345").decode()):
        with pytest.raises(ValueError):
            from_base64(bad)


# --- the upstream body ----------------------------------------------------------


def test_body_sent_upstream_uses_the_providers_names():
    request, _ = decode_request(body(input=["a"], dimensions=3, user="u", encoding_format="base64"))
    renamed = Provider(name="x", renames={"dimensions": "output_dimension"})
    sent = json.loads(embeddings_body(request, renamed, "up/model", []))
    assert sent == {"model": "up/model", "input": ["a"], "output_dimension": 3, "user": "u",
                    "encoding_format": "base64"}
    sent = json.loads(embeddings_body(request, Provider(name="y"), "up/model", ["user"]))
    assert "user" not in sent and sent["dimensions"] == 3
    request, _ = decode_request(body(input="a"))
    assert json.loads(embeddings_body(request, Provider(name="y"), "m", [])) == {"model": "m", "input": "a"}


# --- tokens ---------------------------------------------------------------------


def test_input_tokens():
    texts = ["hello there", "a much longer input text than the first one"]
    tokens = InputTokens(texts, "v3")
    assert tokens.exact == count_text(texts[0], "v3") + count_text(texts[1], "v3")
    assert tokens.upper_bound == len(texts[1].encode()) + 1
    assert tokens.fits(10_000) and not tokens.fits(count_text(texts[1], "v3") - 1)
    assert tokens.fits(count_text(texts[1], "v3"))  # the longest input alone must fit
    ids = InputTokens([[1, 2, 3], [4]], "v3")
    assert ids.exact == 4 and ids.upper_bound == 3 and ids.fits(3) and not ids.fits(2)
    with pytest.raises(ExactCountNeeded):
        InputTokens(texts, "v3", exact_allowed=False).fits(10)
    assert input_reservation(["abcdefgh", "ab"]) == 3 + 1
    assert input_reservation([[1, 2, 3]]) == 3


# --- config and cost ------------------------------------------------------------


def test_kind_is_validated_and_embeddings_are_priced_by_input():
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse({"models": [{"id": "m", "kind": "vision"}]})
    assert "models[0].kind" in str(err.value.errors)
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse({"models": [{"id": "m", "kind": "embedding",
                                      "endpoints": [{"provider": "x", "output_usd_per_mtok": 0.1}]}]})
    assert "models[0].endpoints[0].output_usd_per_mtok" in str(err.value.errors)
    gw = make_gateway(MODEL)
    model = gw.router.resolve(EMB, "embedding")
    assert model.kind == "embedding" and gw.router.resolve(V02).kind == "chat"
    cheap = model.endpoints[0]
    assert cheap.priced and cheap.output_usd_per_mtok == 0.0 and cheap.price_usd_per_mtok == 0.01
    assert cheap.cost(1_000_000, 0) == pytest.approx(0.01)
    assert cheap.supported_parameters == frozenset({"user"})  # no `dimensions` unless listed
    assert gw.catalog.providers["deepinfra"].embeddings_url == DEEPINFRA


# --- routing --------------------------------------------------------------------


def plan(gw, inputs=("hi",), prefs=None, params=(), exact=True):
    preferences = None if prefs is None else msgspec.convert(prefs, ProviderPreferences)
    models = [(EMB, gw.router.resolve(EMB, "embedding"))]
    return [c.endpoint.provider.name for c in
            gw.router.plan_embeddings(models, preferences, list(params), list(inputs), exact=exact)]


def test_kinds_do_not_mix():
    gw = make_gateway(MODEL)
    for name, kind, said in ((V02, "embedding", "is a chat model"), (EMB, "chat", "/v1/embeddings")):
        with pytest.raises(GatewayError) as err:
            gw.router.resolve(name, kind)
        assert err.value.status == 400 and err.value.code == "invalid_model_kind" and err.value.param == "model"
        assert said in err.value.message


def test_price_order_and_preferences():
    gw = make_gateway(MODEL)
    assert plan(gw, prefs={"sort": "price"}) == ["deepinfra", "openrouter"]
    firsts = collections.Counter(plan(gw)[0] for _ in range(2000))
    # Inverse-square weights of the input prices: 1/0.01^2 : 1/0.02^2 = 0.8 : 0.2.
    assert 0.76 < firsts["deepinfra"] / 2000 < 0.84, firsts
    assert plan(gw, prefs={"only": ["openrouter"]}) == ["openrouter"]
    assert plan(gw, prefs={"order": ["openrouter"], "sort": "price"}) == ["openrouter", "deepinfra"]
    assert plan(gw, prefs={"max_price": {"prompt": 0.015}}) == ["deepinfra"]


def test_dimensions_is_strict_and_user_is_dropped_where_not_taken():
    gw = make_gateway(MODEL)
    assert plan(gw, params=[("dimensions", 64)], prefs={"sort": "price"}) == ["openrouter"]
    with pytest.raises(GatewayError) as err:
        plan(gw, params=[("dimensions", 64)], prefs={"only": ["deepinfra"]})
    assert err.value.status == 400 and err.value.code == "unsupported_parameter" and err.value.param == "dimensions"
    assert "never drops it (dimensions;" in err.value.message
    gw = make_gateway(MODEL.replace('["dimensions", "user"]', '["dimensions"]'))
    models = [(EMB, gw.router.resolve(EMB, "embedding"))]
    cands = gw.router.plan_embeddings(models, None, [("user", "u")], ["hi"])
    assert {c.endpoint.provider.name: c.dropped for c in cands} == {"deepinfra": [], "openrouter": ["user"]}
    with pytest.raises(GatewayError) as err:  # require_parameters makes `user` strict too
        plan(gw, params=[("user", "u")], prefs={"require_parameters": True, "only": ["openrouter"]})
    assert err.value.param == "user"


def test_each_input_must_fit_the_context_window_and_no_local_fallback():
    gw = make_gateway(MODEL, env={"DEEPINFRA_TOKEN": "k", "OPENROUTER_API_KEY": "k",
                                  "GATEWAY_LOCAL_URL": "http://127.0.0.1:9/v1"})
    gw.catalog.providers["local"].ready = True
    long = " ".join(["word"] * 40)  # more than DeepInfra's 16 tokens
    assert plan(gw, inputs=["short", "also short"], prefs={"sort": "price"}) == ["deepinfra", "openrouter"]
    assert plan(gw, inputs=["short", long], prefs={"sort": "price"}) == ["openrouter"]
    assert plan(gw, inputs=[list(range(17))]) == ["openrouter"]
    with pytest.raises(ExactCountNeeded):  # the byte bound cannot settle it without tokenizing
        plan(gw, inputs=["short", long], exact=False)
    with pytest.raises(GatewayError) as err:
        plan(gw, inputs=[list(range(9000))])
    assert err.value.code == "context_length_exceeded" and err.value.param == "input"
    gw.catalog.providers["openrouter"].enabled = gw.catalog.providers["deepinfra"].enabled = False
    with pytest.raises(GatewayError) as err:  # the local backend serves no embeddings
        plan(gw)
    assert err.value.status == 503


# --- answers, through the app (upstreams mocked) ----------------------------------


def vectors(n: int, dims: int = 3) -> list[list[float]]:
    return [[float(i + 1), 0.5, -0.25][:dims] for i in range(n)]


def answer(data: list[dict], usage: dict | None = None) -> httpx.Response:
    out: dict = {"object": "list", "data": data, "model": "upstream"}
    if usage is not None:
        out["usage"] = usage
    return httpx.Response(200, json=out)


@respx.mock
def test_base64_asked_and_floats_sent_is_converted(client_for):
    client = client_for(make_gateway(MODEL))
    route = respx.post(DEEPINFRA).mock(return_value=answer(
        [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors(2))],
        {"prompt_tokens": 7, "total_tokens": 7}))
    r = client.post("/v1/embeddings", headers=KEY, json={"model": EMB, "input": ["a", "b"],
                                                          "encoding_format": "base64", "provider": {"sort": "price"}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [d["embedding"] for d in out["data"]] == [to_base64(v) for v in vectors(2)]
    assert json.loads(route.calls.last.request.content)["encoding_format"] == "base64"
    assert out["usage"] == {"prompt_tokens": 7, "total_tokens": 7, "estimated_cost": pytest.approx(7 * 0.01 / 1e6)}
    assert out["model"] == EMB and out["provider"] == "deepinfra" and out["object"] == "list"
    assert r.headers["x-gateway-provider"] == "deepinfra" and r.headers["x-gateway-attempts"] == "1"


@respx.mock
def test_floats_asked_and_base64_sent_is_decoded_and_order_restored(client_for):
    client = client_for(make_gateway(MODEL))
    vs = vectors(3)
    data = [{"object": "embedding", "index": i, "embedding": to_base64(vs[i])} for i in (2, 0, 1)]
    respx.post(DEEPINFRA).mock(return_value=answer(data))  # no usage: the tokenizer counts
    texts = ["first text", "second", "the third text"]
    r = client.post("/v1/embeddings", headers=KEY, json={"model": EMB, "input": texts, "provider": {"sort": "price"}})
    out = r.json()
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    assert [d["embedding"] for d in out["data"]] == vs
    expected = sum(count_text(t, "v3") for t in texts)
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] == expected
    r = client.post("/v1/embeddings", headers=KEY,
                    json={"model": EMB, "input": [[1, 2, 3], [4], [5, 6]], "provider": {"sort": "price"}})
    assert r.json()["usage"]["prompt_tokens"] == 6  # token ids count as their length


@respx.mock
@pytest.mark.parametrize(
    "bad",
    [
        answer([{"embedding": [1.0]}]),  # one vector for two inputs
        answer([{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}]),
        answer([{"embedding": "@@not base64@@"}, {"embedding": [1.0]}]),
        answer([{"embedding": {"a": 1}}, {"embedding": [1.0]}]),
        httpx.Response(200, text="{not json"),
        httpx.Response(500, json={"error": {"message": "boom"}}),
    ],
)
def test_unusable_answers_fail_over(client_for, bad):
    client = client_for(make_gateway(MODEL))
    respx.post(DEEPINFRA).mock(return_value=bad)
    respx.post(OPENROUTER).mock(return_value=answer([{"index": i, "embedding": v} for i, v in enumerate(vectors(2))]))
    r = client.post("/v1/embeddings", headers=KEY,
                    json={"model": EMB, "input": ["a", "b"], "provider": {"sort": "price"}})
    assert r.status_code == 200, r.text
    assert r.json()["provider"] == "openrouter" and r.headers["x-gateway-attempts"] == "2"
    assert r.json()["data"][1]["embedding"] == vectors(2)[1]


@respx.mock
def test_http_errors_are_openai_shaped(client_for):
    client = client_for(make_gateway(MODEL))
    r = client.post("/v1/embeddings", headers=KEY, json={"model": V02, "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_model_kind"
    r = client.post("/v1/embeddings", headers=KEY, content=b'{"model": "x", "input": "\xff"}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert client.get("/v1/embeddings", headers=KEY).status_code == 405
    assert not respx.calls


def test_openapi_lists_the_route(client_for):
    schema = client_for(make_gateway()).get("/openapi/openapi.json").json()
    operation = schema["paths"]["/v1/embeddings"]["post"]
    assert operation["operationId"] == "createEmbeddings" and "embeddings" in operation["summary"]
