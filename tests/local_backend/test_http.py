"""The HTTP layer in-process over the tiny model: status codes and OpenAI error shapes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from local_backend.cli import make_loader
from local_backend.engine import QueueFull
from local_backend.server import create_app

NAME = "tiny"


@pytest.fixture
async def client(tiny_model_dir: Path):
    app = create_app(NAME, make_loader(str(tiny_model_dir), max_batch=1, max_queue=1, max_model_len=128),
                     exit_on_failure=False)
    async with AsyncTestClient(app=app, timeout=30) as c:
        for _ in range(300):
            if (await c.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        yield c


def body(**kw) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, **kw}


async def test_health_models_and_completion(client: AsyncTestClient) -> None:
    assert (await client.get("/health")).status_code == 200
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == [NAME]
    r = await client.post("/v1/chat/completions", json=body(max_tokens=5, ignore_eos=True))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 5


async def test_stream_with_usage(client: AsyncTestClient) -> None:
    r = await client.post("/v1/chat/completions", json=body(
        max_tokens=4, ignore_eos=True, stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("payload,status,param,code", [
    (body(model="nope"), 404, "model", "model_not_found"),
    (body(max_tokens=10_000), 400, "messages", "context_length_exceeded"),
    (body(temperature="hot"), 400, "temperature", None),
    (body(top_p=5), 400, "top_p", None),
    (body(n=2), 400, "n", None),
    ({"model": NAME}, 400, "messages", None),
])
async def test_errors_are_openai_shaped(client: AsyncTestClient, payload, status, param, code) -> None:
    r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    if code:
        assert err["code"] == code


async def test_full_queue_is_503_with_retry_after(client: AsyncTestClient, monkeypatch) -> None:
    """The engine's QueueFull (tested for real in test_engine) becomes 503 + Retry-After."""
    engine = client.app.state.local_backend.backend.engine

    def full(*args, **kwargs):
        raise QueueFull(retry_after=7)

    monkeypatch.setattr(engine, "submit", full)
    r = await client.post("/v1/chat/completions", json=body(max_tokens=1))
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "queue_full"
