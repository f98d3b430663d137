"""OpenAI's Responses API (``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}``)
through the official openai SDK against ``gateway serve`` and the fake seed providers."""

from __future__ import annotations

import hashlib
import json

import httpx
import openai
import pytest

from tests.e2e.conftest import ENV_NAMES, GATEWAY_KEY, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.e2e.test_chat_e2e import V02, V03
from tests.e2e.test_limits_e2e import redis_section
from tests.e2e.test_observability_e2e import samples
from tests.fakes.servers import fault_marker
from tests.fakes.upstream import expected_content

OTHER_KEY = "sk-gw-e2e-other"
ONLY_DI = {"provider": {"only": ["deepinfra"]}}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
CALL = "[[tool_call]] weather in Paris"

TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.function_call_arguments.delta", "response.function_call_arguments.done",
               "response.output_item.done", "response.completed"]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def di_text(*messages: dict, **limits) -> str:
    """What DeepInfra's fake answers to these chat messages."""
    return expected_content("deepinfra", list(messages), flavor="deepinfra", **limits)


def collapsed(types: list[str]) -> list[str]:
    """Event types with runs of the same type (deltas) as one."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


@pytest.fixture(scope="module")
def gateway(fakes):
    """Two keys ("e2e" with an rpm limit, so rate-limit headers come, and "other")."""
    other = ["[[auth.keys]]", 'name = "other"', f'sha256 = "{hashlib.sha256(OTHER_KEY.encode()).hexdigest()}"']
    extra = "[health]\nfailure_threshold = 1000\n" + "\n".join(other) + "\n"
    env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
    with GatewayProcess(gateway_config(fakes, extra, key_fields="rpm = 10000"), env=env) as gw:
        yield gw


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)


@pytest.fixture
def other(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=OTHER_KEY, max_retries=0, timeout=30)


def test_create_gives_the_fakes_text_usage_and_cost(client, fakes):
    r = client.responses.create(model=V02, input="Say hi", instructions="Be brief", max_output_tokens=50,
                                temperature=0.3, metadata={"team": "a"}, extra_body=ONLY_DI)
    assert r.output_text == di_text(user("Say hi"))
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.model == V02 and r.model_extra["provider"] == "deepinfra"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.model_extra["estimated_cost"] == pytest.approx(r.usage.total_tokens * 0.07 / 1e6)
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert (r.instructions, r.max_output_tokens, r.temperature, r.metadata) == ("Be brief", 50, 0.3, {"team": "a"})
    assert r.store is True and r.tools == [] and r.tool_choice == "auto" and r.error is None
    sent = fakes["deepinfra"].last_request()["body"]
    assert sent["messages"] == [{"role": "system", "content": "Be brief"}, user("Say hi")]
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.3
    assert "metadata" not in sent and "store" not in sent


def test_input_items_with_parts(client, fakes):
    items = [{"role": "developer", "content": [{"type": "input_text", "text": "Answer in English"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Tell"}, {"type": "input_text", "text": "me"}]}]
    r = client.responses.create(model=V02, input=items, extra_body=ONLY_DI)
    sent = fakes["deepinfra"].last_request()["body"]["messages"]
    assert sent == [{"role": "developer", "content": "Answer in English"}, user("Hello"),
                    {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": [{"type": "text", "text": "Tell"}, {"type": "text", "text": "me"}]}]
    assert r.output_text == di_text(*sent)


def test_headers_tie_the_response_to_its_generation_record(client, gateway):
    raw = client.responses.with_raw_response.create(model=V02, input="Say hi", extra_body=ONLY_DI)
    r = raw.parse()
    assert raw.headers["x-request-id"] == "gen-" + r.id.removeprefix("resp_")
    assert raw.headers["x-ratelimit-limit-requests"] == "10000"
    assert "x-ratelimit-remaining-requests" in raw.headers
    assert raw.headers["x-gateway-provider"] == "deepinfra"
    record = httpx.get(gateway.base_url + "/generation", params={"id": raw.headers["x-request-id"]},
                       headers={"authorization": f"Bearer {GATEWAY_KEY}"}).json()["data"]
    assert record["api"] == "responses" and record["provider"] == "deepinfra"


def test_incomplete_at_max_output_tokens(client, fakes):
    r = client.responses.create(model=V02, input="one two three four five", max_output_tokens=3, extra_body=ONLY_DI)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == di_text(user("one two three four five"), max_tokens=3)
    events = list(client.responses.create(model=V02, input="one two three four five", max_output_tokens=3,
                                          stream=True, extra_body=ONLY_DI))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == r.output_text


def test_stream_event_order(client, fakes):
    events = list(client.responses.create(model=V02, input="Tell me", stream=True, extra_body=ONLY_DI))
    types = [e.type for e in events]
    assert collapsed(types) == [*TEXT_EVENTS, "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == di_text(user("Tell me"))
    assert all(e.logprobs == [] for e in events if e.type == "response.output_text.delta")
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and created.id == final.id
    assert final.status == "completed" and final.output_text == "".join(deltas)
    assert final.usage.output_tokens > 0 and final.usage.model_extra["estimated_cost"] > 0
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}
    sent = fakes["deepinfra"].last_request()["body"]
    assert sent["stream"] is True


def test_stream_helper_accumulates(client, fakes):
    with client.responses.stream(model=V02, input="Stream this", extra_body=ONLY_DI) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == di_text(user("Stream this"))
    assert final.status == "completed" and final.usage.total_tokens > 0
    # The stored copy is the streamed answer.
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_function_call_round_trip_with_previous_response_id(client, fakes):
    r1 = client.responses.create(model=V02, input=CALL, tools=TOOLS, tool_choice="auto")
    assert r1.model_extra["provider"] == "deepinfra"  # the only V02 endpoint with tools
    [call] = r1.output
    assert call.type == "function_call" and call.name == "get_weather" and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"query": "weather in Paris"} and call.status == "completed"
    assert r1.output_text == "" and r1.tools[0].name == "get_weather"
    sent = fakes["deepinfra"].last_request()["body"]
    assert sent["tools"] == CHAT_TOOLS and sent["tool_choice"] == "auto"
    r2 = client.responses.create(model=V02, tools=TOOLS, previous_response_id=r1.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}, user("thanks")])
    sent = fakes["deepinfra"].last_request()["body"]["messages"]
    assert sent == [user(CALL),
                    {"role": "assistant", "tool_calls": [
                        {"id": call.call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": call.arguments}}]},
                    {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}, user("thanks")]
    assert r2.output_text == di_text(user("thanks")) and r2.previous_response_id == r1.id


def test_function_call_round_trip_with_full_input_streamed(client, fakes):
    with client.responses.stream(model=V02, input=CALL, tools=TOOLS, store=False) as stream:
        events = list(stream)
        r1 = stream.get_final_response()
    assert collapsed([e.type for e in events]) == CALL_EVENTS
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [call] = r1.output
    assert args == call.arguments and json.loads(args) == {"query": "weather in Paris"}
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == args and done.item_id == call.id
    items = [user(CALL), call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}, user("thanks")]
    with client.responses.stream(model=V02, input=items, tools=TOOLS, store=False) as stream:
        r2 = stream.get_final_response()
    assert r2.output_text == di_text(user("thanks"))
    sent = fakes["deepinfra"].last_request()["body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.call_id and sent[2]["tool_call_id"] == call.call_id


def test_previous_response_id_carries_the_earlier_turn(client, fakes):
    r1 = client.responses.create(model=V02, input="first question", instructions="Be brief", extra_body=ONLY_DI)
    r2 = client.responses.create(model=V02, input="second", previous_response_id=r1.id, extra_body=ONLY_DI)
    sent = fakes["deepinfra"].last_request()["body"]["messages"]
    # The instructions are not carried over (as OpenAI does).
    assert sent == [user("first question"), {"role": "assistant", "content": r1.output_text}, user("second")]
    assert r2.output_text == di_text(*sent)
    r3 = client.responses.create(model=V02, input="third", previous_response_id=r2.id, stream=True, extra_body=ONLY_DI)
    final = list(r3)[-1].response
    sent = fakes["deepinfra"].last_request()["body"]["messages"]
    assert [m["content"] for m in sent] == ["first question", r1.output_text, "second", r2.output_text, "third"]
    assert final.previous_response_id == r2.id


def test_get_delete_and_other_keys(client, other, fakes):
    r = client.responses.create(model=V02, input="keep me", extra_body=ONLY_DI)
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError) as err:
        other.responses.create(model=V02, input="x", previous_response_id=r.id)
    assert err.value.code == "previous_response_not_found" and err.value.param == "previous_response_id"
    deleted = client.responses.with_raw_response.delete(r.id)
    assert deleted.http_response.json() == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(r.id)
    assert gone.value.body["message"] == f"Response with id '{r.id}' not found."
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_store_false_stores_nothing(client, fakes):
    r = client.responses.create(model=V02, input="forget me", store=False, extra_body=ONLY_DI)
    assert r.store is False and r.output_text == di_text(user("forget me"))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=V02, input="more", previous_response_id=r.id)
    assert err.value.body["message"] == f"Previous response with id '{r.id}' not found."


def test_text_format_json_schema(client, fakes):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    r = client.responses.create(model=V03, input="json please",
                                text={"format": {"type": "json_schema", "name": "thing", "schema": schema,
                                                 "strict": True}})
    sent = fakes["novita"].last_request()["body"]
    assert sent["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert r.text.format.type == "json_schema" and r.text.format.name == "thing"


@pytest.mark.parametrize("body,param", [
    ({"input": 5}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({}, "input"),
])
def test_bad_input_is_a_400_naming_the_parameter(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/responses", cast_to=httpx.Response, body={"model": V02, **body})
    assert err.value.param == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error"


def test_unsupported_parameter_is_named_in_responses_terms(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=V03, input="x", tools=TOOLS)  # novita's v0.3 takes no tools
    assert err.value.code == "unsupported_parameter" and err.value.param == "tools"


def test_mid_stream_failure_is_a_failed_event(client, fakes):
    events = list(client.responses.create(model=V02, input="a b c d e f " + fault_marker("cut_stream", after=3),
                                          stream=True, extra_body=ONLY_DI))
    types = [e.type for e in events]
    assert types[:4] == TEXT_EVENTS[:4] and "response.output_text.delta" in types
    assert types[-1] == "response.failed" and "response.completed" not in types
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and "stream" in failed.error.message
    assert failed.output[0].status == "incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(failed.id)  # a failed answer is not stored


def test_requests_are_counted_under_api_responses(client, gateway):
    def count() -> float:
        text = httpx.get(gateway.url + "/metrics").text
        return sum(v for k, v in samples(text, "gateway_requests_total").items()
                   if 'api="responses"' in k and 'status="200"' in k)

    before = count()
    client.responses.create(model=V02, input="count me", extra_body=ONLY_DI)
    list(client.responses.create(model=V02, input="count me", stream=True, extra_body=ONLY_DI))
    assert count() == before + 2


def test_post_is_in_the_openapi_schema(gateway):
    paths = httpx.get(gateway.url + "/openapi/openapi.json").json()["paths"]
    assert "post" in paths["/v1/responses"]
    assert {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])


def test_stored_in_redis_across_workers(start_gateway, fakes, redis_server):
    gw = start_gateway(redis_section(redis_server.url), args=["--workers", "2"])
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)
    r1 = client.responses.create(model=V02, input="remember this", extra_body=ONLY_DI)
    # Each a new connection: either worker answers, and both read Redis.
    for _ in range(4):
        fresh = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)
        assert fresh.responses.retrieve(r1.id).output_text == r1.output_text
    client.responses.create(model=V02, input="and this", previous_response_id=r1.id, extra_body=ONLY_DI)
    sent = fakes["deepinfra"].last_request()["body"]["messages"]
    assert sent == [user("remember this"), {"role": "assistant", "content": r1.output_text}, user("and this")]
    client.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r1.id)
