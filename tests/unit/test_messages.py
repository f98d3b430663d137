"""Anthropic's Messages API: the translation to chat and back, the stream's
events (fed to the anthropic SDK's own accumulator), errors in Anthropic's
shape, and the HTTP surface through the production client to real local
upstreams (``tests/unit/upstream_server.py``)."""

from __future__ import annotations

import hashlib
import json

import httpx
import msgspec
import pytest
from anthropic.lib.streaming._messages import accumulate_event

from gateway.errors import GatewayError
from gateway.pipeline.decode import decode_body
from gateway.pipeline.messages import (
    MESSAGES,
    MessagesEvents,
    MessagesExchange,
    chat_request,
    error_body,
    stop_reason,
    tool_input,
)
from gateway.protocol import (
    AssistantMessage,
    ChatChunkOut,
    ChatCompletionOut,
    ChoiceOut,
    ChunkChoiceOut,
    ContentFilterResults,
    Delta,
    Usage,
)
from gateway.protocol.messages import MessagesRequest
from tests.unit.conftest import KEYS, V02, completion, make_gateway
from tests.unit.test_providers import chunk, sse
from tests.unit.upstream_server import Upstream, gateway_over, json_answer, sse_answer, upstreams

__all__ = ["upstreams"]

ONLY_DEEPINFRA = {"provider": {"only": ["deepinfra"]}}
TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {}}}


def body(**extra) -> dict:
    return {"model": V02, "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}], **extra}


def translate(**extra) -> dict:
    """The chat request a message request becomes, as the JSON sent upstream."""
    raw = msgspec.json.encode(body(**extra))
    return json.loads(msgspec.json.encode(chat_request(decode_body(raw, MessagesRequest))))


def bad(**extra) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        translate(**extra)
    assert err.value.status == 400
    return err.value


# --- request translation ---------------------------------------------------------


def test_plain_fields_map_to_chat():
    chat = translate(system=[{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}],
                     stop_sequences=["END"], temperature=1, top_p=0.5, top_k=3,
                     metadata={"user_id": "u-9"}, stream=True, models=["mistralai/mistral-nemo"], **ONLY_DEEPINFRA)
    assert chat == {
        "messages": [{"role": "system", "content": "Be\nbrief."}, {"role": "user", "content": "Hello"}],
        "model": V02, "models": ["mistralai/mistral-nemo"], "provider": chat["provider"],
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 1, "top_p": 0.5, "top_k": 3,
        "max_tokens": 64, "stop": ["END"], "user": "u-9",
    }
    assert chat["provider"]["only"] == ["deepinfra"]
    assert "stream_options" not in translate() and "stop" not in translate(stop_sequences=[])


def test_blocks_become_parts_tool_calls_and_tool_messages():
    png = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    chat = translate(messages=[
        {"role": "user", "content": [{"type": "text", "text": "Look", "cache_control": {"type": "ephemeral"}},
                                     {"type": "image", "source": png},
                                     {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Calling"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Here:"},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "city"}]}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_3"}]},
    ])
    assert chat["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                     {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]},
        {"role": "assistant", "content": "Calling", "tool_calls": [
            {"type": "function", "id": "toolu_1", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"type": "function", "id": "toolu_2", "function": {"name": "get_weather", "arguments": "{}"}}]},
        # Tool results first (chat wants them right after the call), then the rest of the turn.
        {"role": "tool", "content": "sunny", "tool_call_id": "toolu_1"},
        {"role": "tool", "content": "Error: no\ncity", "tool_call_id": "toolu_2"},
        {"role": "user", "content": "Here:"},
        {"role": "tool", "content": "", "tool_call_id": "toolu_3"},
    ]


@pytest.mark.parametrize("choice,expected,serial", [
    ({"type": "auto"}, "auto", False),
    ({"type": "any"}, "required", False),
    ({"type": "none"}, "none", False),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}, False),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", True),
])
def test_tools_and_tool_choice(choice, expected, serial):
    chat = translate(tools=[TOOL, {**TOOL, "name": "t2", "type": "custom", "description": "d"}], tool_choice=choice)
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                          "parameters": TOOL["input_schema"]}},
        {"type": "function", "function": {"name": "t2", "description": "d", "parameters": TOOL["input_schema"]}},
    ]
    assert chat["tool_choice"] == expected
    assert chat.get("parallel_tool_calls") is (False if serial else None)


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "x", "input_schema": [1]}]}, "tools[0].input_schema"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": [1]}]}]},
     "messages[0].content[0].input"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": [
        {"type": "image", "source": {"type": "url", "url": "u"}}]}]}]}, "messages[0].content[0].content[0]"),
    ({"messages": [{"role": "system", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": []}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"temperature": 1.5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "9"}, "max_tokens"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"metadata": {"user_id": 3}}, "metadata.user_id"),
    ({"stream": "yes"}, "stream"),
    ({"system": 5}, "system"),
])
def test_bad_requests_name_the_path(extra, param):
    err = bad(**extra)
    assert err.param == param and param in err.message


def test_max_tokens_is_required_and_unknown_fields_ignored():
    raw = msgspec.json.encode({"model": V02, "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(GatewayError) as err:
        decode_body(raw, MessagesRequest)
    assert "max_tokens" in err.value.message
    chat = translate(thinking={"type": "enabled", "budget_tokens": 1000}, service_tier="auto", container="c")
    assert set(chat) == {"messages", "model", "max_tokens"}


# --- answers ---------------------------------------------------------------------


def answer(content=None, tool_calls=None, finish="stop", refusal=None) -> dict:
    message = AssistantMessage(content=content, refusal=refusal if refusal is not None else msgspec.UNSET)
    if tool_calls is not None:
        message.tool_calls = msgspec.Raw(json.dumps(tool_calls).encode())
    out = ChatCompletionOut(
        id="gen-abc123", object="chat.completion", created=1, model=V02, provider="deepinfra",
        choices=[ChoiceOut(index=0, message=message, finish_reason=finish,
                           content_filter_results=ContentFilterResults())],
        usage=Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10, estimated_cost=1e-6),
        prompt_filter_results=[],
    )
    exchange = MessagesExchange(chat_request(decode_body(msgspec.json.encode(body()), MessagesRequest)), "gen-abc123")
    return json.loads(exchange.answer(out))


def call(arguments: str, cid: str = "call_1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def test_a_text_answer():
    assert answer("Hi there") == {
        "id": "msg_abc123", "type": "message", "role": "assistant", "model": V02,
        "content": [{"type": "text", "text": "Hi there"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 3, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "estimated_cost": 1e-6},
        "provider": "deepinfra",
    }
    assert answer("", finish="length")["content"] == [] and answer("x", finish="length")["stop_reason"] == "max_tokens"
    refused = answer(None, finish="content_filter", refusal="I can't")
    assert refused["stop_reason"] == "refusal" and refused["content"] == [{"type": "text", "text": "I can't"}]


def test_a_tool_use_answer():
    out = answer("Let me look.", [call('{"city": "Paris"}'), call("", "call_2")], finish="tool_calls")
    assert out["stop_reason"] == "tool_use"
    assert out["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
    ]
    # Some upstreams say "stop" for a tool call.
    assert answer(None, [call("{}")], finish="stop")["stop_reason"] == "tool_use"


@pytest.mark.parametrize("arguments,expected", [
    ('{"a": [1, 2]}', {"a": [1, 2]}),
    ("  ", {}),
    ('"{\\"a\\": 1}"', {"a": 1}),  # encoded twice
    ('{"a": 1', {"_raw_arguments": '{"a": 1'}),
    ("[1, 2]", {"_raw_arguments": "[1, 2]"}),
    ('"plain"', {"_raw_arguments": '"plain"'}),
])
def test_tool_input_from_arguments(arguments, expected):
    assert json.loads(bytes(tool_input(arguments))) == expected


@pytest.mark.parametrize("finish,tools,expected", [
    ("stop", False, "end_turn"), ("length", False, "max_tokens"), ("tool_calls", True, "tool_use"),
    ("content_filter", False, "refusal"), ("function_call", True, "tool_use"), (None, False, "end_turn"),
    ("length", True, "max_tokens"), ("weird", False, "end_turn"),
])
def test_stop_reasons(finish, tools, expected):
    assert stop_reason(finish, tools) == expected


# --- stream events ---------------------------------------------------------------


def out_chunk(delta: Delta | None = None, finish: str | None = None, usage: Usage | None = None) -> ChatChunkOut:
    choices = [] if delta is None and finish is None else [
        ChunkChoiceOut(index=0, delta=delta or Delta(), finish_reason=finish)]
    c = ChatChunkOut(id="gen-abc123", object="chat.completion.chunk", created=1, model=V02, provider="deepinfra",
                     choices=choices)
    if usage is not None:
        c.usage = usage
    return c


def parse(stream: bytes) -> list[tuple[str, dict]]:
    out = []
    for event in stream.decode().split("\n\n"):
        if event:
            name, data = event.split("\n")
            assert name.startswith("event: ") and data.startswith("data: ")
            out.append((name[7:], json.loads(data[6:])))
    return out


def tool_delta(*pieces: dict) -> Delta:
    return Delta(tool_calls=msgspec.Raw(json.dumps(list(pieces)).encode()))


def test_stream_events_and_the_sdks_accumulation():
    events = MessagesEvents("msg_abc123")
    assert events.keepalive == b'event: ping\ndata: {"type": "ping"}\n\n'
    usage = Usage(prompt_tokens=11, completion_tokens=5, total_tokens=16, estimated_cost=2e-6)
    wire = b"".join([
        events.chunk(out_chunk(Delta(role="assistant", content=""))),
        events.chunk(out_chunk(Delta(content="Hi"))),
        events.chunk(out_chunk(Delta(content=" there"))),
        events.chunk(out_chunk(tool_delta({"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": "get_weather", "arguments": ""}}))),
        events.chunk(out_chunk(tool_delta({"index": 0, "function": {"arguments": '{"city":'}}))),
        events.chunk(out_chunk(tool_delta({"index": 0, "function": {"arguments": ' "Paris"}'}},
                                          {"index": 1, "id": "call_2", "type": "function",
                                           "function": {"name": "noop", "arguments": "{}"}}))),
        events.chunk(out_chunk(finish="tool_calls")),
        events.chunk(out_chunk(usage=usage)),
        events.done(),
    ])
    parsed = parse(wire)
    assert [(name, data["type"]) for name, data in parsed] == [(d["type"], d["type"]) for _, d in parsed]
    assert [name for name, _ in parsed] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert parsed[0][1]["message"]["usage"]["input_tokens"] == 0
    assert parsed[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 11, "output_tokens": 5, "estimated_cost": 2e-6}}
    # The SDK's own accumulator (what messages.stream() uses) builds the message.
    snapshot = None
    bufs: dict[int, bytes] = {}
    for name, data in parsed:
        if name != "ping":
            snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    message = snapshot.to_dict()
    assert message["id"] == "msg_abc123" and message["stop_reason"] == "tool_use"
    assert message["content"] == [
        {"type": "text", "text": "Hi there"},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "noop", "input": {}},
    ]
    assert message["usage"]["input_tokens"] == 11 and message["usage"]["output_tokens"] == 5


def test_stream_failure_is_an_error_event():
    events = MessagesEvents("msg_x")
    started = events.chunk(out_chunk(Delta(content="Hi")))
    assert [n for n, _ in parse(started)] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    failed = parse(events.failed(out_chunk(finish="error"), "upstream stream failed: cut"))
    assert failed == [("error", {"type": "error", "error": {"type": "api_error",
                                                            "message": "upstream stream failed: cut"}})]


# --- errors ----------------------------------------------------------------------


@pytest.mark.parametrize("status,kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (405, "invalid_request_error"),
    (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
    (503, "overloaded_error"), (504, "timeout_error"),
])
def test_error_shape(status, kind):
    exc = GatewayError(status, "nope", headers={"x-request-id": "gen-1"})
    assert json.loads(error_body(exc)) == {"type": "error", "error": {"type": kind, "message": "nope"},
                                           "request_id": "gen-1"}
    assert json.loads(MESSAGES.error_body(GatewayError(status, "m"))) == {
        "type": "error", "error": {"type": kind, "message": "m"}}


def test_unsupported_parameter_named_as_anthropic_names_it():
    exc = GatewayError(400, "no endpoint of 'm' supports 'stop' as given", code="unsupported_parameter", param="stop")
    assert json.loads(error_body(exc))["error"]["message"] == "no endpoint of 'm' supports 'stop_sequences' as given"


# --- over HTTP -------------------------------------------------------------------

KEY = "sk-gw-test-123"


def keyed_gateway(extra: str = "", servers: dict[str, Upstream] | None = None):
    """A gateway with ``KEY``; over ``servers`` with its production client when given."""
    toml = f'[[auth.keys]]\nname = "team-a"\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n{extra}'
    return make_gateway(toml) if servers is None else gateway_over(servers, toml)


def anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == kind
    return str(data["error"]["message"])


def test_http_auth_answers_and_errors(client_for, upstreams):
    client = client_for(keyed_gateway("[server]\nmax_body_bytes = 4096\n", upstreams))
    upstreams["deepinfra"].answer(json_answer(completion("Hi!")))
    anthropic_error(client.post("/v1/messages", json=body()), 401, "authentication_error")
    anthropic_error(client.post("/v1/messages", json=body(), headers={"x-api-key": "wrong"}), 401,
                    "authentication_error")
    for headers in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"},
                    {"x-api-key": KEY, "authorization": "Bearer wrong"}):
        r = client.post("/v1/messages", json=body(**ONLY_DEEPINFRA), headers=headers)
        assert r.status_code == 200 and r.json()["content"] == [{"type": "text", "text": "Hi!"}]
        assert r.json()["id"] == "msg_" + r.headers["x-request-id"].removeprefix("gen-")
    assert len(upstreams["deepinfra"].chat_requests) == 3
    auth = {"x-api-key": KEY}
    for raw in (b"", b"{", b"[1]", b"\xff\xfe", b"null", b"[" * 100 + b"]" * 100):
        r = client.post("/v1/messages", content=raw, headers={**auth, "content-type": "application/json"})
        anthropic_error(r, 400, "invalid_request_error")
    nested = json.dumps(body()).replace('"Hello"', "[" * 5000 + "]" * 5000)
    roomy = client_for(keyed_gateway())
    anthropic_error(roomy.post("/v1/messages", content=nested, headers=auth), 400, "invalid_request_error")
    big = body(messages=[{"role": "user", "content": "x" * 5000}])
    anthropic_error(client.post("/v1/messages", json=big, headers=auth), 413, "request_too_large")
    anthropic_error(client.get("/v1/messages", headers=auth), 405, "invalid_request_error")
    message = anthropic_error(client.post("/v1/messages", json=body(model="acme/none"), headers=auth), 404,
                              "not_found_error")
    assert "acme/none" in message
    assert len(upstreams["deepinfra"].requests) == 3


def test_http_upstream_failure_keeps_the_gateways_status_and_headers(client_for, upstreams):
    client = client_for(keyed_gateway(servers=upstreams))
    upstreams["deepinfra"].answer(json_answer({"error": {"message": "down"}}, 503))
    r = client.post("/v1/messages", json=body(**ONLY_DEEPINFRA), headers={"x-api-key": KEY})
    assert r.status_code in (502, 503) and r.headers["x-request-id"]
    data = r.json()
    assert data["type"] == "error" and data["request_id"] == r.headers["x-request-id"]
    assert KEYS["DEEPINFRA_TOKEN"] not in r.text


@pytest.mark.parametrize("where", ["before the head", "after the head"])
def test_http_stream_with_keepalive_pings(client_for, upstreams, where):
    """The upstream really waits 0.35 s before its first event, so the 0.1 s
    keep-alive timer sends pings before ``message_start``."""
    client = client_for(keyed_gateway("[routing]\nkeepalive_s = 0.1\n", upstreams))
    pause = {"head_after": 0.35} if where == "before the head" else {"first_after": 0.35}
    upstreams["deepinfra"].answer(sse_answer(sse(chunk("Hi", "assistant"), chunk(finish="stop")), **pause))
    r = client.post("/v1/messages", json=body(stream=True, **ONLY_DEEPINFRA), headers={"x-api-key": KEY})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    names = [n for n, _ in parse(r.content)]
    assert names[0] == "ping" and names.count("ping") >= 3  # keep-alives, then one after message_start
    start = names.index("message_start")
    assert names[start:] == ["message_start", "ping", "content_block_start", "content_block_delta",
                             "content_block_stop", "message_delta", "message_stop"]


def test_count_tokens_over_http(client_for):
    client = client_for(keyed_gateway("[server]\nmax_body_bytes = 4096\n"))
    auth = {"x-api-key": KEY}
    short = client.post("/v1/messages/count_tokens", json={"model": V02, "messages": [
        {"role": "user", "content": "Hello"}]}, headers=auth)
    assert short.status_code == 200 and set(short.json()) == {"input_tokens"}
    longer = client.post("/v1/messages/count_tokens", headers={"authorization": f"Bearer {KEY}"}, json={
        "model": V02, "system": "Be brief.", "messages": [{"role": "user", "content": "Hello there, how are you?"}]})
    assert longer.json()["input_tokens"] > short.json()["input_tokens"] > 0
    anthropic_error(client.post("/v1/messages/count_tokens", json={"model": V02, "messages": []}), 401,
                    "authentication_error")
    anthropic_error(client.post("/v1/messages/count_tokens", json={"model": "acme/none", "messages": [
        {"role": "user", "content": "x"}]}, headers=auth), 404, "not_found_error")
    anthropic_error(client.post("/v1/messages/count_tokens", json={"model": V02, "messages": [
        {"role": "user", "content": [{"type": "video"}]}]}, headers=auth), 400, "invalid_request_error")
    anthropic_error(client.post("/v1/messages/count_tokens", json={"messages": [
        {"role": "user", "content": "x"}]}, headers=auth), 400, "invalid_request_error")
    anthropic_error(client.post("/v1/messages/count_tokens", content=b"\xff", headers=auth), 400,
                    "invalid_request_error")
    big = {"model": V02, "messages": [{"role": "user", "content": "x" * 5000}]}
    anthropic_error(client.post("/v1/messages/count_tokens", json=big, headers=auth), 413, "request_too_large")


def test_openapi_lists_the_routes(client_for):
    paths = client_for(make_gateway()).get("/openapi/openapi.json").json()["paths"]
    assert "post" in paths["/v1/messages"] and "post" in paths["/v1/messages/count_tokens"]
