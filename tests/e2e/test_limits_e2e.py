"""Keys, rate limits and budgets across real gateway processes and a real Redis."""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import GATEWAY_KEY
from tests.redis_server import RedisServer

V02 = "mistralai/mistral-7b-instruct-v0.2"
ASK = [{"role": "user", "content": "Say hi"}]
CHEAPEST = {"provider": {"sort": "price"}}


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


def test_token_reservations_reconcile_after_a_cancelled_stream(start_gateway, redis_server, fakes):
    gw = start_gateway(redis_section(redis_server.url), key_fields="tpm = 1000")
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=V02, messages=ASK, max_tokens=900, extra_body=CHEAPEST)
    # The reservation (prompt estimate + 900) was settled to the real usage.
    used = raw.parse().usage.total_tokens
    assert used < 50
    second = client.chat.completions.with_raw_response.create(model=V02, messages=ASK, max_tokens=900,
                                                              extra_body=CHEAPEST)
    assert int(second.headers["x-ratelimit-remaining-tokens"]) < 100  # 900 + estimate reserved right now
    # A stream reserving 900 that the client drops after one chunk.
    body = {"model": V02, "stream": True, "max_tokens": 900, **CHEAPEST,
            "messages": [{"role": "user", "content": "a b c d e f g h i j k l [[fault:delay=0.3]]"}]}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", gw.base_url + "/chat/completions", json=body,
                         headers={"authorization": f"Bearer {GATEWAY_KEY}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
    fakes["deepinfra"].wait_cancelled(timeout=10)
    time.sleep(0.5)
    # Had the dropped stream kept its 900-token reservation, 900 more would not fit.
    third = client.chat.completions.with_raw_response.create(model=V02, messages=ASK, max_tokens=900,
                                                             extra_body=CHEAPEST)
    assert third.parse().choices[0].message.content


def test_budget_runs_out(start_gateway, redis_server):
    # deepinfra: $0.07/Mtok; one request costs ~1.5e-6 USD.
    gw = start_gateway(redis_section(redis_server.url), key_fields="budget_usd_per_day = 0.000002")
    client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0)
    spent = 0.0
    with pytest.raises(openai.APIStatusError) as err:
        for _ in range(10):
            r = client.chat.completions.create(model=V02, messages=ASK, extra_body=CHEAPEST)
            spent += r.usage.model_extra["estimated_cost"]
    assert err.value.status_code == 402
    assert err.value.code == "budget_exceeded"
    assert 0.000002 <= spent < 0.000002 + 0.00001


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
