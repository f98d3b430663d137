"""Three gateway processes on one real Redis, with quota blocks in play
(``block_requests`` at its default): a key's rpm, tpm, daily budget and
max_concurrent hold exactly across them under many concurrent requests.

The load is an async httpx client spreading requests round-robin over the
three processes; the upstream is the DeepInfra fake, whose usage is
deterministic (``tests/fakes/upstream.py``: prompt = words + 3 per message,
completion = the answer's words, cut to ``max_tokens``). Expected counts are
computed here from the limits, that usage and the catalog's price.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.e2e.conftest import ENV_NAMES, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.e2e.test_limits_e2e import deepinfra_price, redis_section
from tests.eventually import aeventually, eventually
from tests.fakes.servers import fault_marker
from tests.fakes.upstream import prompt_tokens

V02 = "mistralai/mistral-7b-instruct-v0.2"
CHEAPEST = {"provider": {"sort": "price"}}  # DeepInfra, the cheapest endpoint of V02

#: A prompt of 12 three-letter words and an answer cut to 5 words: 15 + 5 =
#: 20 tokens by the fake's count. Its bytes (47) make the gateway's tpm
#: reservation (about 4 bytes a token, plus max_tokens) the same 20 tokens,
#: so a request's reservation and its settled usage are equal and the count
#: of requests a tpm limit admits does not depend on when they settle.
WORDS = 12
MAX_TOKENS = 5
PROMPT = " ".join(["abc"] * WORDS)
BODY = {"model": V02, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS, **CHEAPEST}
USAGE = prompt_tokens(BODY["messages"]) + MAX_TOKENS

RPM = 2_000
TPM = USAGE * 1_000
BUDGET_REQUESTS = 300
CONCURRENT = 4


def request_cost() -> float:
    inp, out = deepinfra_price()
    return (prompt_tokens(BODY["messages"]) * inp + MAX_TOKENS * out) / 1e6


#: Half a request's cost above 300 requests: exactly 301 are admitted (each
#: while the spend is below the budget), with no float rounding near the edge.
BUDGET = (BUDGET_REQUESTS + 0.5) * request_cost()

KEYS = {
    "rpm": f"rpm = {RPM}",
    "tpm": f"tpm = {TPM}",
    "budget": f"budget_usd_per_day = {BUDGET!r}",
    "conc": f"max_concurrent = {CONCURRENT}",
}


def secret(name: str) -> str:
    return f"sk-exact-{name}"


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret(name)}"}


@pytest.fixture(scope="module")
def replicas(fakes, redis_server):
    """Three gateway processes, one Redis prefix: each test uses a key of its own."""
    keys = []
    for name, fields in KEYS.items():
        keys += ["[[auth.keys]]", f'name = "{name}"',
                 f'sha256 = "{hashlib.sha256(secret(name).encode()).hexdigest()}"', fields]
    # Long upstream timeouts: a request the fake holds ends when the client goes away.
    config = gateway_config(fakes, redis_section(redis_server.url) + "\n".join(keys) + "\n").replace(
        "timeout_s = 2.0", "timeout_s = 60.0")
    env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
    gws = [GatewayProcess(config, env=env) for _ in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda g: g.start(180), gws))
        yield gws
    finally:
        for g in gws:
            g.stop()


async def fire(gws: list[GatewayProcess], key: str, bodies: list[dict], concurrency: int = 48) -> list[httpx.Response]:
    """Every body POSTed once, spread round-robin over the processes, at most
    ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = [httpx.AsyncClient(base_url=g.base_url, timeout=120, limits=limits) for g in gws]

    async def one(i: int, body: dict) -> httpx.Response:
        async with gate:
            return await clients[i % len(clients)].post("/chat/completions", json=body, headers=auth(key))

    try:
        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    finally:
        for c in clients:
            await c.aclose()


def codes(responses: list[httpx.Response]) -> dict[str, int]:
    """How many answers of each kind: "ok", or the error code."""
    out: dict[str, int] = {}
    for r in responses:
        kind = "ok" if r.status_code == 200 else r.json()["error"]["code"]
        out[kind] = out.get(kind, 0) + 1
    return out


def chat_requests(fake) -> int:
    return len(fake.requests(chat_only=True))


def test_rpm_2000_admits_exactly_2000_of_4000(replicas, fakes, redis_server):
    responses = asyncio.run(fire(replicas, "rpm", [BODY] * (2 * RPM)))
    assert codes(responses) == {"ok": RPM, "rate_limit_exceeded": RPM}
    assert chat_requests(fakes["deepinfra"]) == RPM  # each admitted request reached the upstream once
    served = {r.headers.get("x-gateway-provider") for r in responses if r.status_code == 200}
    assert served == {"deepinfra"}
    # Once every block is handed back, Redis's log holds exactly the admitted requests.
    requests_log = f"{redis_prefix(replicas)}{{key:rpm}}:req"
    eventually(lambda: redis_zcard(redis_server, requests_log) == RPM)


def test_tpm_admits_exactly_what_the_tokens_allow(replicas, fakes, redis_server):
    admitted = TPM // USAGE
    responses = asyncio.run(fire(replicas, "tpm", [BODY] * (2 * admitted)))
    ok = [r for r in responses if r.status_code == 200]
    assert all(r.json()["usage"]["total_tokens"] == USAGE for r in ok)  # the fake's count, as planned
    assert codes(responses) == {"ok": admitted, "rate_limit_exceeded": admitted}
    # Once every block is handed back, Redis holds exactly the tokens used.
    prefix = redis_prefix(replicas)
    eventually(lambda: redis_get(redis_server, f"{prefix}{{key:tpm}}:toksum") == str(admitted * USAGE))


def test_daily_budget_admits_exactly_the_requests_it_pays_for(replicas, fakes):
    """A request is admitted while the day's spend is below the budget, so the
    last one admitted is the one that crosses it: 301 requests for 300.5
    requests' worth, under concurrent load over three processes."""
    responses = asyncio.run(fire(replicas, "budget", [BODY] * (2 * BUDGET_REQUESTS), concurrency=24))
    ok = [r for r in responses if r.status_code == 200]
    assert all(r.json()["usage"]["estimated_cost"] == pytest.approx(request_cost()) for r in ok)
    assert codes(responses) == {"ok": BUDGET_REQUESTS + 1, "budget_exceeded": BUDGET_REQUESTS - 1}


def test_max_concurrent_holds_across_processes(replicas, fakes, redis_server):
    """Streams the upstream stalls after one chunk keep their slots: of 24 at
    once over three processes exactly 4 reach the upstream and 20 are refused;
    once their clients go away the slots are free again, and the next 24
    fare the same."""
    stall = {**BODY, "stream": True,
             "messages": [{"role": "user", "content": "hold on " + fault_marker("stall", after=1)}]}
    deepinfra = fakes["deepinfra"]
    leases = f"{redis_prefix(replicas)}{{key:conc}}:lease"

    async def reached() -> int:
        return len(await deepinfra.arequests(chat_only=True))

    async def one_round(clients: list[httpx.AsyncClient]) -> None:
        before = await reached()
        refused: list[httpx.Response] = []
        held: list[httpx.Response] = []
        release = asyncio.Event()

        async def one(i: int) -> None:
            async with clients[i % 3].stream("POST", "/chat/completions", json=stall, headers=auth("conc")) as r:
                if r.status_code != 200:
                    await r.aread()
                    refused.append(r)
                    return
                # Read up to the first chunk, keeping the iterator: one dropped
                # half-way closes the connection (httpcore ends a stream whose
                # iteration stops early), and the client would go away now.
                lines = r.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):
                    pass
                held.append(r)
                await release.wait()  # leaving the block closes the connection: the client went away

        tasks = [asyncio.ensure_future(one(i)) for i in range(24)]
        await aeventually(lambda: len(refused) + len(held) == 24, timeout=60)
        assert len(held) == CONCURRENT
        assert codes(refused) == {"concurrency_limit_exceeded": 24 - CONCURRENT}
        assert await reached() - before == CONCURRENT
        release.set()
        await asyncio.gather(*tasks)
        # Every process noticed its client go away and handed the slot back.
        await aeventually(lambda: redis_zcard(redis_server, leases) == 0, timeout=30)

    async def run() -> None:
        clients = [httpx.AsyncClient(base_url=g.base_url, timeout=120) for g in replicas]
        try:
            await one_round(clients)
            await one_round(clients)
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(run())
    assert sum(q["cancelled"] for q in deepinfra.requests(chat_only=True)) == 2 * CONCURRENT


# --- Redis, read directly --------------------------------------------------------


def redis_prefix(replicas: list[GatewayProcess]) -> str:
    """The ``[redis] prefix`` the processes were started with."""
    return re.search(r'prefix = "([^"]+)"', replicas[0].config_path.read_text()).group(1)


def _redis(server) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def redis_get(server, key: str) -> str | None:
    with _redis(server) as r:
        return r.get(key)


def redis_zcard(server, key: str) -> int:
    with _redis(server) as r:
        return r.zcard(key)
