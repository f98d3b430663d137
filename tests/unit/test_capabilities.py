"""Issue 13, scope 1: meaning-changing parameters are never dropped; tool calls
are relayed OpenAI-shaped, streamed or not."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest
import respx

from gateway.errors import GatewayError
from gateway.protocol import ChatRequest
from gateway.upstream.adapter import ToolCallDeltas, whole_tool_calls
from tests.unit.conftest import DEEPINFRA, V02, chat, completion, make_gateway

V01 = "mistralai/mistral-7b-instruct-v0.1"
V03 = "mistralai/mistral-7b-instruct-v0.3"
NEMO = "mistralai/mistral-nemo"
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
LOCAL_ENV = {"DEEPINFRA_TOKEN": "k", "OPENROUTER_API_KEY": "k", "NOVITA_API_KEY": "k",
             "GATEWAY_LOCAL_URL": "http://127.0.0.1:9/v1"}


def candidates(gw, **body):
    body = {"messages": [{"role": "user", "content": "Hello!"}], **body}
    request = msgspec.json.decode(json.dumps(body), type=ChatRequest)
    return gw.router.plan(request)


def plan(gw, **body):
    return [c.endpoint.provider.name for c in candidates(gw, **body)]


def refused(gw, **body) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        plan(gw, **body)
    return err.value


def local_gateway():
    gw = make_gateway(env=LOCAL_ENV)
    gw.catalog.providers["local"].ready = True
    return gw


def test_tools_never_planned_on_an_endpoint_without_tools():
    gw = make_gateway()
    for _ in range(200):  # the weighted order puts openrouter first ~13% of the time
        assert plan(gw, model=V02, tools=TOOLS, tool_choice="auto") == ["deepinfra"]


@pytest.mark.parametrize(("field", "value", "model"), [
    ("tools", TOOLS, V01),                                  # OpenRouter v0.1 lists no tools
    ("tool_choice", "auto", V03),                           # Novita lists no tool_choice
    ("parallel_tool_calls", False, V02),                    # nobody lists it
    ("response_format", {"type": "json_object"}, V01),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, NEMO),
    ("logprobs", True, V02),
    ("top_logprobs", 3, V02),
    ("n", 3, V02),                                          # DeepInfra's n <= 2; OpenRouter lists no n
    ("stop", ["x"], V03),                                   # Novita lists no stop
    ("stop", "x", NEMO),
])
def test_strict_parameter_no_endpoint_takes_is_a_400(field, value, model):
    err = refused(make_gateway(), model=model, **{field: value})
    assert err.status == 400 and err.code == "unsupported_parameter"
    assert err.param == field and repr(field) in err.message


def test_n_within_deepinfras_range_goes_there_and_neutral_values_are_not_strict():
    gw = make_gateway()
    assert plan(gw, model=V02, n=2, provider={"sort": "price"}) == ["deepinfra"]
    # n=1, logprobs=false and stop=null ask for nothing: dropping them changes nothing.
    cands = candidates(gw, model=V02, n=1, logprobs=False, stop=None, provider={"sort": "price"})
    assert [c.endpoint.provider.name for c in cands] == ["deepinfra", "openrouter"]
    assert cands[1].dropped == ["n", "logprobs"]  # stop=null: openrouter lists stop


def test_pure_sampling_knobs_are_still_dropped():
    gw = make_gateway()
    cands = candidates(gw, model=V02, top_k=5, min_p=0.1, seed=1, logit_bias={"1": 2}, tools=TOOLS)
    assert [c.endpoint.provider.name for c in cands] == ["deepinfra"]
    assert cands[0].dropped == ["top_k", "min_p", "seed", "logit_bias"]


def test_require_parameters_makes_every_parameter_strict():
    err = refused(make_gateway(), model=V02, top_k=5, tools=TOOLS, provider={"require_parameters": True})
    assert err.code == "unsupported_parameter" and err.param in {"top_k", "tools"}


def test_local_fallback_is_skipped_for_a_strict_parameter_it_lacks():
    gw = local_gateway()
    assert plan(gw, model=V02, provider={"sort": "price"}) == ["deepinfra", "openrouter", "local"]
    assert plan(gw, model=V02, tools=TOOLS, provider={"sort": "price"}) == ["deepinfra"]
    # The local backend would have taken v0.1's place before: no tools there either.
    err = refused(gw, model=V01, tools=TOOLS)
    assert err.code == "unsupported_parameter" and err.param == "tools"
    # Stop: up to 4 strings locally; n: 1 only.
    assert plan(gw, model=V01, stop=["a", "b", "c", "d"]) == ["openrouter", "local"]
    assert plan(gw, model=V01, stop=["a", "b", "c", "d", "e"]) == ["openrouter"]
    assert refused(gw, model=NEMO, n=3).param == "n"


def test_an_unhealthy_capable_endpoint_is_a_503_not_a_400():
    gw = make_gateway()
    key = "deepinfra:mistralai/Mistral-7B-Instruct-v0.2"
    for _ in range(gw.health.failure_threshold):
        gw.health.failure(key, "status")
    err = refused(gw, model=V02, tools=TOOLS)
    assert err.status == 503


# --- tool calls relayed ---------------------------------------------------------


def test_tool_call_deltas_from_a_provider_that_repeats_the_id_and_omits_the_index():
    calls = ToolCallDeltas()
    raw = [
        [{"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": '{"q":'}}],
        [{"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": ' "x"}'}}],
        [{"id": "call_b", "type": "function", "function": {"name": "other", "arguments": "{}"}}],
        [{"function": {"arguments": ""}}],  # no id, no index: the last call
    ]
    out = [json.loads(bytes(calls.normalize(msgspec.Raw(json.dumps(r).encode())))) for r in raw]  # type: ignore[arg-type]
    assert out[0] == [{"index": 0, "id": "call_a", "type": "function",
                       "function": {"name": "lookup", "arguments": '{"q":'}}]
    assert out[1] == [{"index": 0, "function": {"arguments": ' "x"}'}}]
    assert out[2] == [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "other", "arguments": "{}"}}]
    assert out[3] == [{"index": 1, "function": {"arguments": ""}}]


def test_tool_call_deltas_keep_indexes_and_give_an_id_when_the_provider_sends_none():
    calls = ToolCallDeltas()
    first = json.loads(bytes(calls.normalize(msgspec.Raw(b'[{"index":0,"function":{"name":"f","arguments":{"a":1}}}]'))))
    assert first[0]["id"].startswith("call_") and first[0]["type"] == "function"
    assert first[0]["function"] == {"name": "f", "arguments": '{"a":1}'}
    again = json.loads(bytes(calls.normalize(msgspec.Raw(b'[{"index":0,"id":"x","function":{"arguments":"1"}}]'))))
    assert again == [{"index": 0, "function": {"arguments": "1"}}]


def test_whole_tool_calls_are_openai_shaped():
    raw = msgspec.Raw(b'[{"function":{"name":"f","arguments":{"a":1}}}]')
    out = json.loads(bytes(whole_tool_calls(raw)))
    assert out[0]["type"] == "function" and out[0]["id"].startswith("call_")
    assert json.loads(out[0]["function"]["arguments"]) == {"a": 1}


def sse(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def di_chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@respx.mock
def test_streamed_tool_call_through_deepinfra_is_normalized(client_for):
    client = client_for(make_gateway())
    piece = {"role": "assistant", "tool_calls": [{"id": "call_a", "type": "function",
                                                  "function": {"name": "lookup", "arguments": ""}}]}
    pieces = [{**piece, "tool_calls": [{**piece["tool_calls"][0], "function": {"name": "lookup", "arguments": a}}]}
              for a in ('{"q', '": "Paris"', "}")]
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, text=sse(
        *(di_chunk(p) for p in pieces), di_chunk({}, "tool_calls"))))
    r = client.post("/v1/chat/completions", json=chat(stream=True, tools=TOOLS))
    assert r.status_code == 200, r.text
    out = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    calls = [tc for c in out if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [tc["index"] for tc in calls] == [0, 0, 0]
    assert [tc.get("id") for tc in calls] == ["call_a", None, None]
    assert [tc.get("type") for tc in calls] == ["function", None, None]
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"q": "Paris"}
    assert [c["choices"][0].get("finish_reason") for c in out if c["choices"]][-1] == "tool_calls"


@respx.mock
def test_non_streamed_tool_call_is_relayed(client_for):
    client = client_for(make_gateway())
    body = completion()
    body["choices"] = [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        # Arguments as an object and no type: a shape OpenAI's SDK cannot read, normalized.
        "tool_calls": [{"id": "call_a", "function": {"name": "lookup", "arguments": {"q": 1}}}]}}]
    route = respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=body))
    r = client.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice="auto"))
    assert r.status_code == 200 and json.loads(route.calls[0].request.content)["tools"] == TOOLS
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["id"] == "call_a"
    assert choice["message"]["tool_calls"][0]["type"] == "function"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"q": 1}
