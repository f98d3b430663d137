"""The ASGI front (gateway/asgi.py), driven with raw ASGI messages."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.pipeline import chat
from gateway.server.asgi import App, CHAT_PATH
from tests.unit.conftest import make_gateway


def _scope(headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "method": "POST", "path": CHAT_PATH, "headers": headers}


async def _run(app: App, headers: list[tuple[bytes, bytes]], messages: list[dict]) -> list[dict]:
    incoming = list(messages)
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # nothing more from this client
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(_scope(headers), receive, send), 10)
    return sent


def _error(sent: list[dict]) -> tuple[int, dict, dict]:
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body["body"])
    return start["status"], json.loads(body["body"])["error"], headers


async def test_body_over_the_limit_in_chunks_without_a_length_is_413():
    app = App(make_gateway("[server]\nmax_body_bytes = 1000\n"), fallback=None)
    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True} for _ in range(3)]
    status, error, _ = _error(await _run(app, [], chunks))
    assert status == 413 and error["code"] == "request_too_large"


async def test_declared_length_over_the_limit_is_refused_before_reading():
    app = App(make_gateway("[server]\nmax_body_bytes = 1000\n"), fallback=None)
    status, error, _ = _error(await _run(app, [(b"content-length", b"5000")], []))  # no body is ever read
    assert status == 413 and error["type"] == "invalid_request_error"


async def test_client_gone_before_the_body_ends_gets_nothing():
    app = App(make_gateway(), fallback=None)
    sent = await _run(app, [], [{"type": "http.request", "body": b"{", "more_body": True},
                                {"type": "http.disconnect"}])
    assert sent == []


async def test_gateway_errors_keep_their_status_and_headers():
    app = App(make_gateway("[[auth.keys]]\nname = \"k\"\nsha256 = \"" + "0" * 64 + "\"\n"), fallback=None)
    body = json.dumps({"model": "mistralai/mistral-7b-instruct-v0.2", "messages": [{"role": "user", "content": "hi"}]})
    status, error, _ = _error(await _run(app, [(b"authorization", b"Bearer wrong")],
                                         [{"type": "http.request", "body": body.encode()}]))
    assert status == 401 and error["code"] == "invalid_api_key"


async def test_a_bug_is_a_500_without_its_traceback(monkeypatch, caplog):
    async def broken(gw, key, raw, api):
        raise RuntimeError("internal detail that must not leak")

    monkeypatch.setattr(chat, "chat_completions", broken)
    app = App(make_gateway(), fallback=None)
    status, error, _ = _error(await _run(app, [], [{"type": "http.request", "body": b"{}"}]))
    assert status == 500 and error == {"message": "internal error", "type": "server_error", "param": None,
                                        "code": "internal_error"}
    assert "internal detail" in caplog.text  # the log has it, the caller does not


@pytest.mark.parametrize("method,path", [("GET", CHAT_PATH), ("POST", "/v1/models")])
async def test_other_routes_go_to_the_fallback_app(method, path):
    seen = []

    async def fallback(scope, receive, send):
        seen.append((scope["method"], scope["path"]))

    app = App(make_gateway(), fallback=fallback)
    await app({"type": "http", "method": method, "path": path, "headers": []}, None, None)
    assert seen == [(method, path)]
