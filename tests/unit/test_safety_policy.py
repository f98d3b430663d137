"""The content policy in the request path: annotate by default, block on demand.

The upstream is a real local server (``tests/unit/upstream_server.py``)
reached by the production client, so a stream is screened in the batches
that client really delivers."""

from __future__ import annotations

import hashlib

import pytest

from tests.unit.conftest import chat, completion
from tests.unit.test_providers import chunk, events, sse
from tests.unit.upstream_server import gateway_over, json_answer, sse_answer, upstreams

__all__ = ["upstreams"]

KEY = "sk-safety"
BLOCKING_KEY = (f'[[auth.keys]]\nname = "strict"\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'
                '[auth.keys.safety]\nmode = "block"\n[auth.keys.safety.thresholds]\nviolence = "medium"\n')
AUTH = {"authorization": f"Bearer {KEY}"}
ONLY_DI = {"provider": {"only": ["deepinfra"]}}


def test_annotate_is_the_default(client_for, upstreams):
    client = client_for(gateway_over(upstreams))
    upstreams["deepinfra"].answer(json_answer(completion("I will kill you")))
    r = client.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "I will kill you"}],
                                                      **ONLY_DI))
    assert r.status_code == 200
    body = r.json()
    assert body["prompt_filter_results"][0]["content_filter_results"]["violence"] == {"filtered": False,
                                                                                     "severity": "high"}
    assert body["choices"][0]["content_filter_results"]["violence"]["severity"] == "high"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_blocked_prompt_is_400_content_filter_and_never_sent(client_for, upstreams):
    client = client_for(gateway_over(upstreams, BLOCKING_KEY))
    upstreams["deepinfra"].answer(json_answer(completion()))
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json=chat(messages=[{"role": "user", "content": "I am going to kill you tonight"}], **ONLY_DI))
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    assert not upstreams["deepinfra"].requests
    ok = client.post("/v1/chat/completions", headers=AUTH,
                     json=chat(messages=[{"role": "user", "content": "how do I kill a python process?"}], **ONLY_DI))
    assert ok.status_code == 200
    assert len(upstreams["deepinfra"].chat_requests) == 1


def test_blocked_completion_ends_with_content_filter(client_for, upstreams):
    client = client_for(gateway_over(upstreams, BLOCKING_KEY))
    upstreams["deepinfra"].answer(json_answer(completion("Sure. I will kill you.")))
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat(**ONLY_DI))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] is None
    assert choice["content_filter_results"]["violence"]["filtered"] is True


@pytest.mark.parametrize("every", [0.0, 0.03], ids=["back-to-back", "trickled"])
def test_blocked_stream_stops_before_the_offending_text(client_for, upstreams, every):
    """Whether the events arrive together (one read may hold them all) or one
    by one, nothing from the offending event on reaches the client."""
    client = client_for(gateway_over(upstreams, BLOCKING_KEY))
    body = sse(chunk("Here is", "assistant"), chunk(" the plan:"), chunk(" I will kill you"), chunk(" tomorrow."),
               chunk(finish="stop"))
    upstreams["deepinfra"].answer(sse_answer(body, every=every))
    r = client.post("/v1/chat/completions", headers=AUTH, json=chat(stream=True, **ONLY_DI))
    out = events(r.text)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in out if c["choices"])
    assert text == "Here is the plan:"
    final = [c for c in out if c["choices"] and c["choices"][0].get("finish_reason")][-1]
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert final["choices"][0]["content_filter_results"]["violence"]["filtered"] is True
    assert r.text.endswith("data: [DONE]\n\n")
    assert "kill" not in r.text and "tomorrow" not in r.text


@pytest.mark.parametrize("every", [0.0, 0.03], ids=["back-to-back", "trickled"])
def test_stream_results_on_first_and_final_chunks(client_for, upstreams, every):
    client = client_for(gateway_over(upstreams))
    upstreams["deepinfra"].answer(sse_answer(sse(chunk("Hi", "assistant"), chunk(" there"), chunk(finish="stop")),
                                             every=every))
    out = events(client.post("/v1/chat/completions", json=chat(stream=True, **ONLY_DI)).text)
    assert "prompt_filter_results" in out[0]
    assert "content_filter_results" in out[-1]["choices"][0]
    assert all("content_filter_results" not in c["choices"][0] for c in out[:-1])


def test_stream_first_chunk_carries_the_prompts_results(client_for, upstreams):
    """In annotate mode the prompt is classified while the upstream works; its
    results still lead the stream."""
    client = client_for(gateway_over(upstreams))
    upstreams["deepinfra"].answer(sse_answer(sse(chunk("Hi", "assistant"), chunk(finish="stop"))))
    out = events(client.post("/v1/chat/completions", json=chat(
        messages=[{"role": "user", "content": "I will kill you"}], stream=True, **ONLY_DI)).text)
    assert out[0]["prompt_filter_results"][0]["content_filter_results"]["violence"] == {"filtered": False,
                                                                                      "severity": "high"}
