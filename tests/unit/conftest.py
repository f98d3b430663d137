"""Unit-test helpers: a Gateway on the built-in catalog with upstreams mocked by respx,
for tests where the client does not matter; tests/unit/upstream_server.py serves the
rest over the production client."""

from __future__ import annotations

import random

import httpx

import pytest
from litestar.testing import TestClient

from gateway import config as config_mod
from gateway.server.routes import create_app
from gateway.state import Gateway

KEYS = {"NOVITA_API_KEY": "nv-secret", "DEEPINFRA_TOKEN": "di-secret", "OPENROUTER_API_KEY": "or-secret"}
DEEPINFRA = "https://api.deepinfra.com/v1/openai/chat/completions"
OPENROUTER = "https://openrouter.ai/api/v1/chat/completions"
NOVITA = "https://api.novita.ai/v3/openai/chat/completions"
V02 = "mistralai/mistral-7b-instruct-v0.2"


def make_gateway(toml: str = "", env: dict[str, str] | None = None, tmp_path=None, seed: int = 0) -> Gateway:
    cfg = config_mod.builtin()
    if toml:
        import tomllib

        raw = tomllib.loads(toml)
        cfg = config_mod.merge(cfg, config_mod.parse(raw), raw)
    # An httpx transport selects the httpx client, which respx intercepts.
    gw = Gateway(cfg, env=KEYS if env is None else env, transport=httpx.AsyncHTTPTransport())
    gw.router.rng = random.Random(seed)
    return gw


@pytest.fixture
def client_for():
    """``client_for(gw)`` -> a started litestar TestClient; closed after the test."""
    clients = []

    def make(gw: Gateway) -> TestClient:
        c = TestClient(create_app(gw))
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def completion(content: str = "Hello!", **extra) -> dict:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1694623155,
        "model": "upstream-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 31},
    }
    body.update(extra)
    return body


def chat(model: str = V02, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hello!"}], **extra}
