"""The gateway as users run it: a real process, fake seed providers, the openai SDK."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.conftest import GATEWAY_KEY, PROVIDER_KEYS
from tests.fakes.servers import fault_marker

V01 = "mistralai/mistral-7b-instruct-v0.1"
V02 = "mistralai/mistral-7b-instruct-v0.2"
V03 = "mistralai/mistral-7b-instruct-v0.3"
CHEAPEST_FIRST = {"provider": {"sort": "price"}}


def ask(text: str = "Say hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def test_non_stream_through_the_sdk(client, fakes):
    r = client.chat.completions.create(model=V02, messages=ask(), extra_body=CHEAPEST_FIRST)
    assert r.choices[0].message.content.strip() == "Hello from deepinfra: Say hi"
    assert r.model == V02 and r.model_extra["provider"] == "deepinfra"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.model_extra["estimated_cost"] == pytest.approx(r.usage.total_tokens * 0.07 / 1e6)
    cfr = r.choices[0].model_extra["content_filter_results"]
    assert set(cfr) == {"hate", "self_harm", "sexual", "violence", "jailbreak", "profanity"}
    assert r.model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    sent = fakes["deepinfra"].last_request()
    assert sent["auth"] == "matched" and sent["body"]["model"] == "mistralai/Mistral-7B-Instruct-v0.2"


def test_stream_through_the_sdk(client, fakes):
    stream = client.chat.completions.create(model=V02, messages=ask("Tell me"), stream=True,
                                            stream_options={"include_usage": True}, extra_body=CHEAPEST_FIRST)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "Hello from deepinfra: Tell me"
    assert "</s>" not in text
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals[-1].choices[0].finish_reason == "stop"
    assert "content_filter_results" in finals[-1].choices[0].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.model_extra["estimated_cost"] > 0
    assert "prompt_filter_results" in chunks[0].model_extra


def test_novita_alias_and_openrouter_headers(client, fakes):
    r = client.chat.completions.create(model="mistralai/mistral-7b-instruct", messages=ask("v3"))
    assert r.model == V03 and r.model_extra["provider"] == "novita"
    r = client.chat.completions.create(model=V01, messages=ask("v1"), temperature=0.3, extra_body={"top_k": 4})
    assert r.model_extra["provider"] == "openrouter"
    sent = fakes["openrouter"].last_request()
    assert sent["headers"]["http-referer"] == "https://e2e.example" and sent["headers"]["x-title"] == "e2e"
    assert sent["body"]["top_k"] == 4 and sent["body"]["temperature"] == 0.3


def test_price_routing_prefers_the_cheapest(client, fakes):
    served = [client.chat.completions.create(model=V02, messages=ask()).model_extra["provider"] for _ in range(100)]
    # Inverse-square weights: deepinfra takes ~87% of first picks (sd ~3.4 in 100);
    # 70 is five standard deviations below, and far above an even split.
    assert 70 <= served.count("deepinfra") < 100, served


def test_unsupported_params_dropped_and_listed(client, fakes):
    raw = client.chat.completions.with_raw_response.create(
        model=V02, messages=ask(), extra_body={"top_k": 5, "min_p": 0.2, **CHEAPEST_FIRST})
    assert raw.headers["x-gateway-dropped-params"] == "top_k,min_p"
    assert raw.parse().model_extra["provider"] == "deepinfra"  # the fake rejects unknown params: none sent
    r = client.chat.completions.create(model=V02, messages=ask(),
                                       extra_body={"top_k": 5, "provider": {"require_parameters": True}})
    assert r.model_extra["provider"] == "openrouter"


def test_failover_on_500_and_garbage(client, fakes):
    fakes["deepinfra"].control("status", status=500)
    r = client.chat.completions.create(model=V02, messages=ask(), extra_body=CHEAPEST_FIRST)
    assert r.model_extra["provider"] == "openrouter"
    fakes["deepinfra"].control("garbage")
    stream = client.chat.completions.create(model=V02, messages=ask(), stream=True, extra_body=CHEAPEST_FIRST)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).startswith("Hello from openrouter")


def test_failover_when_cheapest_hangs(client, fakes):
    fakes["deepinfra"].control("hang")
    started = time.monotonic()
    r = client.chat.completions.create(model=V02, messages=ask(), extra_body=CHEAPEST_FIRST)
    assert r.model_extra["provider"] == "openrouter"
    assert time.monotonic() - started < 10  # provider timeout_s = 2 in the e2e config


def test_stream_cut_mid_answer_is_an_in_band_error(client, fakes):
    stream = client.chat.completions.create(
        model=V02, messages=ask("one two three four five six " + fault_marker("cut_stream", after=3)),
        stream=True, extra_body=CHEAPEST_FIRST)
    with pytest.raises(openai.APIError, match="upstream stream failed"):
        for _ in stream:
            pass


def test_client_disconnect_cancels_upstream(shared_gateway, fakes):
    body = {"model": V02, "stream": True, "provider": {"sort": "price"},
            "messages": ask("a b c d e f g h i j k l m n o p " + fault_marker("delay", delay_s=0.3))}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", shared_gateway.base_url + "/chat/completions", json=body,
                         headers={"authorization": f"Bearer {GATEWAY_KEY}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk, then hang up
    cancelled = fakes["deepinfra"].wait_cancelled(timeout=10)
    assert cancelled["cancelled"] is True


def test_context_window_and_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=V01, messages=ask("word " * 3000), max_tokens=2000)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody/nothing", messages=ask())
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=V02, messages=ask(), temperature=3)
    assert err.value.param == "temperature"
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=V02, messages=ask())


def test_models_endpoints(client, shared_gateway):
    ids = {m.id for m in client.models.list()}
    assert {V01, V02, V03, "mistralai/mistral-nemo"} <= ids
    r = httpx.get(f"{shared_gateway.base_url}/models/{V02}/endpoints", headers={"authorization": f"Bearer {GATEWAY_KEY}"})
    assert {e["provider_name"] for e in r.json()["data"]["endpoints"]} == {"deepinfra", "openrouter"}


def test_no_provider_key_leaks(client, fakes, shared_gateway):
    fakes["deepinfra"].control("status", status=401, message="invalid key di-key-e2e")
    fakes["openrouter"].control("status", status=500, message="Traceback: or-key-e2e")
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=V02, messages=ask())
    text = err.value.response.text
    assert err.value.status_code == 502
    for key in PROVIDER_KEYS.values():
        assert key not in text
        assert key not in shared_gateway.log_text()


def test_circuit_opens_and_stops_traffic(start_gateway, fakes):
    gw = start_gateway("[health]\nfailure_threshold = 2\ncooldown_s = 60\n")
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    fakes["deepinfra"].control("status", status=503)
    for _ in range(4):
        r = client.chat.completions.create(model=V02, messages=ask(), extra_body=CHEAPEST_FIRST)
        assert r.model_extra["provider"] == "openrouter"
    assert len(fakes["deepinfra"].requests(chat_only=True)) == 2  # then the circuit opened
    status = httpx.get(f"{gw.base_url}/models/{V02}/endpoints", headers={"authorization": f"Bearer {GATEWAY_KEY}"})
    assert status.json()["data"]["endpoints"][0]["status"]["circuit"] == "open"


@pytest.mark.parametrize("body,message", [
    ({"detail": "prompt is too long for this model"}, "prompt is too long for this model"),
    ({"detail": [{"loc": ["body", "max_tokens"], "msg": "ensure this value is less than 4096",
                  "type": "value_error"}]}, "ensure this value is less than 4096"),
    ("not json at all", "HTTP 422"),
])
def test_deepinfra_error_detail_reaches_the_caller(client, fakes, body, message):
    """DeepInfra answers FastAPI's ``{"detail": ...}``: the caller gets its text, not a bare status."""
    fakes["deepinfra"].control("status", status=422, body=body)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model=V02, messages=ask(), extra_body={"provider": {"only": ["deepinfra"]}})
    assert err.value.code == "upstream_rejected_request"
    assert err.value.body["message"] == message
