"""Hostile and malformed input on the chat path, driven through the ASGI app.

Every body a client can send is answered with the request's result or an
OpenAI-shaped 4xx, never a 500; the key is checked before the body is read;
a refused request does not pay for tokenizing its prompt; upstream secrets
and Retry-After values are cleaned before they reach callers and logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import time

import httpx
import pytest
import respx

from gateway.routing import tokens
from gateway.server.asgi import CHAT_PATH, App
from tests.eventually import aeventually
from tests.unit.conftest import DEEPINFRA, OPENROUTER, V02, completion, make_gateway

KEY = "sk-gw-inbound-0123456789"
KEYED = f'[[auth.keys]]\nname = "team-a"\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'
AUTH = [(b"authorization", f"Bearer {KEY}".encode())]


async def post_raw(
    app: App, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """One POST to the chat path over raw ASGI: (status, whole body, headers)."""
    incoming = [{"type": "http.request", "body": body}]
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": CHAT_PATH, "headers": headers or []}
    await asyncio.wait_for(app(scope, receive, send), 30)
    start = sent[0]
    out = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], out, {k.decode(): v.decode() for k, v in start["headers"]}


async def call(app: App, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, dict, dict]:
    """One POST to the chat path: (status, JSON body, headers)."""
    status, out, sent_headers = await post_raw(app, body, headers)
    return status, json.loads(out), sent_headers


def error_of(status: int, body: dict) -> dict:
    assert 400 <= status < 500, (status, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def request(content: object = "hi", **extra: object) -> bytes:
    return json.dumps({"model": V02, "messages": [{"role": "user", "content": content}], **extra}).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.fixture
def upstreams():
    with respx.mock(assert_all_called=False) as mock:
        answer = httpx.Response(200, json=completion())
        yield [mock.post(url).mock(return_value=answer) for url in (DEEPINFRA, OPENROUTER)]


# --- requirement 1: malformed bodies are 400s ------------------------------------------


@pytest.mark.parametrize(
    "content,param",
    [
        ([1], "messages[0].content[0]"),
        (["text"], "messages[0].content[0]"),
        ([{"text": "hi"}], "messages[0].content[0]"),
        ([{"type": "text", "text": 5}], "messages[0].content[0].text"),
        ([{"type": "text"}], "messages[0].content[0]"),
        ([{"type": "text", "text": "ok"}, {"type": "video", "video": {}}], "messages[0].content[1]"),
        ([{"type": 7}], "messages[0].content[0].type"),
        ([{"type": "image_url", "image_url": "http://x/y.png"}], "messages[0].content[0].image_url"),
        ([{"type": "image_url", "image_url": {"url": 3}}], "messages[0].content[0].image_url.url"),
        ([{"type": "image_url"}], "messages[0].content[0]"),
    ],
)
async def test_malformed_content_parts_are_400_naming_the_part(upstreams, content, param):
    status, body, _ = await call(App(make_gateway(), fallback=None), request(content))
    error = error_of(status, body)
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert all(route.call_count == 0 for route in upstreams)


async def test_well_formed_content_parts_pass_through_byte_for_byte(upstreams):
    parts = [
        {"type": "text", "text": "describe", "cache_control": {"type": "ephemeral"}},
        {"type": "image_url", "image_url": {"url": "https://x.example/a.png", "detail": "low"}},
    ]
    status, body, _ = await call(App(make_gateway(), fallback=None), request(parts))
    assert status == 200, body
    sent = json.loads(next(r for r in upstreams if r.call_count).calls[0].request.content)
    assert sent["messages"][0]["content"] == parts


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","messages":[{"role":"user","content":"\xff"}]}',  # in a decoded string
        b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"\xc3"}]}]}',  # in a part
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":["\xfe"]}',  # in a forwarded field
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x-\xff":1}',  # in an unknown key
    ],
)
async def test_invalid_utf8_anywhere_is_400(upstreams, raw):
    status, body, _ = await call(App(make_gateway(), fallback=None), raw)
    assert status == 400 and error_of(status, body)["code"] == "invalid_json"


@pytest.mark.parametrize("field", ["tools", "response_format", "tool_choice", "logit_bias", "unknown_field"])
async def test_deep_nesting_in_any_field_is_400(upstreams, field):
    raw = request(**{field: None}).replace(b"null", nested(100_000))
    status, body, _ = await call(App(make_gateway(), fallback=None), raw)
    assert status == 400, body
    error_of(status, body)


async def test_deep_nesting_in_content_and_objects_is_400(upstreams):
    app = App(make_gateway(), fallback=None)
    for raw in (
        request(None).replace(b"null", b"[" + nested(100_000) + b"]"),
        request(None).replace(b"null", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        nested(100_000),
    ):
        status, body, _ = await call(app, raw)
        assert status == 400, body
        error_of(status, body)


# --- requirement 2: the key before the body ---------------------------------------------


async def test_unauthenticated_client_gets_401_without_its_body_being_read():
    gw = make_gateway(KEYED)
    reads = []

    async def receive() -> dict:
        reads.append(1)
        await asyncio.sleep(3600)  # a client that never sends its (large) body
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    for headers in ([], [(b"authorization", b"Bearer wrong"), (b"content-length", b"3000000")]):
        sent.clear()
        scope = {"type": "http", "method": "POST", "path": CHAT_PATH, "headers": headers}
        await asyncio.wait_for(App(gw, fallback=None)(scope, receive, send), 5)
        assert sent[0]["status"] == 401
        assert json.loads(sent[1]["body"])["error"]["code"] in {"missing_api_key", "invalid_api_key"}
        assert dict(sent[0]["headers"])[b"x-request-id"].startswith(b"gen-")
    assert reads == []
    await aeventually(lambda: gw.accountant.in_flight == 0)  # both refusals were traced and accounted for


async def test_refused_key_is_still_a_traced_request(caplog):
    gw = make_gateway(KEYED)
    caplog.set_level(logging.INFO, logger="gateway.access")
    status, _, headers = await call(App(gw, fallback=None), request(), [(b"authorization", b"Bearer nope")])
    assert status == 401
    await aeventually(lambda: gw.accountant.in_flight == 0)  # accounted after the response
    gw.accountant.flush()
    rows = [r.fields for r in caplog.records if r.name == "gateway.access"]
    assert [(row["id"], row["status"]) for row in rows] == [(headers["x-request-id"], 401)]


# --- requirement 3: no exact tokenization for a refused request -------------------------


async def test_refused_request_with_a_huge_prompt_is_not_tokenized(upstreams, monkeypatch):
    gw = make_gateway(KEYED.replace('name = "team-a"', 'name = "team-a"\nrpm = 1'))
    app = App(gw, fallback=None)
    status, _, _ = await call(app, request("hi"), AUTH)  # uses the key's one request this minute
    assert status == 200
    calls = []
    real = tokens.count_text
    monkeypatch.setattr(tokens, "count_text", lambda *a: calls.append(1) or real(*a))
    huge = request("lorem ipsum dolor " * 180_000)  # ~3 MB: over every context by its byte bound
    status, body, _ = await call(app, huge, AUTH)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body
    assert calls == []


async def test_admitted_huge_prompt_is_still_counted_exactly_and_refused_for_context(upstreams, monkeypatch):
    calls = []
    real = tokens.count_text
    monkeypatch.setattr(tokens, "count_text", lambda *a: calls.append(1) or real(*a))
    app = App(make_gateway(), fallback=None)
    status, body, _ = await call(app, request("word " * 40_000))  # over every context, but not by the bound alone
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert calls  # counted for real, once admitted


# --- requirement 5: Retry-After -----------------------------------------------------------


def test_retry_after_is_whole_seconds_within_one_to_sixty():
    from gateway.pipeline.attempts import retry_after

    assert retry_after(None) is None
    assert retry_after("7") == "7"
    assert retry_after(" 30 ") == "30"
    assert retry_after("0") == "1"
    assert retry_after("86400") == "60"
    assert retry_after("9" * 400) == "60"
    assert retry_after("9" * 5000) == "60"
    for garbage in ("", "soon", "-5", "1.5", "٣", "\r\nx: y", "Mon, 99 Foo 2020 99:99:99 GMT"):
        assert retry_after(garbage) == "1", garbage
    soon = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 18 <= int(retry_after(soon)) <= 21
    assert retry_after(email.utils.formatdate(time.time() + 7200, usegmt=True)) == "60"
    assert retry_after(email.utils.formatdate(time.time() - 3600, usegmt=True)) == "1"


@pytest.mark.parametrize("upstream,expected", [("86400", "60"), ("tomorrow", "1"), ("12", "12")])
async def test_upstream_retry_after_is_clamped_for_the_caller(upstream, expected):
    with respx.mock(assert_all_called=False) as mock:
        for url in (DEEPINFRA, OPENROUTER):
            mock.post(url).mock(return_value=httpx.Response(429, headers={"retry-after": upstream}, json={}))
        status, body, headers = await call(App(make_gateway(), fallback=None), request())
    assert status == 429 and body["error"]["code"] == "upstream_rate_limited"
    assert headers["retry-after"] == expected


# --- requirement 6: secrets out of errors and logs ---------------------------------------


def test_redactor_removes_keys_their_fragments_and_header_values():
    from gateway.errors import Redactor

    redact = Redactor(["sk-live-ABCDEFGHIJKLMNOP"], ["X-Custom-Secret-123", "e2e"])
    assert redact("bad key sk-live-ABCDEFGHIJKLMNOP.") == "bad key ***."
    assert redact("key sk-live-ABCDEF... is invalid") == "key ***... is invalid"
    assert redact("suffix GHIJKLMNOP only") == "suffix *** only"
    assert redact("X-Custom-Secret-123 rejected") == "*** rejected"
    assert redact("short sk-live, e2e test") == "short sk-live, e2e test"  # under eight characters
    assert redact("sk-live-ABCDEFGHIJKL and sk-live-ABCD") == "*** and ***"
    assert Redactor([])("nothing to hide") == "nothing to hide"


SECRET_HEADER = "hdr-secret-value-42"
DI_KEY = "di-secret-key-0123456789"


async def test_upstream_messages_lose_key_fragments_and_header_values_everywhere(caplog):
    gw = make_gateway(
        f'[providers.deepinfra]\nheaders = {{ "X-Auth-Token" = "{SECRET_HEADER}" }}\n',
        env={"DEEPINFRA_TOKEN": DI_KEY, "OPENROUTER_API_KEY": "or-secret-key-abcdefgh"},
    )
    caplog.set_level(logging.INFO)
    truncated = DI_KEY[:14]  # an upstream that quotes part of the key
    with respx.mock(assert_all_called=False) as mock:
        mock.post(DEEPINFRA).mock(
            return_value=httpx.Response(500, json={"error": {"message": f"bad {truncated}.. and {SECRET_HEADER}"}})
        )
        mock.post(OPENROUTER).mock(
            return_value=httpx.Response(503, json={"error": {"message": "key ...ecret-key-abcdefgh revoked"}})
        )
        status, body, headers = await call(App(gw, fallback=None), request(provider={"sort": "price"}))
    assert status in (502, 503), body
    await aeventually(lambda: gw.accountant.in_flight == 0)  # accounted after the response
    gw.accountant.flush()
    record = await gw.generations.get(headers["x-request-id"])
    leaks = (truncated, DI_KEY[-10:], SECRET_HEADER, "ecret-key-abcdefgh")
    texts = {
        "response": json.dumps(body),
        "record": json.dumps([a.error for a in record.attempts]),
        "logs": "\n".join(r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records),
    }
    assert "attempt failed" in texts["logs"] and '"status": ' in texts["logs"]  # the lines are there
    for where, text in texts.items():
        assert "***" in text, where
        for leak in leaks:
            assert leak not in text, (where, leak)


async def test_caller_fault_message_is_scrubbed_too():
    gw = make_gateway(env={"DEEPINFRA_TOKEN": DI_KEY, "OPENROUTER_API_KEY": "x"})
    with respx.mock(assert_all_called=False) as mock:
        mock.post(DEEPINFRA).mock(
            return_value=httpx.Response(400, json={"error": {"message": f"token {DI_KEY[3:15]} cannot do that"}})
        )
        status, body, _ = await call(App(gw, fallback=None), request(provider={"sort": "price"}))
    assert status == 400 and body["error"]["code"] == "upstream_rejected_request"
    assert DI_KEY[3:15] not in body["error"]["message"] and "***" in body["error"]["message"]


# --- requirement 8: disabled providers do not mask the context verdict --------------------


async def test_too_long_prompt_is_400_even_with_a_disabled_provider(upstreams):
    gw = make_gateway(env={"DEEPINFRA_TOKEN": "k"})  # openrouter (and novita) disabled: no key
    assert not gw.catalog.providers["openrouter"].enabled
    status, body, _ = await call(App(gw, fallback=None), request("word " * 3000, max_tokens=30_000))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert body["error"]["param"] == "messages"


async def test_only_disabled_providers_is_still_503(upstreams):
    status, body, _ = await call(App(make_gateway(env={}), fallback=None), request("word " * 3000, max_tokens=30_000))
    assert status == 503 and body["error"]["code"] == "no_provider_available"
