"""The shared adapter's reading of upstream error bodies, per provider declaration."""

from __future__ import annotations

import json

import pytest

import providers
from gateway.upstream.adapter import error_message


@pytest.mark.parametrize("provider,body,expected", [
    ("openai", {"error": {"message": "bad temperature", "type": "invalid_request_error"}}, "bad temperature"),
    ("openai", {"error": "plain string error"}, "plain string error"),
    ("openai", {"message": "top-level message"}, "top-level message"),
    ("openrouter", {"error": {"code": 400, "message": "No endpoints found", "metadata": {}}}, "No endpoints found"),
    ("deepinfra", {"detail": "Model is overloaded"}, "Model is overloaded"),
    ("deepinfra", {"detail": [{"loc": ["body", "n"], "msg": "n must be <= 2", "type": "value_error"}]},
     "n must be <= 2"),
    ("deepinfra", {"error": {"message": "openai-style too"}}, "openai-style too"),
    # A provider that does not declare `detail` does not read it.
    ("openai", {"detail": "not declared for plain OpenAI"}, None),
    ("deepinfra", {"detail": []}, None),
    ("deepinfra", {"detail": 42}, None),
    ("novita", {"error": {"message": ""}}, None),
    ("novita", [1, 2, 3], None),
])
def test_error_message_paths(provider, body, expected):
    assert error_message(providers.get(provider), json.dumps(body).encode()) == expected


@pytest.mark.parametrize("raw", [b"", b"<html>502 Bad Gateway</html>", b"\xff\xfe", b"{" * 10000])
def test_unreadable_error_bodies_have_no_message(raw):
    assert error_message(providers.get("deepinfra"), raw) is None
