"""The HTTP surface: auth, error shapes, limits, models, streaming edge cases.

Whatever reaches an upstream goes through the production client to a real
local server (``tests/unit/upstream_server.py``); the gateways built with
``make_gateway`` here never send anything upstream."""

from __future__ import annotations

import hashlib

import pytest

from tests.unit.conftest import V02, chat, completion, make_gateway
from tests.unit.test_providers import chunk, events, sse
from tests.unit.upstream_server import gateway_over, json_answer, sse_answer, text_answer, upstreams

__all__ = ["upstreams"]

KEY = "sk-gw-test-123"
KEYED = f'[[auth.keys]]\nname = "team-a"\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_auth(client_for, upstreams):
    client = client_for(gateway_over(upstreams, KEYED))
    upstreams["deepinfra"].answer(json_answer(completion()))
    assert client.post("/v1/chat/completions", json=chat()).status_code == 401
    r = client.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"authorization": "Basic abc"}).status_code == 401
    r = client.post("/v1/chat/completions", json=chat(provider={"only": ["deepinfra"]}),
                    headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello!"
    assert len(upstreams["deepinfra"].chat_requests) == 1  # the refused ones never left
    assert client.get("/health/live").status_code == 200  # probes need no key


def test_key_from_env(client_for):
    gw = make_gateway('[[auth.keys]]\nname = "ci"\nkey_env = "GW_KEY"\n', env={"GW_KEY": "from-env"})
    client = client_for(gw)
    assert client.get("/v1/models", headers={"authorization": "Bearer from-env"}).status_code == 200
    assert client.get("/v1/models", headers={"authorization": "Bearer nope"}).status_code == 401


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": V02, "messages": []}, "messages"),
        ({"model": V02}, None),
        ({"model": V02, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (chat(temperature=2.5), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(presence_penalty=-3), "presence_penalty"),
        (chat(n=0), "n"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(stop=["x"] * 17), "stop"),
        (chat(logit_bias={"50256": 200}), "logit_bias"),
        (chat(logit_bias={"hello": 5}), "logit_bias"),
        (chat(provider={"sort": "cheapest"}), "provider.sort"),
        (chat(stream="yes"), "stream"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ],
)
def test_bad_requests_name_the_parameter(client_for, body, param):
    client = client_for(make_gateway())
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_malformed_and_hostile_bodies(client_for):
    client = client_for(make_gateway("[server]\nmax_body_bytes = 2048\n"))
    for raw in (b"", b"{", b"[1,2]", b"\xff\xfe", b'{"model": 1e999999}', b"null"):
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        error_of(r)
    r = client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "x" * 5000}]))
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405
    error_of(r)
    r = client.get("/v1/nope")
    assert r.status_code == 404
    error_of(r)


def test_unknown_model_is_404(client_for):
    r = client_for(make_gateway()).post("/v1/chat/completions", json=chat("acme/unknown"))
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


def test_models_listing_and_endpoints(client_for):
    client = client_for(make_gateway())
    data = client.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    v02 = by_id[V02]
    assert v02["pricing"] == {"prompt": "0.00000007", "completion": "0.00000007"}
    assert v02["context_length"] == 32768
    assert {e["provider_name"] for e in v02["endpoints"]} == {"deepinfra", "openrouter"}
    assert by_id["mistralai/mistral-7b-instruct-v0.1"]["pricing"] == {
        "prompt": "0.00000011", "completion": "0.00000019"}
    assert by_id["mistralai/mistral-nemo"]["pricing"] == {"prompt": None, "completion": None}
    eps = client.get("/v1/models/MISTRALAI/mistral-7b-instruct-v0.2/endpoints").json()["data"]
    assert eps["id"] == V02 and eps["endpoints"][0]["status"]["circuit"] == "closed"
    assert client.get(f"/v1/models/{V02}").json()["id"] == V02
    assert client.get("/v1/models/x/y/endpoints").status_code == 404
    assert client.get("/openapi/openapi.json").status_code == 200


# --- streams over the production client ------------------------------------------
#
# The upstreams below are real HTTP servers (``tests/unit/upstream_server.py``)
# reached by the gateway's own HTTP/1.1 client, which delivers a stream in the
# batches its socket reads give, not as one mocked body.


@pytest.mark.parametrize("where", ["before the head", "after the head"])
def test_stream_keepalives_while_waiting_then_answer(client_for, upstreams, where):
    """The upstream really is slow (0.45 s before its first event, either before
    it answers at all or after its head), so the gateway's keep-alive timer
    (0.1 s) fires several times before the answer."""
    client = client_for(gateway_over(upstreams, "[routing]\nkeepalive_s = 0.1\n"))
    pause = {"head_after": 0.45} if where == "before the head" else {"first_after": 0.45}
    upstreams["deepinfra"].answer(sse_answer(sse(chunk("Hi", "assistant"), chunk(finish="stop")), **pause))
    r = client.post("/v1/chat/completions", json=chat(stream=True, provider={"only": ["deepinfra"]}))
    assert r.status_code == 200
    assert r.text.startswith(": keep-alive\n\n")
    assert r.text.count(": keep-alive") >= 2
    assert events(r.text)[0]["choices"][0]["delta"]["content"] == "Hi"
    assert r.text.endswith("data: [DONE]\n\n")


def test_stream_errors_before_first_chunk_are_http_errors(client_for, upstreams):
    client = client_for(gateway_over(upstreams))
    upstreams["deepinfra"].answer(text_answer("", 500))
    upstreams["openrouter"].answer(sse_answer("data: {broken\n\n"))
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 502
    error_of(r)
    assert len(upstreams["deepinfra"].chat_requests) == len(upstreams["openrouter"].chat_requests) == 1


def test_stream_fails_over_before_first_chunk(client_for, upstreams):
    client = client_for(gateway_over(upstreams))
    upstreams["deepinfra"].answer(text_answer(""))  # 200, and the body ends at once
    upstreams["openrouter"].answer(sse_answer(sse(chunk("ok", "assistant"), chunk(finish="stop"))))
    r = client.post("/v1/chat/completions", json=chat(stream=True, provider={"sort": "price"}))
    assert r.status_code == 200 and events(r.text)[0]["provider"] == "openrouter"
    assert len(upstreams["deepinfra"].chat_requests) == 1


@pytest.mark.parametrize("cut", [False, True], ids=["ends-without-done", "connection-dropped"])
def test_stream_cut_after_first_chunk_ends_with_in_band_error(client_for, upstreams, cut):
    client = client_for(gateway_over(upstreams))
    upstreams["deepinfra"].answer(sse_answer(sse(chunk("Hel", "assistant"), chunk("lo"), done=False), every=0.02,
                                             cut=cut))
    upstreams["openrouter"].answer(json_answer(completion()))
    r = client.post("/v1/chat/completions", json=chat(stream=True, provider={"sort": "price"}))
    assert r.status_code == 200
    out = events(r.text)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in out[:-1]) == "Hello"
    assert out[-1]["choices"][0]["finish_reason"] == "error"
    assert out[-1]["error"]["code"] == "stream_failed"
    assert r.text.endswith("data: [DONE]\n\n")
    assert not upstreams["openrouter"].requests  # bytes had reached the client: no failover


def test_no_secret_in_any_response(client_for, upstreams):
    client = client_for(gateway_over(upstreams))
    upstreams["deepinfra"].answer(json_answer({"error": {"message": "bad key di-secret"}}, 401))
    upstreams["openrouter"].answer(text_answer("Traceback (most recent call last): or-secret", 500))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 502
    assert "di-secret" not in r.text and "or-secret" not in r.text and "Traceback" not in r.text
    assert upstreams["deepinfra"].chat_requests and upstreams["openrouter"].chat_requests
