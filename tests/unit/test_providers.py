"""Each provider's declared quirks, applied by the shared adapter (respx)."""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from tests.unit.conftest import DEEPINFRA, NOVITA, OPENROUTER, V02, chat, completion, make_gateway


def sse(*chunks: dict, done: bool = True) -> str:
    out = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    return out + ("data: [DONE]\n\n" if done else "")


def chunk(content=None, role=None, finish=None, **extra) -> dict:
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@respx.mock
def test_deepinfra_stream_role_once_and_no_eos_literal(client_for):
    client = client_for(make_gateway())
    # Exactly the seed's stream (001): role in every delta, "" and "</s>" chunks.
    body = sse(
        chunk(" ", "assistant"), chunk(" Hi", "assistant"), chunk("!", "assistant"),
        chunk("", "assistant"), chunk("</s>", "assistant"), chunk(finish="stop"),
    )
    route = respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, text=body))
    r = client.post("/v1/chat/completions", json=chat(stream=True, provider={"only": ["deepinfra"]}))
    assert r.status_code == 200
    out = events(r.text)
    deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
    assert [d.get("role") for d in deltas] == ["assistant", None, None, None]
    assert "".join(d.get("content", "") for d in deltas) == "  Hi!"
    assert "</s>" not in r.text
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert out[-1]["usage"]["completion_tokens"] > 0  # counted by the gateway: DeepInfra sends none
    assert r.text.endswith("data: [DONE]\n\n")
    # DeepInfra does not document stream_options: not sent.
    assert "stream_options" not in json.loads(route.calls[0].request.content)


@respx.mock
def test_deepinfra_drops_unsupported_params_and_refuses_n_over_two(client_for):
    client = client_for(make_gateway())
    route = respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion()))
    # n is never dropped (issue 13): n=3 is past DeepInfra's n <= 2, so no endpoint is left.
    r = client.post("/v1/chat/completions", json=chat(top_k=5, min_p=0.1, n=3, temperature=0.5,
                                                      provider={"only": ["deepinfra"]}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert r.json()["error"]["param"] == "n" and not route.calls
    r = client.post("/v1/chat/completions", json=chat(top_k=5, min_p=0.1, n=2, temperature=0.5,
                                                      provider={"only": ["deepinfra"]}))
    assert r.status_code == 200
    sent = json.loads(route.calls[0].request.content)
    assert "top_k" not in sent and "min_p" not in sent and sent["n"] == 2
    assert sent["temperature"] == 0.5
    assert sent["model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert "provider" not in sent
    assert r.headers["x-gateway-dropped-params"] == "top_k,min_p"
    assert route.calls[0].request.headers["authorization"] == "Bearer di-secret"


@respx.mock
def test_deepinfra_non_stream_eos_literal_stripped_and_own_cost(client_for):
    client = client_for(make_gateway())
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion(
        " Hello!</s>", usage={"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 31, "estimated_cost": 0.0000268})))
    r = client.post("/v1/chat/completions", json=chat(provider={"only": ["deepinfra"]}))
    body = r.json()
    assert body["choices"][0]["message"]["content"] == " Hello!"
    # Cost at the catalog price ($0.07/Mtok both ways), not the upstream's figure.
    assert body["usage"] == {"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 31,
                             "estimated_cost": pytest.approx(31 * 0.07 / 1e6)}
    assert body["model"] == V02 and body["provider"] == "deepinfra"


@respx.mock
def test_openrouter_headers_usage_in_stream_and_comment_lines(client_for):
    gw = make_gateway('[providers.openrouter]\nheaders = { "HTTP-Referer" = "https://app.example", "X-Title" = "App" }\n')
    client = client_for(gw)
    body = ": OPENROUTER PROCESSING\n\n" + sse(
        chunk("Hi", "assistant"), chunk(" there", finish="stop"),
        {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}},
    )
    route = respx.post(OPENROUTER).mock(return_value=httpx.Response(200, text=body))
    r = client.post("/v1/chat/completions", json=chat(stream=True, top_k=3, stream_options={"include_usage": True},
                                                      provider={"only": ["openrouter"]}))
    sent = route.calls[0].request
    assert sent.headers["http-referer"] == "https://app.example" and sent.headers["x-title"] == "App"
    payload = json.loads(sent.content)
    assert payload["top_k"] == 3 and payload["stream_options"] == {"include_usage": True}
    out = events(r.text)
    assert out[-1]["choices"] == [] and out[-1]["usage"]["prompt_tokens"] == 7
    assert out[-1]["usage"]["estimated_cost"] == pytest.approx((7 * 0.18 + 2 * 0.18) / 1e6)
    assert "OPENROUTER PROCESSING" not in r.text
    # include_usage: the usage chunk is separate; the finish chunk has none.
    assert "usage" not in out[-2]


@respx.mock
def test_novita_content_filter_results_are_merged(client_for):
    client = client_for(make_gateway())
    flagged = {"hate": {"filtered": False}, "self_harm": {"filtered": False}, "sexual": {"filtered": True},
               "violence": {"filtered": False}, "jailbreak": {"filtered": False, "detected": False},
               "profanity": {"filtered": False, "detected": True}}
    answer = completion("I will kill you", usage={"prompt_tokens": 46, "completion_tokens": 40, "total_tokens": 86,
                                                  "prompt_tokens_details": None, "completion_tokens_details": None},
                        system_fingerprint="")
    answer["choices"][0]["content_filter_results"] = flagged
    respx.post(NOVITA).mock(return_value=httpx.Response(200, json=answer))
    r = client.post("/v1/chat/completions", json=chat("mistralai/mistral-7b-instruct"))
    results = r.json()["choices"][0]["content_filter_results"]
    assert results["sexual"]["filtered"] is True  # theirs
    assert results["profanity"]["detected"] is True  # theirs
    assert results["violence"]["severity"] == "high"  # ours
    assert r.json()["prompt_filter_results"][0]["prompt_index"] == 0


@respx.mock
def test_unpriced_endpoint_reports_null_cost_with_warning(client_for):
    client = client_for(make_gateway())
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion()))
    r = client.post("/v1/chat/completions", json=chat("mistralai/mistral-nemo"))
    assert r.status_code == 200
    assert r.json()["usage"]["estimated_cost"] is None
    assert "no price" in r.headers["x-gateway-warning"]


@respx.mock
def test_configured_price_overrides_builtin(client_for):
    gw = make_gateway('[[models]]\nid = "mistralai/mistral-nemo"\n[[models.endpoints]]\nprovider = "deepinfra"\n'
                      'input_usd_per_mtok = 0.02\noutput_usd_per_mtok = 0.04\n')
    client = client_for(gw)
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion()))
    r = client.post("/v1/chat/completions", json=chat("mistralai/mistral-nemo"))
    assert r.json()["usage"]["estimated_cost"] == pytest.approx((15 * 0.02 + 16 * 0.04) / 1e6)


@respx.mock
def test_usage_counted_with_tokenizer_when_upstream_omits_it(client_for):
    client = client_for(make_gateway())
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion("Hello there, friend.", usage=None)))
    r = client.post("/v1/chat/completions", json=chat(provider={"only": ["deepinfra"]}))
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 5  # v1 tokenizer: ▁Hello ▁there , ▁friend .
    assert usage["prompt_tokens"] > 0 and usage["estimated_cost"] > 0
