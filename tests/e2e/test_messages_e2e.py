"""Anthropic's Messages API through the official anthropic SDK against
``gateway serve`` and the fake seed providers: plain and streamed answers,
tool use both ways, auth, errors in Anthropic's shape, limits, count_tokens."""

from __future__ import annotations

import functools
import json
import time
from importlib import resources
from typing import Any

import anthropic
import httpx
import pytest

from tests.e2e.conftest import GATEWAY_KEY
from tests.e2e.test_chat_e2e import V02
from tests.e2e.test_observability_e2e import samples
from tests.fakes.servers import fault_marker
from tests.fakes.upstream import expected_content, prompt_tokens

DEEPINFRA = {"provider": {"only": ["deepinfra"]}}
TOOLS = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}]
CALL = "[[tool_call]] weather in Paris"


def ask(text: str = "Say hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def sent(fakes) -> dict:
    """The chat body the gateway sent DeepInfra last."""
    return fakes["deepinfra"].last_request()["body"]


def fake_usage(body: dict, completion_text: str) -> tuple[int, int]:
    """The usage the fake reports for the body it received."""
    return prompt_tokens(body["messages"]), len(completion_text.split())


@pytest.fixture
def claude(shared_gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=shared_gateway.url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)


def test_create_through_the_sdk(claude, fakes):
    msg = claude.messages.create(model=V02, max_tokens=100, system="Be brief.", messages=ask("Tell me"),
                                 metadata={"user_id": "u-1"},
                                 # anthropic 2.x dropped the sampling knobs from create(); older SDKs send them.
                                 extra_body={"temperature": 0.5, "top_p": 0.9, **DEEPINFRA})
    body = sent(fakes)
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me"}]
    assert body["max_tokens"] == 100 and body["temperature"] == 0.5 and body["top_p"] == 0.9
    text = expected_content("deepinfra", body["messages"])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == V02
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == text
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == fake_usage(body, text)
    # The gateway's extras ride along; the SDK keeps them.
    assert msg.model_extra["provider"] == "deepinfra"
    total = msg.usage.input_tokens + msg.usage.output_tokens
    assert msg.usage.model_extra["estimated_cost"] == pytest.approx(total * 0.07 / 1e6)


def test_stop_reasons_max_tokens_and_stop_sequences(claude, fakes):
    msg = claude.messages.create(model=V02, max_tokens=2, messages=ask("one two three four"), extra_body=DEEPINFRA)
    assert msg.stop_reason == "max_tokens"
    assert msg.content[0].text == expected_content("deepinfra", sent(fakes)["messages"], max_tokens=2)
    msg = claude.messages.create(model=V02, max_tokens=50, messages=ask("alpha beta gamma"),
                                 stop_sequences=["beta"], extra_body=DEEPINFRA)
    assert sent(fakes)["stop"] == ["beta"]
    assert msg.content[0].text == expected_content("deepinfra", sent(fakes)["messages"], stop=["beta"])
    # Chat's finish_reason does not say a stop sequence matched (see the README).
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None


def test_stream_helper_text_and_final_message(claude, fakes):
    with claude.messages.stream(model=V02, max_tokens=100, system="Be brief.", messages=ask("Stream me"),
                                extra_body=DEEPINFRA) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    body = sent(fakes)
    assert body["stream"] is True
    expected = expected_content("deepinfra", body["messages"])
    assert text == expected and "</s>" not in text
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == expected
    assert final.stop_reason == "end_turn" and final.id.startswith("msg_")
    # DeepInfra streams no usage, so the gateway counts both sides with the model's
    # tokenizer: the prompt as count_tokens does, the answer as its text. input_tokens
    # comes with message_delta, which the SDK merges into the final message.
    counted = claude.messages.count_tokens(model=V02, system="Be brief.", messages=ask("Stream me"))
    assert final.usage.input_tokens == counted.input_tokens == _v1_chat_tokens("Be brief.", "Stream me")
    assert final.usage.output_tokens == _v1_tokens(expected)


def test_raw_events_in_order(claude, shared_gateway, fakes):
    events = list(claude.messages.create(model=V02, max_tokens=100, messages=ask("Order please"), stream=True,
                                         extra_body=DEEPINFRA))
    types = [e.type for e in events]
    n = types.count("content_block_delta")
    assert types == ["message_start", "content_block_start", *["content_block_delta"] * n,
                     "content_block_stop", "message_delta", "message_stop"]
    start = events[0].message
    assert start.id.startswith("msg_") and start.content == [] and start.stop_reason is None
    assert events[-2].delta.stop_reason == "end_turn"
    # On the wire: a ping right after message_start (the SDK drops pings).
    r = httpx.post(shared_gateway.url + "/v1/messages", headers={"x-api-key": GATEWAY_KEY}, timeout=30,
                   json={"model": V02, "max_tokens": 50, "stream": True, "messages": ask("Ping"), **DEEPINFRA})
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-request-id"]
    wire = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert wire[:3] == ["message_start", "ping", "content_block_start"] and wire[-1] == "message_stop"
    assert [d["type"] for d in data] == wire
    deltas = "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta")
    assert deltas == expected_content("deepinfra", sent(fakes)["messages"])


def test_tool_use_round_trip(claude, fakes):
    msg = claude.messages.create(model=V02, max_tokens=100, messages=ask(CALL), tools=TOOLS,
                                 tool_choice={"type": "auto"})
    assert msg.model_extra["provider"] == "deepinfra"
    body = sent(fakes)
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": TOOLS[0]["input_schema"]}}]
    assert body["tool_choice"] == "auto"
    assert msg.stop_reason == "tool_use"
    [use] = msg.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id
    assert use.input == {"query": "weather in Paris"}
    # The result goes back as a tool_result block and the conversation goes on.
    final = claude.messages.create(model=V02, max_tokens=100, tools=TOOLS, messages=[
        *ask(CALL), {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"},
                                     {"type": "text", "text": "thanks"}]}])
    body = sent(fakes)
    assert body["messages"][1:] == [
        {"role": "assistant", "tool_calls": [
            {"type": "function", "id": use.id,
             "function": {"name": "get_weather", "arguments": json.dumps(use.input, separators=(",", ":"))}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": use.id},
        {"role": "user", "content": "thanks"}]
    assert final.stop_reason == "end_turn"
    assert final.content[0].text == expected_content("deepinfra", body["messages"])


def test_streamed_tool_use(claude, fakes):
    with claude.messages.stream(model=V02, max_tokens=100, messages=ask(CALL), tools=TOOLS) as s:
        events = list(s)
        final = s.get_final_message()
    pieces = [e.delta.partial_json for e in events
              if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(pieces) > 2  # the arguments came in pieces, and the SDK put them together
    assert json.loads("".join(pieces)) == {"query": "weather in Paris"}
    [use] = final.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("call_")
    assert use.input == {"query": "weather in Paris"} and final.stop_reason == "tool_use"
    starts = [e for e in events if e.type == "content_block_start"]
    assert [(e.index, e.content_block.type) for e in starts] == [(0, "tool_use")]


def test_auth_by_x_api_key_and_bearer(shared_gateway, fakes):
    bearer = anthropic.Anthropic(base_url=shared_gateway.url, auth_token=GATEWAY_KEY, max_retries=0)
    assert bearer.messages.create(model=V02, max_tokens=20, messages=ask()).content
    wrong = anthropic.Anthropic(base_url=shared_gateway.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model=V02, max_tokens=20, messages=ask())
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "authentication_error"
    assert err.value.response.headers["x-request-id"]
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model=V02, messages=ask())
    # Anthropic's headers are accepted, not required.
    r = httpx.post(shared_gateway.url + "/v1/messages", json={"model": V02, "max_tokens": 20, "messages": ask()},
                   headers={"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01",
                            "anthropic-beta": "tools-2024-04-04"}, timeout=30)
    assert r.status_code == 200 and r.json()["type"] == "message"


def test_bad_requests_are_400s_in_anthropics_shape(claude, shared_gateway, fakes):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=V02, messages=ask(), max_tokens=anthropic.omit)  # none sent
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=V02, max_tokens=10, messages=ask(),
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "tools[0].type" in err.value.message
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=V02, max_tokens=10, messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert "text" in err.value.message
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=V02, max_tokens=10, messages=ask(), extra_body={"temperature": 1.5})
    assert "temperature" in err.value.message
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no/such", max_tokens=10, messages=ask())
    assert missing.value.body["error"]["type"] == "not_found_error"
    # A strict parameter no endpoint takes is named as Anthropic names it.
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=V02, max_tokens=10, messages=ask(), tools=TOOLS,
                               tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert "'tool_choice.disable_parallel_tool_use'" in err.value.message
    # Unknown fields (thinking, service_tier) are ignored; fakes never see them.
    msg = claude.messages.create(model=V02, max_tokens=20, messages=ask(), extra_body={
        "service_tier": "auto", "thinking": {"type": "enabled", "budget_tokens": 1024}, **DEEPINFRA})
    assert msg.content and "thinking" not in sent(fakes) and "service_tier" not in sent(fakes)
    r = httpx.post(shared_gateway.url + "/v1/messages", content=b"{not json", timeout=30,
                   headers={"x-api-key": GATEWAY_KEY, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_rate_limit(start_gateway, fakes):
    gw = start_gateway(key_fields="rpm = 1")
    client = anthropic.Anthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0)
    client.messages.create(model=V02, max_tokens=20, messages=ask())
    with pytest.raises(anthropic.RateLimitError) as err:
        client.messages.create(model=V02, max_tokens=20, messages=ask())
    assert err.value.body["error"]["type"] == "rate_limit_error"
    assert err.value.response.headers["retry-after"]


@functools.cache
def _v1() -> Any:
    """mistralai/mistral-7b-instruct-v0.2's tokenizer in the catalog (v1), straight from mistral-common."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")))


def _v1_tokens(text: str) -> int:
    return len(_v1().instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)) if text else 0


def _v1_chat_tokens(system: str, user: str) -> int:
    """mistral-common's own count of a system prompt and a user turn, template included."""
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest(messages=[SystemMessage(content=system), UserMessage(content=user)])
    return len(_v1().encode_chat_completion(request).tokens)


def test_count_tokens(claude):
    system, question = "You are terse.", "How many tokens is this sentence, roughly?"
    counted = claude.messages.count_tokens(model=V02, system=system, messages=ask(question)).input_tokens
    assert counted == _v1_chat_tokens(system, question)
    longer = claude.messages.count_tokens(model=V02, system=system, messages=ask(question + " And more words."))
    assert longer.input_tokens > counted
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.count_tokens(model="no/such", messages=ask())
    assert err.value.body["error"]["type"] == "not_found_error"


def test_mid_stream_failure_is_an_error_event(claude, fakes):
    text = "cut me short please now " + fault_marker("cut_stream", after=3)
    with pytest.raises(anthropic.APIStatusError) as err:
        with claude.messages.stream(model=V02, max_tokens=100, messages=ask(text), extra_body=DEEPINFRA) as s:
            for _ in s:
                pass
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "api_error"
    assert "stream" in err.value.body["error"]["message"]


def test_request_id_header_and_metrics(claude, shared_gateway):
    def served() -> float:
        text = httpx.get(shared_gateway.url + "/metrics").text
        return sum(v for k, v in samples(text, "gateway_requests_total").items()
                   if 'api="messages"' in k and 'status="200"' in k)

    before = served()
    raw = claude.messages.with_raw_response.create(model=V02, max_tokens=20, messages=ask())
    request_id = raw.headers["x-request-id"]
    assert raw.parse().id == "msg_" + request_id.removeprefix("gen-")
    assert raw.headers["x-gateway-provider"] in ("deepinfra", "openrouter")
    deadline = time.monotonic() + 5  # accounted just behind the response
    while served() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served() == before + 1
