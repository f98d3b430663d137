"""Issue 17, scope 4: every range and flag in ``providers/*.py``, end to end.

A real ``gateway serve`` (its own HTTP/1.1 client) in front of fake providers
that enforce their seed pages' ranges (``tests/fakes/upstream.py``: a value
out of range is a 400 there, and the local backend's fake refuses any
``Authorization`` header). For each declared range: a value inside it reaches
the provider as sent; a value inside the gateway's own validation but outside
the provider's range is dropped from that request and named in
``x-gateway-dropped-params``, and the answer is a 200 (a sampling knob), or
the endpoint is skipped (a strict parameter: n, stop). What the provider got
is read from the fake's request log, never assumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import ENV_NAMES, GATEWAY_KEY, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.fakes.servers import FakeUpstream

V01 = "mistralai/mistral-7b-instruct-v0.1"  # OpenRouter only
V02 = "mistralai/mistral-7b-instruct-v0.2"  # DeepInfra and OpenRouter
V03 = "mistralai/mistral-7b-instruct-v0.3"  # Novita only
NEMO = "mistralai/mistral-nemo"  # DeepInfra only, seed 003's list
LOCAL = "local/smollm2-135m-instruct"
#: A DeepInfra endpoint whose context window is past DeepInfra's max_tokens
#: cap, so the cap (not the context check) is what acts on a large max_tokens.
LONG = "e2e/nemo-long-context"
LOCAL_KEY_ENV, LOCAL_KEY = "E2E_LOCAL_BACKEND_KEY", "local-key-never-sent"

EXTRA = f"""
[health]
failure_threshold = 1000
[providers.local]
api_key_env = "{LOCAL_KEY_ENV}"
[[models]]
id = "{LONG}"
name = "e2e: Nemo behind a long context window"
tokenizer = "tekken"
[[models.endpoints]]
provider = "deepinfra"
upstream_model = "mistralai/Mistral-Nemo-Instruct-2407"
context_length = 2000000
supported_parameters = ["max_tokens", "temperature", "top_k", "n", "repetition_penalty"]
"""


@pytest.fixture(scope="module")
def local_fake() -> Iterator[FakeUpstream]:
    with FakeUpstream("local") as up:
        yield up


@pytest.fixture(scope="module")
def gateway(fakes, local_fake) -> Iterator[GatewayProcess]:
    toml = gateway_config(fakes, EXTRA).replace(
        "[local]\nenabled = false\n", f'[local]\nurl = "{local_fake.base_url}"\n'
    )
    env = {**{ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}, LOCAL_KEY_ENV: LOCAL_KEY}
    with GatewayProcess(toml, env=env) as gw:
        yield gw


@pytest.fixture
def sdk(gateway, local_fake) -> openai.OpenAI:
    local_fake.reset()
    return openai.OpenAI(base_url=gateway.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)


def ask(sdk: openai.OpenAI, model: str, only: str | None = None, **params: Any):
    """One chat request through the gateway; the raw response (headers) and its parsed body."""
    extra: dict[str, Any] = {k: params.pop(k) for k in list(params) if k not in ("n", "stop", "max_tokens", "stream")}
    if only is not None:
        extra["provider"] = {"only": [only]}
    raw = sdk.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hello"}], extra_body=extra, **params
    )
    return raw, raw.parse()


def sent(fake: FakeUpstream) -> dict[str, Any]:
    """The body of the one chat request the fake got for this test."""
    requests = fake.requests(chat_only=True)
    assert len(requests) == 1, requests
    assert requests[0]["status"] == 200, requests[0]
    return requests[0]["body"]


def refused(sdk: openai.OpenAI, model: str, only: str | None = None, **params: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as err:
        ask(sdk, model, only, **params)
    return err.value.response.json()["error"]


# --- in the provider's range: forwarded as sent ---------------------------------------


@pytest.mark.parametrize(
    ("model", "only", "flavor", "name", "value"),
    [
        # OpenRouter: repetition_penalty (0, 2], the top of it.
        (V01, None, "openrouter", "repetition_penalty", 2),
        (V01, None, "openrouter", "repetition_penalty", 0.01),
        # DeepInfra: top_k 0 <= k < 1000, repetition_penalty 0.01..5 (seed 003).
        (NEMO, None, "deepinfra", "top_k", 999),
        (NEMO, None, "deepinfra", "top_k", 0),
        (NEMO, None, "deepinfra", "repetition_penalty", 0.01),
        (V02, "deepinfra", "deepinfra", "repetition_penalty", 5),
        # DeepInfra: max_tokens up to 1000000, on an endpoint with room for it.
        (LONG, None, "deepinfra", "max_tokens", 1_000_000),
    ],
)
def test_a_value_in_the_providers_range_is_forwarded(sdk, fakes, model, only, flavor, name, value):
    raw, body = ask(sdk, model, only, **{name: value})
    assert raw.http_response.status_code == 200
    assert "x-gateway-dropped-params" not in raw.headers
    assert sent(fakes[flavor])[name] == value
    assert body.model_extra["provider"] == flavor


# --- outside the provider's range, inside the gateway's: dropped and named -------------


@pytest.mark.parametrize(
    ("model", "only", "flavor", "name", "value"),
    [
        # The cap the issue found missing: OpenRouter answered 400 to a 3.
        (V01, None, "openrouter", "repetition_penalty", 3),
        (V01, None, "openrouter", "repetition_penalty", 2.0001),
        (V01, None, "openrouter", "repetition_penalty", 5),
        (V02, "openrouter", "openrouter", "repetition_penalty", 3),
        # DeepInfra: top_k's bound is exclusive (< 1000), repetition_penalty >= 0.01.
        (NEMO, None, "deepinfra", "top_k", 1000),
        (NEMO, None, "deepinfra", "top_k", 5000),
        (NEMO, None, "deepinfra", "repetition_penalty", 0.005),
        (V02, "deepinfra", "deepinfra", "repetition_penalty", 0.001),
        (LONG, None, "deepinfra", "max_tokens", 1_000_001),
    ],
)
def test_a_value_past_the_providers_range_is_dropped_and_named(sdk, fakes, model, only, flavor, name, value):
    raw, body = ask(sdk, model, only, temperature=0.5, **{name: value})
    assert raw.http_response.status_code == 200
    assert raw.headers["x-gateway-dropped-params"] == name
    got = sent(fakes[flavor])
    assert name not in got
    assert got["temperature"] == 0.5  # the rest of the request went as sent
    assert body.model_extra["provider"] == flavor
    assert body.choices[0].message.content.strip().startswith(f"Hello from {flavor}")


def test_a_dropped_value_in_a_stream(sdk, fakes):
    """The same through a stream: the header comes with the stream's head."""
    raw = sdk.chat.completions.with_raw_response.create(
        model=V01,
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        extra_body={"repetition_penalty": 3, "top_k": 7},
    )
    assert raw.headers["x-gateway-dropped-params"] == "repetition_penalty"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "Hello from openrouter: Say hello"
    got = sent(fakes["openrouter"])
    assert got["top_k"] == 7 and "repetition_penalty" not in got and got["stream"] is True


def test_openrouter_drops_the_capped_value_where_deepinfra_takes_it(sdk, fakes):
    """One request, two endpoints: the range is the endpoint's provider's.
    OpenRouter (tried first here) gets the request without the value; with
    it failing, DeepInfra gets it with the value, and the header, naming what
    the endpoint that answered went without, is gone."""
    fakes["openrouter"].control("status", status=503, count=1)
    raw = sdk.chat.completions.with_raw_response.create(
        model=V02,
        messages=[{"role": "user", "content": "Say hello"}],
        extra_body={"repetition_penalty": 3, "provider": {"order": ["openrouter", "deepinfra"]}},
    )
    body = raw.parse()
    assert body.model_extra["provider"] == "deepinfra"
    assert "repetition_penalty" not in fakes["openrouter"].requests(chat_only=True)[0]["body"]
    assert sent(fakes["deepinfra"])["repetition_penalty"] == 3
    assert "x-gateway-dropped-params" not in raw.headers


# --- strict parameters past a range: the endpoint is skipped ----------------------------


def test_deepinfra_n_over_two_is_never_dropped(sdk, fakes):
    _, body = ask(sdk, V02, "deepinfra", n=2)
    assert sent(fakes["deepinfra"])["n"] == 2 and len(body.choices) == 2
    fakes["deepinfra"].clear()
    error = refused(sdk, V02, "deepinfra", n=3)
    assert error["code"] == "unsupported_parameter" and error["param"] == "n"
    assert fakes["deepinfra"].requests(chat_only=True) == []
    # Nemo, DeepInfra too: the range is the provider's, whatever the model.
    assert refused(sdk, NEMO, n=3)["param"] == "n"
    assert fakes["deepinfra"].requests(chat_only=True) == []


def test_local_backend_n_and_stop(sdk, local_fake):
    ask(sdk, LOCAL, stop=["w", "x", "y", "z"], n=1)
    assert sent(local_fake)["stop"] == ["w", "x", "y", "z"] and sent(local_fake)["n"] == 1
    local_fake.clear()
    for params, param in (({"n": 2}, "n"), ({"stop": ["v", "w", "x", "y", "z"]}, "stop")):
        error = refused(sdk, LOCAL, **params)
        assert error["code"] == "unsupported_parameter" and error["param"] == param
    assert local_fake.requests(chat_only=True) == []


# --- bearer_auth=False: the local backend never gets the key ------------------------------


def test_the_local_backend_is_never_sent_a_key(sdk, fakes, local_fake):
    """[providers.local] names a key here, and the fake refuses any Authorization."""
    raw, body = ask(sdk, LOCAL, max_tokens=3)
    assert body.model_extra["provider"] == "local"
    request = local_fake.requests(chat_only=True)[0]
    assert "authorization" not in request["headers"] and request["status"] == 200
    raw = sdk.chat.completions.with_raw_response.create(
        model=LOCAL, messages=[{"role": "user", "content": "Say hello"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices).startswith("Hello from local")
    assert all("authorization" not in r["headers"] for r in local_fake.requests(chat_only=True))
    # The hosted providers still get theirs.
    ask(sdk, V01)
    assert fakes["openrouter"].requests(chat_only=True)[0]["auth"] == "matched"


# --- declarations removed: the gateway's own validation is the provider's ----------------


@pytest.mark.parametrize(
    ("model", "flavor", "params"),
    [
        # Novita's page gives no ranges; its old temperature, top_p and min_p
        # ranges were the gateway's own. The gateway's bounds reach it.
        (V03, "novita", {"temperature": 2, "top_p": 1, "min_p": 1, "repetition_penalty": 5}),
        (V03, "novita", {"temperature": 0, "min_p": 0, "top_k": 0}),
        # OpenRouter's logit_bias -100..100 is the gateway's own.
        (V01, "openrouter", {"logit_bias": {"42": 100, "7": -100}}),
        # DeepInfra's temperature 0..2 is the gateway's own.
        (NEMO, "deepinfra", {"temperature": 2}),
    ],
)
def test_the_gateways_own_bounds_reach_the_provider(sdk, fakes, model, flavor, params):
    raw, _ = ask(sdk, model, **params)
    assert "x-gateway-dropped-params" not in raw.headers
    got = sent(fakes[flavor])
    assert {k: got[k] for k in params} == params


@pytest.mark.parametrize(
    ("model", "params", "param"),
    [
        (V03, {"temperature": 2.1}, "temperature"),
        (V03, {"min_p": 1.5}, "min_p"),
        (V01, {"logit_bias": {"42": 101}}, "logit_bias"),
        (V01, {"repetition_penalty": 5.5}, "repetition_penalty"),
    ],
)
def test_past_the_gateways_own_bounds_nothing_is_sent(sdk, fakes, model, params, param):
    error = refused(sdk, model, **params)
    assert param in (error.get("param") or "") + error["message"]
    assert all(f.requests(chat_only=True) == [] for f in fakes.values())
