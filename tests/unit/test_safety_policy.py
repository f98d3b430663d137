"""The content policy in the request path: annotate by default, block on demand."""

from __future__ import annotations

import hashlib

import httpx
import respx

from tests.unit.conftest import DEEPINFRA, chat, completion, make_gateway
from tests.unit.test_providers import chunk, events, sse

KEY = "sk-safety"
BLOCKING_KEY = (f'[[auth.keys]]\nname = "strict"\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'
                '[auth.keys.safety]\nmode = "block"\n[auth.keys.safety.thresholds]\nviolence = "medium"\n')
AUTH = {"authorization": f"Bearer {KEY}"}
ONLY_DI = {"provider": {"only": ["deepinfra"]}}


@respx.mock
def test_annotate_is_the_default(client_for):
    client = client_for(make_gateway())
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion("I will kill you")))
    r = client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "I will kill you"}],
                                                      **ONLY_DI))
    assert r.status_code == 200
    body = r.json()
    assert body["prompt_filter_results"][0]["content_filter_results"]["violence"] == {"filtered": False,
                                                                                     "severity": "high"}
    assert body["choices"][0]["content_filter_results"]["violence"]["severity"] == "high"
    assert body["choices"][0]["finish_reason"] == "stop"


@respx.mock
def test_blocked_prompt_is_400_content_filter_and_never_sent(client_for):
    client = client_for(make_gateway(BLOCKING_KEY))
    route = respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion()))
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json=chat(messages=[{"role": "user", "content": "I am going to kill you tonight"}], **ONLY_DI))
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    assert route.call_count == 0
    ok = client.post("/v1/chat/completions", headers=AUTH,
                     json=chat(messages=[{"role": "user", "content": "how do I kill a python process?"}], **ONLY_DI))
    assert ok.status_code == 200


@respx.mock
def test_blocked_completion_ends_with_content_filter(client_for):
    client = client_for(make_gateway(BLOCKING_KEY))
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion("Sure. I will kill you.")))
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat(**ONLY_DI))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] is None
    assert choice["content_filter_results"]["violence"]["filtered"] is True


@respx.mock
def test_blocked_stream_stops_before_the_offending_text(client_for):
    client = client_for(make_gateway(BLOCKING_KEY))
    body = sse(chunk("Here is", "assistant"), chunk(" the plan:"), chunk(" I will kill you"), chunk(" tomorrow."),
               chunk(finish="stop"))
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, text=body))
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat(stream=True, **ONLY_DI))
    out = events(r.text)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in out if c["choices"])
    assert text == "Here is the plan:"
    final = [c for c in out if c["choices"] and c["choices"][0].get("finish_reason")][-1]
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert final["choices"][0]["content_filter_results"]["violence"]["filtered"] is True
    assert r.text.endswith("data: [DONE]\n\n")


@respx.mock
def test_stream_results_on_first_and_final_chunks(client_for):
    client = client_for(make_gateway())
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, text=sse(chunk("Hi", "assistant"), chunk(finish="stop"))))
    out = events(client.post("/v1/chat/completions", json=chat(stream=True, **ONLY_DI)).text)
    assert "prompt_filter_results" in out[0]
    assert "content_filter_results" in out[-1]["choices"][0]
    assert all("content_filter_results" not in c["choices"][0] for c in out[:-1])


@respx.mock
def test_stream_first_chunk_carries_the_prompts_results(client_for):
    """In annotate mode the prompt is classified while the upstream works; its
    results still lead the stream."""
    client = client_for(make_gateway())
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, text=sse(chunk("Hi", "assistant"), chunk(finish="stop"))))
    out = events(client.post("/v1/chat/completions", json=chat(
        messages=[{"role": "user", "content": "I will kill you"}], stream=True, **ONLY_DI)).text)
    assert out[0]["prompt_filter_results"][0]["content_filter_results"]["violence"] == {"filtered": False,
                                                                                      "severity": "high"}
