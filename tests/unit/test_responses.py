"""The Responses API's translation onto chat, its answers and events, and its
store (no network), then its routes over HTTP with the production client and
a real local upstream (``tests/unit/upstream_server.py``)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from types import SimpleNamespace

import msgspec
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.accounting.stored_responses import MemoryStoredResponses, RedisStoredResponses, StoredResponse
from gateway.errors import GatewayError
from gateway.limits.keys import GatewayKey
from gateway.pipeline.api import KEEPALIVE
from gateway.pipeline.responses import RESPONSES, ResponsesExchange, input_messages
from gateway.protocol import (
    AssistantMessage,
    ChatChunkOut,
    ChatCompletionOut,
    ChoiceOut,
    ChunkChoiceOut,
    ContentFilterResults,
    Delta,
    Message,
    Usage,
)
from gateway.storage.autopipeline import AutoPipeline
from gateway.storage.connect import redis_client
from tests.unit.conftest import V02, completion, make_gateway
from tests.unit.test_api import KEY, KEYED
from tests.unit.test_providers import chunk, sse
from tests.unit.upstream_server import gateway_over, json_answer, sse_answer, upstreams

__all__ = ["upstreams"]

REQUEST_ID = "gen-0123456789abcdef01234567"
EVENTS = TypeAdapter(ResponseStreamEvent)
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}, "strict": True}]


def services(store=None, open_mode: bool = False) -> SimpleNamespace:
    return SimpleNamespace(responses=store or MemoryStoredResponses(), keys=SimpleNamespace(open=open_mode))


async def exchange(body: dict, gw=None, key: str = "team") -> ResponsesExchange:
    raw = json.dumps({"model": V02, **body}).encode()
    ex = await RESPONSES.exchange(gw or services(), GatewayKey(name=key), raw, REQUEST_ID)
    assert isinstance(ex, ResponsesExchange)
    return ex


def sent(ex: ResponsesExchange) -> dict:
    """The chat request as the upstream body would carry it."""
    return json.loads(msgspec.json.encode(ex.request))


def answer(content: str | None = "Hi there", finish: str = "stop", tool_calls=None, refusal=None) -> ChatCompletionOut:
    message = AssistantMessage(content=content)
    if tool_calls is not None:
        message.tool_calls = msgspec.Raw(json.dumps(tool_calls).encode())
    if refusal is not None:
        message.refusal = refusal
    return ChatCompletionOut(
        id=REQUEST_ID, object="chat.completion", created=1, model=V02, provider="deepinfra",
        choices=[ChoiceOut(index=0, message=message, finish_reason=finish,
                           content_filter_results=ContentFilterResults())],
        usage=Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, estimated_cost=1.5e-6),
        prompt_filter_results=[],
    )


def out_chunk(delta: Delta | None = None, finish: str | None = None, usage: Usage | None = None) -> ChatChunkOut:
    choices = [] if delta is None and finish is None else [ChunkChoiceOut(index=0, delta=delta or Delta(),
                                                                          finish_reason=finish)]
    c = ChatChunkOut(id=REQUEST_ID, object="chat.completion.chunk", created=1, model=V02, provider="deepinfra",
                     choices=choices)
    if usage is not None:
        c.usage = usage
    return c


def parse_sse(data: bytes) -> list[dict]:
    """Each event's JSON, checking the ``event:`` line names its ``type``."""
    out = []
    for block in data.decode().split("\n\n"):
        if not block or block.startswith(":"):
            continue
        event_line, data_line = block.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {event['type']}"
        out.append(event)
    return out


def validated(events: list[dict]) -> list:
    """The events as the SDK's types, validated (not just constructed): every required field is there."""
    return [EVENTS.validate_python(e) for e in events]


USAGE = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, estimated_cost=1.5e-6)


# --- translation ------------------------------------------------------------------


async def test_string_input_instructions_and_knobs():
    ex = await exchange({"input": "Hello", "instructions": "Be brief", "max_output_tokens": 20, "temperature": 0.5,
                         "top_p": 0.9, "user": "u1", "metadata": {"a": "b"}, "store": False,
                         "provider": {"only": ["deepinfra"]}, "models": [V02], "unknown_field": 1})
    body = sent(ex)
    assert body["messages"] == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hello"}]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["user"]) == (20, 0.5, 0.9, "u1")
    assert body["provider"]["only"] == ["deepinfra"] and body["models"] == [V02] and body["model"] == V02
    assert "stream_options" not in body and "metadata" not in body and "store" not in body


async def test_stream_asks_for_usage_in_its_own_chunk():
    ex = await exchange({"input": "Hello", "stream": True})
    assert ex.request.stream and ex.request.stream_options.include_usage


def test_items_become_chat_messages():
    items = msgspec.json.decode(json.dumps([
        {"role": "system", "content": "sys"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "one"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me "},
                                          {"type": "output_text", "text": "check."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}", "id": "fc_1",
         "status": "completed"},
        {"type": "function_call_output", "call_id": "c1", "output": "r1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "r2"}]},
        {"type": "function_call", "call_id": "c3", "name": "h", "arguments": ""},
        {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                     {"type": "input_image", "image_url": "https://x/img.png", "detail": "low"}]},
    ]), type=list[msgspec.Raw])
    from gateway.protocol.responses import InputItem

    messages = input_messages([msgspec.json.decode(i, type=InputItem) for i in items])
    assert json.loads(msgspec.json.encode(messages)) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "function": {"name": "f", "arguments": "{}"}, "type": "function"},
            {"id": "c2", "function": {"name": "g", "arguments": "{\"x\":1}"}, "type": "function"}]},
        {"role": "tool", "content": "r1", "tool_call_id": "c1"},
        {"role": "tool", "content": "r2", "tool_call_id": "c2"},
        {"role": "assistant", "tool_calls": [
            {"id": "c3", "function": {"name": "h", "arguments": ""}, "type": "function"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "https://x/img.png",
                                                                         "detail": "low"}}]},
    ]


async def test_tools_tool_choice_and_text_format_in_chats_shapes():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    ex = await exchange({"input": "x", "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"},
                         "parallel_tool_calls": False,
                         "text": {"format": {"type": "json_schema", "name": "t", "schema": schema, "strict": True}}})
    body = sent(ex)
    assert body["tools"] == [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "t", "schema": schema, "strict": True}}
    assert sent(await exchange({"input": "x", "text": {"format": {"type": "json_object"}}}))["response_format"] == {
        "type": "json_object"}
    plain = sent(await exchange({"input": "x", "text": {"format": {"type": "text"}}, "tool_choice": "auto"}))
    assert "response_format" not in plain and "tool_choice" not in plain and "tools" not in plain


@pytest.mark.parametrize("body,param", [
    ({"input": 5}, "input"),
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"input": [{"content": "x"}]}, "input[0].role"),
    ({"input": ["x", {"role": "user", "content": "x"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": "x", "tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
    ({"input": "x", "tools": [TOOLS[0], {"type": "file_search", "vector_store_ids": []}]}, "tools[1].type"),
    ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "top_p": 0}, "top_p"),
    ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "previous_response_id": 7}, "previous_response_id"),
])
async def test_bad_values_are_400s_naming_the_path(body, param):
    with pytest.raises(GatewayError) as err:
        await exchange(body)
    assert err.value.status == 400 and err.value.param == param, err.value.message


async def test_malformed_bodies_are_400s():
    for raw in (b"", b"{", b'{"input": "\xff"}', b"[" * 10_000):
        with pytest.raises(GatewayError) as err:
            await RESPONSES.exchange(services(), GatewayKey(name="k"), raw, REQUEST_ID)
        assert err.value.status == 400


def test_errors_name_responses_parameters():
    exc = GatewayError(400, "no endpoint supports 'response_format' as given", code="unsupported_parameter",
                       param="response_format")
    error = json.loads(RESPONSES.error_body(exc))["error"]
    assert error["param"] == "text.format" and "'text.format'" in error["message"]
    exc = GatewayError(400, "no endpoint supports 'tools'", code="unsupported_parameter", param="tools")
    assert json.loads(RESPONSES.error_body(exc)) == json.loads(exc.to_json())


# --- answers ----------------------------------------------------------------------


async def test_plain_answer_is_a_response_object():
    ex = await exchange({"input": "Hello", "instructions": "Be brief", "tools": TOOLS, "metadata": {"a": "b"}})
    body = json.loads(ex.answer(answer("Hi there")))
    r = Response.model_validate(body)
    assert r.id == "resp_" + REQUEST_ID.removeprefix("gen-") and r.object == "response"
    assert r.output_text == "Hi there" and r.status == "completed" and r.incomplete_details is None
    assert r.output[0].id == "msg_" + REQUEST_ID.removeprefix("gen-")
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (10, 5, 15)
    assert body["usage"]["estimated_cost"] == 1.5e-6 and body["provider"] == "deepinfra"
    assert r.instructions == "Be brief" and r.metadata == {"a": "b"} and r.tools[0].name == "get_weather"
    assert r.tool_choice == "auto" and r.parallel_tool_calls is True and r.store is True
    assert r.text.format.type == "text" and r.error is None and r.previous_response_id is None
    assert "output_text" not in body  # the SDK computes it, as from OpenAI


async def test_text_settings_are_echoed_with_a_format():
    ex = await exchange({"input": "Hello", "text": {"verbosity": "low"}, "tool_choice": "none",
                         "previous_response_id": None, "temperature": 0.2, "user": "u"})
    body = json.loads(ex.answer(answer()))
    assert body["text"] == {"format": {"type": "text"}, "verbosity": "low"}
    assert (body["tool_choice"], body["temperature"], body["user"]) == ("none", 0.2, "u")
    Response.model_validate(body)


async def test_length_and_content_filter_are_incomplete():
    for finish, reason in (("length", "max_output_tokens"), ("content_filter", "content_filter")):
        ex = await exchange({"input": "Hello"})
        r = Response.model_validate_json(ex.answer(answer("Hi", finish=finish)))
        assert r.status == "incomplete" and r.incomplete_details.reason == reason
        assert r.output[0].status == "incomplete"


async def test_tool_calls_become_function_call_items():
    calls = [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"q\":1}"}},
             {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    ex = await exchange({"input": "Hello", "tools": TOOLS})
    r = Response.model_validate_json(ex.answer(answer(None, finish="tool_calls", tool_calls=calls)))
    assert [o.type for o in r.output] == ["function_call", "function_call"]
    assert [(o.call_id, o.name, o.arguments) for o in r.output] == [("call_a", "f", "{\"q\":1}"), ("call_b", "g", "{}")]
    assert len({o.id for o in r.output}) == 2 and all(o.id.startswith("fc_") for o in r.output)
    assert r.output_text == ""
    with_text = await exchange({"input": "Hello", "tools": TOOLS})
    r = Response.model_validate_json(with_text.answer(answer("Checking.", finish="tool_calls", tool_calls=calls)))
    assert [o.type for o in r.output] == ["message", "function_call", "function_call"]


async def test_refusal_is_a_refusal_part():
    ex = await exchange({"input": "Hello"})
    r = Response.model_validate_json(ex.answer(answer(None, refusal="I can't")))
    assert [(c.type, c.refusal) for c in r.output[0].content] == [("refusal", "I can't")]


async def test_the_answer_is_stored_after_it_is_written():
    store = MemoryStoredResponses()
    gw = services(store)
    ex = await exchange({"input": "Hello", "instructions": "sys"}, gw)
    calls = [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = ex.answer(answer("Sure.", tool_calls=calls))
    assert await store.get(ex.id) is None  # not on the answer's path
    await asyncio.sleep(0)
    stored = await store.get(ex.id)
    assert bytes(stored.response) == body and stored.key == "team"
    assert json.loads(msgspec.json.encode(stored.messages)) == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Sure.",
         "tool_calls": [{"id": "call_a", "function": {"name": "f", "arguments": "{}"}, "type": "function"}]}]
    # The next turn continues it (the instructions are not carried over).
    nxt = await exchange({"input": [{"type": "function_call_output", "call_id": "call_a", "output": "ok"}],
                          "previous_response_id": ex.id}, gw)
    assert [m["role"] for m in sent(nxt)["messages"]] == ["user", "assistant", "tool"]
    # Another key cannot continue it; open mode can.
    with pytest.raises(GatewayError) as err:
        await exchange({"input": "x", "previous_response_id": ex.id}, gw, key="intruder")
    assert err.value.status == 400 and err.value.code == "previous_response_not_found"
    assert err.value.message == f"Previous response with id '{ex.id}' not found."
    await exchange({"input": "x", "previous_response_id": ex.id}, services(store, open_mode=True), key="open")


async def test_store_false_and_failed_writes():
    store = MemoryStoredResponses()
    ex = await exchange({"input": "Hello", "store": False}, services(store))
    assert json.loads(ex.answer(answer()))["store"] is False
    await asyncio.sleep(0)
    assert await store.get(ex.id) is None

    class Broken(MemoryStoredResponses):
        def put_soon(self, response_id, record):
            raise ConnectionError("redis down")

    ex = await exchange({"input": "Hello"}, services(Broken()))
    assert json.loads(ex.answer(answer()))["status"] == "completed"
    await asyncio.sleep(0)  # logged, never raised


# --- stream events ----------------------------------------------------------------


async def test_text_stream_events():
    store = MemoryStoredResponses()
    ex = await exchange({"input": "Hello", "stream": True}, services(store))
    ev = ex.events()
    out = ev.chunk(out_chunk(Delta(role="assistant", content="")))
    out += ev.chunk(out_chunk(Delta(content="Hi")))
    out += ev.chunk(out_chunk(Delta(content=" there")))
    out += ev.chunk(out_chunk(Delta(), finish="stop"))
    out += ev.chunk(out_chunk(usage=USAGE))
    out += ev.done()
    assert b"[DONE]" not in out
    events = parse_sse(out)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    typed = validated(events)
    assert [e.delta for e in typed if e.type == "response.output_text.delta"] == ["Hi", " there"]
    final = typed[-1].response
    assert final.output_text == "Hi there" and final.usage.total_tokens == 15 and final.status == "completed"
    assert typed[0].response.status == "in_progress" and typed[0].response.usage is None
    await asyncio.sleep(0)
    assert json.loads(bytes((await store.get(ex.id)).response)) == events[-1]["response"]


async def test_tool_call_stream_events():
    ex = await exchange({"input": "Hello", "tools": TOOLS, "stream": True})
    ev = ex.events()
    first = [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]
    more = [{"index": 0, "function": {"arguments": "{\"q\":"}}]
    last = [{"index": 0, "function": {"arguments": "1}"}}]
    second = [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    out = ev.chunk(out_chunk(Delta(role="assistant", content="Let me check.")))
    for piece in (first, more, last, second):
        out += ev.chunk(out_chunk(Delta(tool_calls=msgspec.Raw(json.dumps(piece).encode()))))
    out += ev.chunk(out_chunk(Delta(), finish="tool_calls"))
    out += ev.chunk(out_chunk(usage=USAGE))
    out += ev.done()
    events = parse_sse(out)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    final = validated(events)[-1].response
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    assert [(o.call_id, o.arguments) for o in final.output[1:]] == [("call_a", "{\"q\":1}"), ("call_b", "{}")]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == [0, 1, 2]
    assert [e["item"]["id"] for e in added] == [o.id for o in final.output]


async def test_an_empty_answer_is_an_empty_message():
    ex = await exchange({"input": "Hello", "stream": True})
    ev = ex.events()
    out = ev.chunk(out_chunk(Delta(role="assistant"), finish="stop")) + ev.chunk(out_chunk(usage=USAGE)) + ev.done()
    events = parse_sse(out)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    final = validated(events)[-1]
    assert final.type == "response.completed" and final.response.output_text == ""
    assert final.response.output[0].type == "message"


async def test_incomplete_stream():
    ex = await exchange({"input": "Hello", "stream": True, "max_output_tokens": 1})
    ev = ex.events()
    out = ev.chunk(out_chunk(Delta(content="Hi"))) + ev.chunk(out_chunk(finish="length")) + ev.done()
    final = validated(parse_sse(out))[-1]
    assert final.type == "response.incomplete" and final.response.incomplete_details.reason == "max_output_tokens"
    assert final.response.output[0].status == "incomplete"


async def test_failure_mid_stream_and_before_the_first_chunk():
    store = MemoryStoredResponses()
    ex = await exchange({"input": "Hello", "stream": True}, services(store))
    ev = ex.events()
    out = ev.chunk(out_chunk(Delta(content="Hi")))
    out += ev.failed(out_chunk(Delta(), finish="error"), "upstream stream failed: cut")
    events = parse_sse(out)
    assert [e["type"] for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    failed = validated(events)[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.error.message == "upstream stream failed: cut" and failed.output[0].status == "incomplete"
    await asyncio.sleep(0)
    assert await store.get(ex.id) is None
    # Failing while keep-alives were sent: the response is created, then failed.
    ev = (await exchange({"input": "Hello", "stream": True})).events()
    assert ev.keepalive.startswith(b":")
    events = parse_sse(ev.failed(out_chunk(Delta(), finish="error"), "no provider"))
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.failed"]


# --- stores -----------------------------------------------------------------------


def record(key: str = "team") -> StoredResponse:
    return StoredResponse(key=key, messages=[Message(role="user", content="hi")], response=msgspec.Raw(b'{"id":"r"}'))


async def test_memory_store_ttl_capacity_delete():
    store = MemoryStoredResponses(capacity=2, ttl_s=60)
    for i in range(3):
        store.put_soon(f"r{i}", record())
    assert await store.get("r0") is None and (await store.get("r2")).messages[0].content == "hi"
    assert await store.delete("r1") and not await store.delete("r1")
    expiring = MemoryStoredResponses(ttl_s=0)
    expiring.put_soon("r", record())
    assert await expiring.get("r") is None


async def test_redis_store(redis_server):
    client = redis_client(redis_server.url, timeout_s=2.0)
    prefix = f"t{secrets.token_hex(4)}:"
    store = RedisStoredResponses(prefix, 3600, AutoPipeline(client, 2.0))
    try:
        await store.put_soon("resp_1", record("a"))
        got = await store.get("resp_1")
        assert got.key == "a" and bytes(got.response) == b'{"id":"r"}'
        ttl = await store.batcher.submit(lambda pipe: pipe.eval("return redis.call('TTL', KEYS[1])", 1,
                                                                 f"{prefix}resp:resp_1"))
        assert 3500 < ttl <= 3600
        assert await store.delete("resp_1") and not await store.delete("resp_1")
        assert await store.get("resp_1") is None
    finally:
        await client.aclose()


# --- over HTTP --------------------------------------------------------------------


def test_routes_plain_stream_get_delete(client_for, upstreams):
    client = client_for(gateway_over(upstreams, KEYED))
    auth = {"authorization": f"Bearer {KEY}"}
    upstreams["deepinfra"].answer(json_answer(completion("Hi!")))
    r = client.post("/v1/responses", json={"model": V02, "input": "Hello", "provider": {"only": ["deepinfra"]}},
                    headers=auth)
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "Hi!"
    rid = r.json()["id"]
    assert r.headers["x-request-id"] == "gen-" + rid.removeprefix("resp_")
    assert client.post("/v1/responses", json={"input": "x"}).status_code == 401
    assert client.get(f"/v1/responses/{rid}").status_code == 401
    got = client.get(f"/v1/responses/{rid}", headers=auth)
    assert got.status_code == 200 and got.content == r.content
    r = client.get("/v1/responses", headers=auth)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    gone = client.delete(f"/v1/responses/{rid}", headers=auth)
    assert gone.status_code == 200 and gone.json() == {"id": rid, "object": "response", "deleted": True}
    missing = client.get(f"/v1/responses/{rid}", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "response_not_found"
    assert client.delete(f"/v1/responses/{rid}", headers=auth).status_code == 404

    body = sse(chunk("", "assistant"), chunk("Hi"), chunk("!"), chunk(finish="stop"),
               {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    upstreams["deepinfra"].answer(sse_answer(body, every=0.01))
    r = client.post("/v1/responses", headers=auth,
                    json={"model": V02, "input": "Hello", "stream": True, "provider": {"only": ["deepinfra"]}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["usage"]["total_tokens"] == 5
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hi!"
    validated(events)
    sent = [q.body for q in upstreams["deepinfra"].chat_requests]
    assert len(sent) == 2 and "stream" not in sent[0] and sent[1]["stream"] is True


@pytest.mark.parametrize("where", ["before the head", "after the head"])
def test_stream_keepalives_while_waiting(client_for, upstreams, where):
    """A slow upstream (0.45 s before its first event) gets keep-alive comments
    (``KEEPALIVE``) from the 0.1 s timer before the events, which are whole."""
    client = client_for(gateway_over(upstreams, KEYED + "[routing]\nkeepalive_s = 0.1\n"))
    pause = {"head_after": 0.45} if where == "before the head" else {"first_after": 0.45}
    body = sse(chunk("", "assistant"), chunk("Hi"), chunk(finish="stop"),
               {"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    upstreams["deepinfra"].answer(sse_answer(body, **pause))
    r = client.post("/v1/responses", headers={"authorization": f"Bearer {KEY}"},
                    json={"model": V02, "input": "Hello", "stream": True, "provider": {"only": ["deepinfra"]}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.content.startswith(KEEPALIVE * 2), r.text
    events = parse_sse(r.content)
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hi"


def test_openapi_lists_the_routes(client_for):
    paths = client_for(make_gateway()).get("/openapi/openapi.json").json()["paths"]
    assert "post" in paths["/v1/responses"]
    assert {"get", "delete"} <= set(paths["/v1/responses/{response_id}"])


async def test_redis_failures_while_reading_are_503(caplog):
    class Down(MemoryStoredResponses):
        async def get(self, response_id):
            raise ConnectionError("redis down")

    with caplog.at_level(logging.WARNING, logger="gateway"), pytest.raises(GatewayError) as err:
        await exchange({"input": "x", "previous_response_id": "resp_1"}, services(Down()))
    assert err.value.status == 503 and "redis" not in err.value.message
    assert "not read" in caplog.text
