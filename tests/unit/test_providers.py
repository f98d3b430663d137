"""Each provider's declared quirks, applied by the shared adapter, through the
production HTTP/1.1 client (``gateway/upstream/h1.py``) against the fake
providers (``tests/fakes/upstream.py``, real HTTP servers in their own
processes, each speaking its seed page's wire format and refusing what that
page does not accept). What reached the provider is read from the fake's
request log."""

from __future__ import annotations

import json
import random
import tomllib
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from gateway import config as config_mod
from gateway.protocol import ChatRequest
from gateway.state import Gateway
from gateway.upstream.adapter import missing_parameters, request_parameters
from gateway.upstream.h1 import H1Client
from providers import Provider, Range
from tests.fakes.servers import FakeUpstream, count_words, expected_content, prompt_tokens, start_many
from tests.unit.conftest import KEYS, V02, chat, completion

MESSAGES = chat()["messages"]
#: The fake providers, by name, each with the key the gateway holds for it.
SEED_FAKES = {"novita": "nv-secret", "deepinfra": "di-secret", "openrouter": "or-secret"}
#: A provider only a test declares: OpenAI's reasoning models, which take
#: ``max_completion_tokens`` and refuse ``max_tokens`` (no built-in provider renames).
REASONING = Provider(name="reasoning", renames={"max_tokens": "max_completion_tokens"})
REASONING_TOML = """
[providers.reasoning]
api_key_env = "REASONING_KEY"
[[models]]
id = "test/reasoning"
tokenizer = "none"
[[models.endpoints]]
provider = "reasoning"
upstream_model = "o-test"
context_length = 8192
supported_parameters = ["max_tokens", "seed", "n", "stop"]
"""


@pytest.fixture(scope="module")
def seed_fakes() -> Iterator[dict[str, FakeUpstream]]:
    ups = {name: FakeUpstream(name, api_key=key) for name, key in SEED_FAKES.items()}
    ups["reasoning"] = FakeUpstream("openai-reasoning", api_key="rs-secret", label="reasoning")
    start_many(*ups.values())
    yield ups
    for up in ups.values():
        up.stop()


@pytest.fixture
def fakes(seed_fakes: dict[str, FakeUpstream]) -> dict[str, FakeUpstream]:
    for up in seed_fakes.values():
        up.reset()
    return seed_fakes


def h1_gateway(fakes: dict[str, FakeUpstream], toml: str = "", seed: int = 0) -> Gateway:
    """A Gateway on the built-in catalog (plus ``toml``) with its production
    client, every provider's ``base_url`` pointing at its fake."""
    raw: dict[str, Any] = tomllib.loads(toml)
    for name, fake in fakes.items():
        raw.setdefault("providers", {}).setdefault(name, {})["base_url"] = fake.base_url
    cfg = config_mod.merge(config_mod.builtin(), config_mod.parse(raw), raw)
    gw = Gateway(cfg, env={**KEYS, "REASONING_KEY": "rs-secret"})
    assert isinstance(gw.client, H1Client)
    gw.router.rng = random.Random(seed)
    return gw


def only(fake: FakeUpstream) -> dict[str, Any]:
    """The one chat request the fake got, which it answered 200."""
    requests = fake.requests(chat_only=True)
    assert len(requests) == 1, requests
    assert requests[0]["status"] == 200, requests[0]
    return requests[0]


def sse(*chunks: dict, done: bool = True) -> str:
    """An upstream SSE body (for the mocked upstreams of other unit tests)."""
    out = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    return out + ("data: [DONE]\n\n" if done else "")


def chunk(content: str | None = None, role: str | None = None, finish: str | None = None, **extra: Any) -> dict:
    """One upstream ``chat.completion.chunk`` (for :func:`sse`)."""
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "u",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}],
    }


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def answer_with(fake: FakeUpstream, body: dict) -> None:
    """The fake's next answer: exactly ``body`` (a 200)."""
    fake.control("status", status=200, body=body, count=1)


def test_deepinfra_stream_role_once_and_no_eos_literal(client_for, fakes):
    client = client_for(h1_gateway(fakes))
    # The fake streams as seed 001: role in every delta, " " first, "" and "</s>" last.
    r = client.post("/v1/chat/completions", json=chat(stream=True, provider={"only": ["deepinfra"]}))
    assert r.status_code == 200, r.text
    out = events(r.text)
    deltas = [c["choices"][0]["delta"] for c in out if c["choices"]]
    assert deltas[0].get("role") == "assistant" and len(deltas) > 2
    assert all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content") or "" for d in deltas) == expected_content("deepinfra", MESSAGES)
    assert "</s>" not in r.text and only(fakes["deepinfra"])["chunks_sent"] > len(deltas)
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert out[-1]["usage"]["completion_tokens"] > 0  # counted by the gateway: DeepInfra sends none
    assert r.text.endswith("data: [DONE]\n\n")
    # DeepInfra does not document stream_options: not sent (its fake would refuse nothing, so look).
    assert "stream_options" not in only(fakes["deepinfra"])["body"]


def test_deepinfra_drops_unsupported_params_and_refuses_n_over_two(client_for, fakes):
    client = client_for(h1_gateway(fakes))
    # n is never dropped (issue 13): n=3 is past DeepInfra's n <= 2, so no endpoint is left.
    r = client.post(
        "/v1/chat/completions", json=chat(top_k=5, min_p=0.1, n=3, temperature=0.5, provider={"only": ["deepinfra"]})
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert r.json()["error"]["param"] == "n" and not fakes["deepinfra"].requests(chat_only=True)
    r = client.post(
        "/v1/chat/completions", json=chat(top_k=5, min_p=0.1, n=2, temperature=0.5, provider={"only": ["deepinfra"]})
    )
    assert r.status_code == 200, r.text
    request = only(fakes["deepinfra"])  # DeepInfra's page lists neither top_k nor min_p: its fake refuses both
    sent = request["body"]
    assert "top_k" not in sent and "min_p" not in sent and sent["n"] == 2
    assert sent["temperature"] == 0.5
    assert sent["model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert "provider" not in sent
    assert r.headers["x-gateway-dropped-params"] == "top_k,min_p"
    assert request["auth"] == "matched" and len(r.json()["choices"]) == 2


@pytest.mark.parametrize(("value", "forwarded"), [(999, True), (0, True), (1000, False), (4096, False)])
def test_deepinfra_top_k_below_1000_on_nemo(client_for, fakes, value, forwarded):
    client = client_for(h1_gateway(fakes))
    r = client.post("/v1/chat/completions", json=chat("mistralai/mistral-nemo", top_k=value))
    assert r.status_code == 200, r.text
    sent = only(fakes["deepinfra"])["body"]
    assert sent.get("top_k") == (value if forwarded else None)
    assert r.headers.get("x-gateway-dropped-params") == (None if forwarded else "top_k")


@pytest.mark.parametrize(("value", "forwarded"), [(2, True), (1.5, True), (2.01, False), (5, False)])
def test_openrouter_repetition_penalty_up_to_2(client_for, fakes, value, forwarded):
    client = client_for(h1_gateway(fakes))
    r = client.post(
        "/v1/chat/completions", json=chat("mistralai/mistral-7b-instruct-v0.1", repetition_penalty=value, stream=True)
    )
    assert r.status_code == 200, r.text
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in events(r.text) if c["choices"]) == (
        expected_content("openrouter", MESSAGES)
    )
    sent = only(fakes["openrouter"])["body"]
    assert sent.get("repetition_penalty") == (value if forwarded else None)
    assert r.headers.get("x-gateway-dropped-params") == (None if forwarded else "repetition_penalty")


def test_deepinfra_non_stream_eos_literal_stripped_and_own_cost(client_for, fakes):
    client = client_for(h1_gateway(fakes))
    answer_with(
        fakes["deepinfra"],
        completion(
            " Hello!</s>",
            usage={"prompt_tokens": 15, "completion_tokens": 16, "total_tokens": 31, "estimated_cost": 0.0000268},
        ),
    )
    r = client.post("/v1/chat/completions", json=chat(provider={"only": ["deepinfra"]}))
    body = r.json()
    assert body["choices"][0]["message"]["content"] == " Hello!"
    # Cost at the catalog price ($0.07/Mtok both ways), not the upstream's figure.
    assert body["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 16,
        "total_tokens": 31,
        "estimated_cost": pytest.approx(31 * 0.07 / 1e6),
    }
    assert body["model"] == V02 and body["provider"] == "deepinfra"


def test_openrouter_headers_usage_in_stream_and_comment_lines(client_for, fakes):
    toml = '[providers.openrouter]\nheaders = { "HTTP-Referer" = "https://app.example", "X-Title" = "App" }\n'
    client = client_for(h1_gateway(fakes, toml))
    r = client.post(
        "/v1/chat/completions",
        json=chat(stream=True, top_k=3, stream_options={"include_usage": True}, provider={"only": ["openrouter"]}),
    )
    assert r.status_code == 200, r.text
    request = only(fakes["openrouter"])
    assert request["headers"]["http-referer"] == "https://app.example" and request["headers"]["x-title"] == "App"
    assert request["body"]["top_k"] == 3 and request["body"]["stream_options"] == {"include_usage": True}
    out = events(r.text)
    text = expected_content("openrouter", MESSAGES)
    pt, ct = prompt_tokens(MESSAGES), count_words(text)
    assert out[-1]["choices"] == [] and out[-1]["usage"]["prompt_tokens"] == pt
    assert out[-1]["usage"]["completion_tokens"] == ct
    assert out[-1]["usage"]["estimated_cost"] == pytest.approx((pt * 0.18 + ct * 0.18) / 1e6)
    assert "OPENROUTER PROCESSING" not in r.text  # the fake sent its comment lines; none came through
    # include_usage: the usage chunk is separate; the finish chunk has none.
    assert "usage" not in out[-2]


def test_novita_content_filter_results_are_merged(client_for, fakes):
    client = client_for(h1_gateway(fakes))
    flagged = {
        "hate": {"filtered": False},
        "self_harm": {"filtered": False},
        "sexual": {"filtered": True},
        "violence": {"filtered": False},
        "jailbreak": {"filtered": False, "detected": False},
        "profanity": {"filtered": False, "detected": True},
    }
    answer = completion(
        "I will kill you",
        usage={
            "prompt_tokens": 46,
            "completion_tokens": 40,
            "total_tokens": 86,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
        system_fingerprint="",
    )
    answer["choices"][0]["content_filter_results"] = flagged
    answer_with(fakes["novita"], answer)
    r = client.post("/v1/chat/completions", json=chat("mistralai/mistral-7b-instruct"))
    assert r.status_code == 200, r.text
    results = r.json()["choices"][0]["content_filter_results"]
    assert results["sexual"]["filtered"] is True  # theirs
    assert results["profanity"]["detected"] is True  # theirs
    assert results["violence"]["severity"] == "high"  # ours
    assert r.json()["prompt_filter_results"][0]["prompt_index"] == 0
    assert only(fakes["novita"])["body"]["model"] == "mistralai/mistral-7b-instruct"


def test_novita_stream_filter_results_are_merged(client_for, fakes):
    """The fake's own stream: Novita's content_filter_results on every choice."""
    client = client_for(h1_gateway(fakes))
    r = client.post("/v1/chat/completions", json=chat("mistralai/mistral-7b-instruct", stream=True))
    assert r.status_code == 200, r.text
    assert only(fakes["novita"])["chunks_sent"] > 2
    chunks = [c for c in events(r.text) if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
        expected_content("novita", MESSAGES)
    )
    assert any("content_filter_results" in c["choices"][0] for c in chunks)


def test_unpriced_endpoint_reports_null_cost_with_warning(client_for, fakes):
    client = client_for(h1_gateway(fakes))
    r = client.post("/v1/chat/completions", json=chat("mistralai/mistral-nemo"))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["estimated_cost"] is None
    assert "no price" in r.headers["x-gateway-warning"]
    assert only(fakes["deepinfra"])["body"]["model"] == "mistralai/Mistral-Nemo-Instruct-2407"


def test_configured_price_overrides_builtin(client_for, fakes):
    toml = (
        '[[models]]\nid = "mistralai/mistral-nemo"\n[[models.endpoints]]\nprovider = "deepinfra"\n'
        "input_usd_per_mtok = 0.02\noutput_usd_per_mtok = 0.04\n"
    )
    client = client_for(h1_gateway(fakes, toml))
    r = client.post("/v1/chat/completions", json=chat("mistralai/mistral-nemo"))
    pt, ct = prompt_tokens(MESSAGES), count_words(expected_content("deepinfra", MESSAGES))
    assert r.json()["usage"]["estimated_cost"] == pytest.approx((pt * 0.02 + ct * 0.04) / 1e6)


def test_usage_counted_with_tokenizer_when_upstream_omits_it(client_for, fakes):
    client = client_for(h1_gateway(fakes))
    answer_with(fakes["deepinfra"], completion("Hello there, friend.", usage=None))
    r = client.post("/v1/chat/completions", json=chat(provider={"only": ["deepinfra"]}))
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 5  # v1 tokenizer: ▁Hello ▁there , ▁friend .
    assert usage["prompt_tokens"] > 0 and usage["estimated_cost"] > 0


# --- renames: a provider only a test declares ----------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_renames_send_the_providers_name(client_for, fakes, stream):
    gw = h1_gateway(fakes, REASONING_TOML)
    gw.catalog.providers["reasoning"].spec = REASONING
    client = client_for(gw)
    r = client.post("/v1/chat/completions", json=chat("test/reasoning", max_tokens=2, seed=7, stream=stream))
    assert r.status_code == 200, r.text
    sent = only(fakes["reasoning"])["body"]
    assert sent["max_completion_tokens"] == 2 and "max_tokens" not in sent and sent["seed"] == 7
    text = expected_content("reasoning", MESSAGES, max_tokens=2)
    if stream:
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in events(r.text) if c["choices"]) == text
    else:
        assert r.json()["choices"][0]["message"]["content"] == text
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_without_the_rename_the_provider_refuses(client_for, fakes):
    """The control: the same provider without ``renames`` sends ``max_tokens``,
    which the fake refuses, so the test above can fail."""
    gw = h1_gateway(fakes, REASONING_TOML)
    gw.catalog.providers["reasoning"].spec = msgspec.structs.replace(REASONING, renames={})
    r = client_for(gw).post("/v1/chat/completions", json=chat("test/reasoning", max_tokens=2))
    assert r.status_code != 200
    refused = fakes["reasoning"].requests(chat_only=True)[0]
    assert refused["status"] == 400 and "max_tokens" in refused["error"]


# --- Range: the data's own semantics ---------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "inside", "outside"),
    [
        (Range(0, 2, min_exclusive=True), [2, 1e-9, 1], [0, -1, 2.0001]),
        (Range(0, 1000, max_exclusive=True), [0, 999], [1000, -1]),
        (Range(0.01, 5), [0.01, 5], [0.0099, 5.01]),
        (Range(max=4), [0, 4], [5]),
        (Range(1, 1), [1], [0, 2]),
    ],
)
def test_range_bounds(limit, inside, outside):
    assert all(limit.admits(v) for v in inside)
    assert not any(limit.admits(v) for v in outside)


def test_a_list_range_bounds_its_length_and_booleans_pass():
    spec = Provider(name="x", ranges={"stop": Range(max=2), "logprobs": Range(0, 0)})
    request = msgspec.json.decode(json.dumps(chat(stop=["a", "b", "c"], logprobs=True)), type=ChatRequest)
    assert missing_parameters(request_parameters(request), spec, None) == ["stop"]
