"""The fake upstreams behave as documented (tests/fakes/upstream.py)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.fakes.servers import (
    EMBEDDING_DIMENSIONS,
    FakeUpstream,
    embedding_base64,
    embedding_vector,
    expected_content,
    fault_marker,
    prompt_tokens,
    start_many,
)

KEY = "test-key"
FLAVORS = ("novita", "deepinfra", "openrouter", "openai")
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the nice tests"},
]


@pytest.fixture(scope="module")
def fakes():
    ups = start_many(*(FakeUpstream(f, api_key=KEY) for f in FLAVORS))
    try:
        yield dict(zip(FLAVORS, ups))
    finally:
        for up in ups:
            up.stop()


@pytest.fixture
def up(fakes, request):
    fake = fakes[request.param]
    fake.reset()
    return fake


def client(fake: FakeUpstream, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0, **kw)


def raw_post(fake: FakeUpstream, body: dict, timeout: float = 5.0, **headers) -> httpx.Response:
    return httpx.post(fake.chat_url, json=body, headers={"Authorization": f"Bearer {KEY}", **headers},
                      timeout=timeout)


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


@pytest.mark.parametrize("up", FLAVORS, indirect=True)
def test_non_stream(up):
    r = client(up).chat.completions.create(model="some/model", messages=MESSAGES)
    text = expected_content(up.flavor, MESSAGES)
    assert r.choices[0].message.content == text
    assert text.strip() == f"Hello from {up.flavor}: Say hello to the nice tests"
    assert r.model == "some/model"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == prompt_tokens(MESSAGES) == 3 + 3 + 6 + 3
    assert r.usage.completion_tokens == 9
    assert r.usage.total_tokens == 24
    extra = r.model_extra or {}
    usage_extra = r.usage.model_extra or {}
    choice_extra = r.choices[0].model_extra or {}
    if up.flavor == "novita":
        assert r.id.startswith("chat-")
        assert r.system_fingerprint == ""
        assert choice_extra["content_filter_results"]["jailbreak"] == {"filtered": False, "detected": False}
        raw = raw_post(up, {"model": "m", "messages": MESSAGES}).json()
        assert raw["usage"]["prompt_tokens_details"] is None and raw["usage"]["completion_tokens_details"] is None
    elif up.flavor == "deepinfra":
        assert usage_extra["estimated_cost"] == pytest.approx(24 * 0.07e-6)
    elif up.flavor == "openrouter":
        assert extra["provider"] == "FakeProvider"
    req = up.requests()[0]
    assert req["headers"]["authorization"] == "matched" and req["auth"] == "matched"
    assert req["body"]["messages"] == MESSAGES and req["finished"] and not req["cancelled"]


@pytest.mark.parametrize("up", FLAVORS, indirect=True)
def test_stream(up):
    stream = client(up).chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                               stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = expected_content(up.flavor, MESSAGES)
    if up.flavor == "deepinfra":
        assert text == expected + "</s>"
    else:
        assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 24
    if up.flavor == "novita":
        last_content = [c for c in chunks if c.choices and c.choices[0].delta.content][-1]
        assert last_content.choices[0].finish_reason == "stop"
        assert all("content_filter_results" in (c.choices[0].model_extra or {}) for c in chunks if c.choices)


def test_deepinfra_raw_stream_quirks(fakes):
    up = fakes["deepinfra"]
    r = raw_post(up, {"model": "mistralai/Mistral-7B-Instruct-v0.2", "messages": MESSAGES, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert '"choices": [{"index": 0, "delta": {"role": "assistant", "content": " "}' in data[0]
    chunks = [json.loads(d) for d in data[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert all(d.get("role") == "assistant" for d in deltas[:-1])
    assert [d["content"] for d in deltas[-3:-1]] == ["", "</s>"]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert all("usage" not in c for c in chunks)


def test_openrouter_comment_lines(fakes):
    r = raw_post(fakes["openrouter"], {"model": "m", "messages": MESSAGES, "stream": True})
    assert r.text.startswith(": OPENROUTER PROCESSING\n\n")


@pytest.mark.parametrize("up", ["deepinfra"], indirect=True)
def test_deepinfra_parameter_rules(up):
    base = {"model": "mistralai/Mistral-7B-Instruct-v0.2", "messages": MESSAGES}
    for bad in ({"top_k": 5}, {"min_p": 0.1}, {"n": 3}, {"temperature": 2.5}, {"top_p": 0},
                {"stop": [str(i) for i in range(17)]}, {"n": 2, "stream": True}, {"repetition_penalty": 0}):
        r = raw_post(up, {**base, **bad})
        assert r.status_code == 400, bad
        assert r.json()["error"]["message"]
    assert raw_post(up, {**base, "temperature": 0, "top_p": 1, "n": 2}).status_code == 200
    nemo = {"model": "mistralai/Mistral-Nemo-Instruct-2407", "messages": MESSAGES}
    assert raw_post(up, {**nemo, "top_k": 999}).status_code == 200
    assert raw_post(up, {**nemo, "top_k": 1000}).status_code == 400
    assert raw_post(up, {**nemo, "top_p": 0.5}).status_code == 400
    assert raw_post(up, {"model": "m"}).status_code == 400
    r = httpx.post(up.chat_url, content=b"{nope", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "error" in r.json()


def test_auth_and_lenient_flavors(fakes):
    r = httpx.post(fakes["openrouter"].chat_url, json={"model": "m", "messages": MESSAGES})
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    r = raw_post(fakes["novita"], {"model": "m", "messages": MESSAGES, "top_k": 40, "min_p": 0.05})
    assert r.status_code == 200
    fakes["openrouter"].reset()
    r = raw_post(fakes["openrouter"], {"model": "m", "messages": MESSAGES, "top_k": 40, "weird": 1})
    assert r.status_code == 200
    assert fakes["openrouter"].requests()[-1]["ignored_params"] == ["weird"]
    assert raw_post(fakes["openrouter"], {"model": "m", "messages": MESSAGES, "temperature": 3}).status_code == 400


@pytest.mark.parametrize("up", ["openai"], indirect=True)
def test_n_stop_max_tokens(up):
    r = client(up).chat.completions.create(model="m", messages=MESSAGES, n=2, stop=["nice"])
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == "Hello from openai: Say hello to the " for c in r.choices)
    assert r.usage.completion_tokens == 2 * 7
    r = client(up).chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    assert r.choices[0].message.content == "Hello from openai:" and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("up", ["openrouter"], indirect=True)
def test_control_status_then_ok(up):
    up.control("status", status=429, retry_after=2, count=1)
    with pytest.raises(openai.RateLimitError) as exc:
        client(up).chat.completions.create(model="m", messages=MESSAGES)
    assert exc.value.response.headers["retry-after"] == "2"
    assert exc.value.body["code"] == 429
    r = client(up).chat.completions.create(model="m", messages=MESSAGES)
    assert r.choices[0].message.content.startswith("Hello from openrouter")
    up.plan({"mode": "status", "status": 500, "count": 1}, {"mode": "empty", "count": 1})
    assert raw_post(up, {"model": "m", "messages": MESSAGES}).status_code == 500
    r = raw_post(up, {"model": "m", "messages": MESSAGES})
    assert r.status_code == 200 and r.content == b""
    assert raw_post(up, {"model": "m", "messages": MESSAGES}).json()["choices"]


@pytest.mark.parametrize("up", ["novita"], indirect=True)
def test_per_request_marker_and_header(up):
    msgs = [{"role": "user", "content": "boom " + fault_marker("status", status=503)}]
    assert raw_post(up, {"model": "m", "messages": msgs}).status_code == 503
    msgs = [{"role": "user", "content": "[[fault:garbage]] hi"}]
    r = raw_post(up, {"model": "m", "messages": msgs})
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    r = raw_post(up, {"model": "m", "messages": MESSAGES}, **{"X-Fake-Mode": "status=502"})
    assert r.status_code == 502
    # The marker is removed from the echo; plain requests are unaffected.
    msgs = [{"role": "user", "content": "hi [[fault:delay=0.01]]"}]
    assert raw_post(up, {"model": "m", "messages": msgs}).json()["choices"][0]["message"]["content"] == \
        "Hello from novita: hi"


@pytest.mark.parametrize("up", ["openai"], indirect=True)
def test_hang_is_cancelled(up):
    up.control("hang")
    with pytest.raises(httpx.ReadTimeout):
        raw_post(up, {"model": "m", "messages": MESSAGES}, timeout=0.3)
    rec = up.wait_cancelled(timeout=3)
    assert rec["cancelled"] and not rec["finished"] and rec["status"] is None


@pytest.mark.parametrize("up", ["deepinfra"], indirect=True)
def test_stream_faults(up):
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    # cut_stream: 2 chunks then the connection closes without [DONE].
    up.control("cut_stream", after=2, count=1)
    got = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", up.chat_url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
    assert len(got) == 2
    assert up.requests()[-1]["cut"] is True
    # stall: the client gives up mid-stream; the fake notices.
    up.clear()
    up.control("stall", after=1, count=1)
    with httpx.stream("POST", up.chat_url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    assert up.wait_cancelled(timeout=3)["chunks_sent"] == 1
    # slow_first_token: headers at once, first chunk after the delay.
    up.control("slow_first_token", delay_s=0.4, count=1)
    t0 = time.monotonic()
    with httpx.stream("POST", up.chat_url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        headers_at = time.monotonic() - t0
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        total = time.monotonic() - t0
    assert headers_at < 0.3 and total >= 0.4 and lines[-1] == "data: [DONE]"
    # garbage in a stream.
    r = raw_post(up, {**body, "messages": [{"role": "user", "content": "x [[fault:garbage,after=1]]"}]})
    assert sse_data(r.text)[1] == "{not json"


# --- embeddings ----------------------------------------------------------------------


def emb_post(fake: FakeUpstream, body: dict, timeout: float = 5.0, **headers) -> httpx.Response:
    return httpx.post(fake.embeddings_url, json=body, headers={"Authorization": f"Bearer {KEY}", **headers},
                      timeout=timeout)


@pytest.mark.parametrize("up", FLAVORS, indirect=True)
def test_embeddings(up):
    texts = ["the quick brown fox", "jumps"]
    r = client(up).embeddings.create(model="emb/model", input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1]
    assert [d.embedding for d in r.data] == [embedding_vector(t) for t in texts]
    assert len(r.data[0].embedding) == EMBEDDING_DIMENSIONS == 8
    assert r.data[0].embedding != r.data[1].embedding and all(-1 <= x < 1 for x in r.data[0].embedding)
    assert r.model == "emb/model" and r.usage.prompt_tokens == r.usage.total_tokens == 5
    # The SDK asks for base64 by default and decodes it: the same floats, exactly (float32 values).
    r = client(up).embeddings.create(model="emb/model", input="the quick brown fox", dimensions=3)
    assert up.requests()[-1]["body"]["encoding_format"] == "base64"
    assert r.data[0].embedding == embedding_vector("the quick brown fox", 3)
    raw = emb_post(up, {"model": "m", "input": [[1, 2, 3], [4]], "encoding_format": "base64", "user": "u"}).json()
    assert [d["embedding"] for d in raw["data"]] == [embedding_base64(embedding_vector([1, 2, 3])),
                                                     embedding_base64(embedding_vector([4]))]
    assert raw["usage"]["prompt_tokens"] == 4
    one = emb_post(up, {"model": "m", "input": [5, 6]}).json()  # one input, in token ids
    assert len(one["data"]) == 1 and one["data"][0]["embedding"] == embedding_vector([5, 6])
    if up.flavor == "deepinfra":
        assert raw["usage"]["estimated_cost"] == pytest.approx(4 * 0.07e-6)
    elif up.flavor == "openrouter":
        assert raw["provider"] == "FakeProvider"
    req = up.requests()[0]
    assert req["path"].endswith("/embeddings") and req["auth"] == "matched" and req["body"]["input"] == texts


@pytest.mark.parametrize("up", ["openai"], indirect=True)
def test_embeddings_validation_and_faults(up):
    for bad in ({"input": ""}, {"input": []}, {"input": ["a", ""]}, {"input": ["a", 1]}, {"input": [[1], []]},
                {"input": [-1]}, {"input": "a", "dimensions": 0}, {"input": "a", "encoding_format": "hex"},
                {"input": "a", "weird": 1}, {"input": "a", "model": ""}):
        r = emb_post(up, {"model": "m", **bad})
        assert r.status_code == 400, bad
        assert r.json()["error"]["message"]
    assert emb_post(up, {"model": "m", "input": "x " + fault_marker("status", status=503)}).status_code == 503
    assert emb_post(up, {"model": "m", "input": "x"}, **{"X-Fake-Mode": "status=429"}).status_code == 429
    up.plan({"mode": "status", "status": 500, "count": 1}, {"mode": "garbage", "count": 1},
            {"mode": "empty", "count": 1})
    assert emb_post(up, {"model": "m", "input": "x"}).status_code == 500
    assert emb_post(up, {"model": "m", "input": "x"}).content.startswith(b"<html>")
    assert emb_post(up, {"model": "m", "input": "x"}).content == b""
    # The marker does not change the vector; plain requests are unaffected.
    r = emb_post(up, {"model": "m", "input": "x [[fault:delay=0.01]]"})
    assert r.json()["data"][0]["embedding"] == embedding_vector("x")
    up.control("hang", count=1)
    with pytest.raises(httpx.ReadTimeout):
        emb_post(up, {"model": "m", "input": "x"}, timeout=0.3)
    assert up.wait_cancelled(timeout=3)["path"].endswith("/embeddings")
    assert httpx.post(up.embeddings_url, json={"model": "m", "input": "x"}).status_code == 401


def test_embeddings_unknown_model():
    with FakeUpstream("deepinfra", api_key=KEY, models=["known/emb"]) as up, \
            FakeUpstream("openrouter", api_key=KEY, models=["known/emb"]) as orr:
        assert emb_post(up, {"model": "known/emb", "input": "x"}).status_code == 200
        r = emb_post(up, {"model": "other", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert emb_post(orr, {"model": "other", "input": "x"}).status_code == 400
