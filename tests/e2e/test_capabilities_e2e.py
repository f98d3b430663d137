"""Issue 13 through the official openai SDK against ``gateway serve`` and the
fake seed providers: tools only where tools are, strict parameters refused
rather than dropped, tool calls round-tripped, OpenRouter's provider fields."""

from __future__ import annotations

import json

import openai
import pytest

from tests.e2e.test_chat_e2e import V01, V02, ask

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"query": {"type": "string"}}}}}]
CALL = "[[tool_call]] weather in Paris"


def test_a_tools_request_never_lands_on_an_endpoint_without_tools(client, fakes):
    # Without the rule ~13% of first picks go to OpenRouter's v0.2, which lists no tools
    # (0.87^60 < 0.03%); every answer comes from DeepInfra, tools sent.
    served = [client.chat.completions.create(model=V02, messages=ask(), tools=TOOLS).model_extra["provider"]
              for _ in range(60)]
    assert set(served) == {"deepinfra"}, served
    assert fakes["deepinfra"].last_request()["body"]["tools"] == TOOLS
    assert fakes["openrouter"].requests(chat_only=True) == []


def test_no_endpoint_with_the_parameter_is_a_400(client, fakes):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=V01, messages=ask(), tools=TOOLS)
    assert err.value.code == "unsupported_parameter" and err.value.param == "tools"
    assert "'tools'" in err.value.message


def test_n_over_deepinfras_limit_is_refused_not_dropped(client, fakes):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=V02, messages=ask(), n=3, extra_body={"provider": {"only": ["deepinfra"]}})
    assert err.value.code == "unsupported_parameter" and err.value.param == "n"
    r = client.chat.completions.create(model=V02, messages=ask(), n=2, extra_body={"provider": {"only": ["deepinfra"]}})
    assert len(r.choices) == 2 and fakes["deepinfra"].last_request()["body"]["n"] == 2


def test_non_streamed_tool_call_round_trip(client, fakes):
    r = client.chat.completions.create(model=V02, messages=ask(CALL), tools=TOOLS, tool_choice="auto")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and r.model_extra["provider"] == "deepinfra"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"query": "weather in Paris"}
    # The result goes back as a tool message and the conversation goes on.
    r2 = client.chat.completions.create(model=V02, tools=TOOLS, messages=[
        *ask(CALL), choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}, *ask("thanks")])
    assert r2.choices[0].finish_reason == "stop"


def test_streamed_tool_call_round_trip(client, fakes):
    # DeepInfra's fake repeats role, id and type on every piece and sends no index.
    chunks = list(client.chat.completions.create(model=V02, messages=ask(CALL), tools=TOOLS, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) > 2 and all(d.index == 0 for d in deltas)
    assert [d.id for d in deltas if d.id] == [deltas[0].id]
    assert [d.type for d in deltas if d.type] == ["function"]
    assert deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == {"query": "weather in Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The SDK's own accumulator agrees.
    with client.beta.chat.completions.stream(model=V02, messages=ask(CALL), tools=TOOLS) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"query": "weather in Paris"}


def test_a_pure_knob_is_still_dropped_with_the_header(client, fakes):
    raw = client.chat.completions.with_raw_response.create(
        model=V02, messages=ask(), tools=TOOLS, extra_body={"top_k": 5, "seed": 3})
    assert raw.headers["x-gateway-dropped-params"] == "top_k,seed"
    assert raw.parse().model_extra["provider"] == "deepinfra"


def test_openrouter_provider_fields_through_extra_body(client, fakes):
    provider = {"quantizations": ["FP8"], "sort": {"by": "price", "partition": "none"},
                "max_price": {"prompt": 1, "completion": 1, "request": 0.01}, "data_collection": "allow",
                "zdr": False, "preferred_min_throughput": {"p50": 1, "p90": 2}, "preferred_max_latency": 30}
    raw = client.chat.completions.with_raw_response.create(model=V02, messages=ask(),
                                                           extra_body={"provider": provider})
    assert raw.parse().model_extra["provider"] == "deepinfra"
    assert raw.headers["x-gateway-ignored"] == "sort.partition,max_price.request,preferred_min_throughput.p90"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=V02, messages=ask(), extra_body={"provider": {"data_collection": "deny"}})
    assert err.value.code == "no_endpoints_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=V02, messages=ask(), extra_body={"provider": {"zdr": True, "nope": 1}})
    assert "nope" in bad.value.message
