"""Keys, rate limits and budgets across real gateway processes and a real Redis."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import tomllib
from importlib import resources

import httpx
import openai
import pytest

from tests.e2e.conftest import ENV_NAMES, GATEWAY_KEY, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.eventually import eventually
from tests.fakes.servers import answer_text, count_words, fault_marker, prompt_tokens
from tests.redis_server import RedisServer

V02 = "mistralai/mistral-7b-instruct-v0.2"
ASK = [{"role": "user", "content": "Say hi"}]
CHEAPEST = {"provider": {"sort": "price"}}
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}


def redis_section(url: str, **extra) -> str:
    lines = ["[redis]", f'url = "{url}"', f'prefix = "t{secrets.token_hex(4)}:"']
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    return "\n".join(lines) + "\n"


async def fire(base_urls: list[str], n: int, **kwargs) -> list[object]:
    clients = [openai.AsyncOpenAI(base_url=u, api_key=GATEWAY_KEY, max_retries=0, timeout=60) for u in base_urls]

    async def one(i: int):
        try:
            return await clients[i % len(clients)].chat.completions.with_raw_response.create(
                model=V02, messages=ASK, **kwargs)
        except openai.APIStatusError as exc:
            return exc

    try:
        return await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in clients:
            await c.close()


def test_rpm_is_exact_under_200_concurrent_requests(start_gateway, redis_server):
    gw = start_gateway(redis_section(redis_server.url), key_fields="rpm = 50")
    results = asyncio.run(fire([gw.base_url], 200))
    ok = [r for r in results if not isinstance(r, Exception)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) == 50 and len(limited) == 150, [l for l in gw.log_text().splitlines() if "access" not in l][-5:]
    assert all(int(r.response.headers["retry-after"]) >= 1 for r in limited)
    assert limited[0].response.json()["error"]["code"] == "rate_limit_exceeded"
    headers = ok[0].headers
    assert headers["x-ratelimit-limit-requests"] == "50"
    assert int(headers["x-ratelimit-remaining-requests"]) < 50
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_three_replicas_share_one_limit(start_gateway, redis_server):
    section = redis_section(redis_server.url)
    gws = [start_gateway(section, key_fields="rpm = 30") for _ in range(3)]
    results = asyncio.run(fire([g.base_url for g in gws], 90))
    assert sum(not isinstance(r, Exception) for r in results) == 30
    assert sum(isinstance(r, openai.RateLimitError) for r in results) == 60


@pytest.fixture
def start_patient_gateway(fakes):
    """``start_gateway`` with 60 s upstream timeouts: a stream the fake stalls
    stays open until its client goes away, however slow the machine."""
    running = []

    def start(extra: str = "", key_fields: str = "") -> GatewayProcess:
        config = gateway_config(fakes, extra, key_fields).replace("timeout_s = 2.0", "timeout_s = 60.0")
        gw = GatewayProcess(config, env={ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes})
        running.append(gw)
        return gw.start(ready_timeout_s=120)

    yield start
    for gw in running:
        gw.stop()


def test_a_cancelled_stream_frees_its_slot_and_its_token_reservation(start_patient_gateway, redis_server, fakes):
    """Seen through the rate-limit headers: while a stream reserving 900
    tokens is open, a second request is refused for concurrency and the
    tokens left show the reservation; once the client drops the stream, the
    next request is admitted (the slot is free) and the tokens left show the
    stream's real usage in place of its reservation."""
    tpm = 10_000
    gw = start_patient_gateway(redis_section(redis_server.url), key_fields=f"tpm = {tpm}\nmax_concurrent = 1")
    body = {"model": V02, "messages": ASK, "max_tokens": 50, **CHEAPEST}
    stream = {"model": V02, "stream": True, "max_tokens": 900, **CHEAPEST,
              "messages": [{"role": "user", "content": "a b c d e f " + fault_marker("stall", after=1)}]}
    with httpx.Client(base_url=gw.base_url, headers=AUTH, timeout=30) as http:
        first = http.post("/chat/completions", json=body)
        assert first.status_code == 200
        reserved = tpm - int(first.headers["x-ratelimit-remaining-tokens"])  # what a request like ``body`` reserves
        used_first = first.json()["usage"]["total_tokens"]
        assert used_first < reserved
        with http.stream("POST", "/chat/completions", json=stream) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: an iterator dropped half-way closes the connection
            while not next(lines).startswith("data: {"):
                pass
            refused = http.post("/chat/completions", json=body)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
            held_now = tpm - used_first - int(refused.headers["x-ratelimit-remaining-tokens"])
            assert held_now > 900  # the open stream's reservation: max_tokens and its prompt estimate
            stream_id = held.headers["x-request-id"]
        fakes["deepinfra"].wait_cancelled(timeout=10)  # the client went away; the gateway dropped the upstream

        def admitted() -> httpx.Response:
            r = http.post("/chat/completions", json=body)
            assert r.status_code == 200, r.text  # 429 while the slot is still held
            return r

        after = eventually(admitted)
        used_stream = tpm - used_first - reserved - int(after.headers["x-ratelimit-remaining-tokens"])
        record = eventually(lambda: http.get("/generation", params={"id": stream_id}).json().get("data"))
    # The stream's reservation was replaced by what it really used: its prompt,
    # counted as the model's tokenizer encodes the chat (the upstream sent no
    # usage), and the little it streamed.
    assert used_stream == record["tokens_prompt"] + record["tokens_completion"] < 900
    assert record["tokens_prompt"] == mistral_count("v1", stream["messages"])


def mistral_count(version: str, messages: list[dict]) -> int:
    """mistral-common's own count of a chat (``encode_chat_completion``)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    files = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3",
             "tekken": "tekken_240911.json"}
    tokenizer = MistralTokenizer.from_file(str(resources.files("mistral_common").joinpath("data", files[version])))
    return len(tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens)


def deepinfra_price() -> tuple[float, float]:
    """V02's DeepInfra prices (USD per million tokens), from the built-in catalog."""
    catalog = tomllib.loads(resources.files("gateway").joinpath("data", "catalog.toml").read_text())
    model = next(m for m in catalog["models"] if m["id"] == V02)
    endpoint = next(e for e in model["endpoints"] if e["provider"] == "deepinfra")
    return endpoint["input_usd_per_mtok"], endpoint["output_usd_per_mtok"]


def test_budget_admits_exactly_the_requests_it_pays_for(start_gateway, redis_server):
    """Sequential requests on one key: each is admitted while the day's spend
    is below the budget, so the count is the budget over the cost of one
    request, rounded up. The cost comes from DeepInfra's price in the
    catalog and the fake's usage (words + 3 of prompt, the answer's words)."""
    inp, out = deepinfra_price()
    cost = (prompt_tokens(ASK) * inp + count_words(answer_text("deepinfra", ASK)) * out) / 1e6
    budget = 0.000002
    expected = math.ceil(budget / cost)
    assert budget / cost % 1 > 0.1  # not near a whole number: no rounding question at the edge
    gw = start_gateway(redis_section(redis_server.url), key_fields=f"budget_usd_per_day = {budget}")
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    spent, successes = 0.0, 0
    with pytest.raises(openai.APIStatusError) as err:
        for _ in range(expected + 5):
            r = client.chat.completions.create(model=V02, messages=ASK, extra_body=CHEAPEST)
            assert r.usage.model_extra["estimated_cost"] == pytest.approx(cost)
            spent += r.usage.model_extra["estimated_cost"]
            successes += 1
    assert err.value.status_code == 402
    assert err.value.code == "budget_exceeded"
    assert successes == expected
    assert spent == pytest.approx(expected * cost)


def test_model_allow_list(start_gateway):
    gw = start_gateway(key_fields=f'models = ["{V02}"]')
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    assert client.chat.completions.create(model=V02.upper(), messages=ASK).choices
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="mistralai/mistral-7b-instruct-v0.1", messages=ASK)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=V02, messages=ASK, extra_body={"models": ["mistralai/mistral-nemo"]})


def test_in_process_limits_without_redis(start_gateway):
    gw = start_gateway(key_fields="rpm = 5")
    results = asyncio.run(fire([gw.base_url], 12))
    assert sum(not isinstance(r, Exception) for r in results) == 5


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_redis_killed_mid_run(start_gateway, on_error):
    server = RedisServer().start()
    try:
        gw = start_gateway(redis_section(server.url, on_error=on_error, timeout_s=0.2), key_fields="rpm = 1000")
        client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=10)
        assert client.chat.completions.create(model=V02, messages=ASK).choices
        server.stop()
        for _ in range(3):
            started = time.monotonic()
            if on_error == "open":
                r = client.chat.completions.with_raw_response.create(model=V02, messages=ASK)
                assert r.parse().choices and "x-ratelimit-limit-requests" not in r.headers
            else:
                with pytest.raises(openai.InternalServerError) as err:
                    client.chat.completions.create(model=V02, messages=ASK)
                assert err.value.status_code == 503 and err.value.code == "rate_limiter_unavailable"
            assert time.monotonic() - started < 3  # no hang: every Redis call has a short timeout
        assert gw.process.poll() is None  # never a crash
    finally:
        server.cleanup()


def test_endpoint_quota_steers_routing(start_gateway, redis_server, fakes):
    extra = redis_section(redis_server.url) + (
        f'[[models]]\nid = "{V02}"\n[[models.endpoints]]\nprovider = "deepinfra"\nrpm = 2\n')
    gw = start_gateway(extra)
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    served = [client.chat.completions.create(model=V02, messages=ASK, extra_body=CHEAPEST).model_extra["provider"]
              for _ in range(5)]
    assert served == ["deepinfra", "deepinfra", "openrouter", "openrouter", "openrouter"]
    assert len(fakes["deepinfra"].requests(chat_only=True)) == 2  # no 429 collected from it
