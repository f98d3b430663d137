"""The spend ledger end to end: a real ``gateway serve`` (two workers), a real
Redis or the embedded SQLite file, fake providers of which one fails so some
requests fail over, and the openai SDK as clients. What the reports say must
equal what the clients were told: requests and tokens exactly, cost to
1e-9 USD per request."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import random
import secrets
from collections import defaultdict
from dataclasses import dataclass

import httpx
import openai

from tests.e2e.conftest import ENV_NAMES, GATEWAY_KEY, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.eventually import eventually

V02 = "mistralai/mistral-7b-instruct-v0.2"  # deepinfra, then openrouter
V03 = "mistralai/mistral-7b-instruct-v0.3"  # novita
ADMIN_KEY = "adm-e2e-" + "s" * 24
KEY_B = "sk-gw-e2e-key-b"
KEYS = {"e2e": GATEWAY_KEY, "e2e-b": KEY_B}
BUDGETS = {"e2e": (None, 5.0), "e2e-b": (2.0, None)}  # (per day, per month)
CHEAPEST = {"provider": {"sort": "price"}}  # deepinfra first for v0.2


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def spend_config(fakes, store: str) -> str:
    """Two file keys with budgets, an admin key, and ``store`` ([redis] or [admin] data_dir)."""
    extra = (
        "[[auth.keys]]\n"
        'name = "e2e-b"\n'
        f'sha256 = "{_sha(KEY_B)}"\n'
        "budget_usd_per_day = 2.0\n"
        "[admin]\n"
        f'sha256 = "{_sha(ADMIN_KEY)}"\n'
        f"{store}"
        "[health]\n"
        "failure_threshold = 100000\n"  # failures must fail over, not open circuits
    )
    config = gateway_config(fakes, extra, key_fields="budget_usd_per_month = 5.0")
    return config.replace("timeout_s = 2.0", "timeout_s = 60.0")  # a slow machine is not a failure here


@dataclass
class Seen:
    """What the clients were told for one key and model."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


async def fire(base_url: str, n: int, seed: int) -> tuple[dict[tuple[str, str], Seen], int]:
    """``n`` requests over two keys and two models, plain and streamed, 12 at a
    time; what each (key, model) was told, and how many requests failed over."""
    rng = random.Random(seed)
    clients = {
        name: openai.AsyncOpenAI(base_url=base_url, api_key=k, max_retries=0, timeout=120) for name, k in KEYS.items()
    }
    seen: dict[tuple[str, str], Seen] = defaultdict(Seen)
    failovers = 0
    gate = asyncio.Semaphore(12)

    async def one(i: int) -> None:
        nonlocal failovers
        key = "e2e" if i % 2 else "e2e-b"
        model = V03 if i % 3 == 0 else V02
        stream = rng.random() < 0.5
        words = " ".join(f"w{j}" for j in range(rng.randint(1, 30)))
        kwargs = {"model": model, "messages": [{"role": "user", "content": f"spend {i} {words}"}]}
        if model == V02:
            kwargs["extra_body"] = CHEAPEST
        async with gate:
            if stream:
                raw = await clients[key].chat.completions.with_raw_response.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs
                )
                chunks = [c async for c in raw.parse()]
                usage = chunks[-1].usage
            else:
                raw = await clients[key].chat.completions.with_raw_response.create(**kwargs)
                usage = raw.parse().usage
        assert raw.headers["x-gateway-model"] == model
        failovers += raw.headers["x-gateway-attempts"] != "1"
        got = seen[(key, model)]
        got.requests += 1
        got.prompt_tokens += usage.prompt_tokens
        got.completion_tokens += usage.completion_tokens
        got.cost += usage.model_extra["estimated_cost"]

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in clients.values():
            await c.close()
    return seen, failovers


def admin_get(gw: GatewayProcess, path: str, **headers: str) -> httpx.Response:
    return httpx.get(gw.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}", **headers}, timeout=30)


def check_reports(gw: GatewayProcess, seen: dict[tuple[str, str], Seen]) -> None:
    """The per-key reports by model, and the all-keys report, equal what clients saw."""
    for key in KEYS:
        mine = {model: s for (k, model), s in seen.items() if k == key}
        n = sum(s.requests for s in mine.values())

        def settled(key: str = key, n: int = n) -> dict:
            r = admin_get(gw, f"/v1/keys/{key}/spend?group_by=model")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["total"]["requests"] == n  # deferred writes all in
            return body

        body = eventually(settled)
        assert body["group_by"] == "model" and body["from"] <= body["to"]
        assert {row["model"] for row in body["data"]} == set(mine)
        for row in body["data"]:
            s = mine[row["model"]]
            assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
                s.requests,
                s.prompt_tokens,
                s.completion_tokens,
            )
            assert abs(row["cost"] - s.cost) <= 1e-9 * s.requests, (key, row, s)
        assert abs(body["total"]["cost"] - sum(s.cost for s in mine.values())) <= 1e-9 * n
        assert body["total"]["prompt_tokens"] == sum(s.prompt_tokens for s in mine.values())

    def everyone_settled() -> dict:
        # Another worker may still hold its last writes (the answering worker
        # adds only its own): they are in the file or in Redis within one batch.
        body = admin_get(gw, "/v1/spend?group_by=key,model").json()
        assert body["total"]["requests"] == sum(s.requests for s in seen.values())
        return body

    everyone = eventually(everyone_settled)
    for row in everyone["data"]:
        s = seen[(row["key"], row["model"])]
        assert row["requests"] == s.requests and abs(row["cost"] - s.cost) <= 1e-9 * s.requests


def check_key_endpoint(gw: GatewayProcess, seen: dict[tuple[str, str], Seen]) -> None:
    """``GET /v1/key`` with each caller's own key: its limits, usage and budget left."""
    for key, secret in KEYS.items():
        mine = [s for (k, _), s in seen.items() if k == key]
        cost = sum(s.cost for s in mine)

        def settled(secret: str = secret, n: int = sum(s.requests for s in mine)) -> dict:
            # The worker that answers sees the store plus its own unwritten spend; another
            # worker's last requests reach the store within one deferred batch.
            r = httpx.get(gw.base_url + "/key", headers={"authorization": f"Bearer {secret}"}, timeout=30)
            assert r.status_code == 200, r.text
            data: dict = r.json()["data"]
            assert all(data["usage"][period]["requests"] == n for period in ("today", "month"))
            return data

        data = eventually(settled)
        assert data["name"] == key and data["source"] == "config"
        day_budget, month_budget = BUDGETS[key]
        assert (data["budget_usd_per_day"], data["budget_usd_per_month"]) == (day_budget, month_budget)
        for period in ("today", "month"):  # one UTC day's run: both periods hold all of it
            usage = data["usage"][period]
            assert usage["completion_tokens"] == sum(s.completion_tokens for s in mine)
            assert abs(usage["cost"] - cost) <= 1e-9 * usage["requests"]
        for period, budget in (("day", day_budget), ("month", month_budget)):
            left = data["remaining"][period]
            assert left is None if budget is None else abs(left - (budget - cost)) <= 1e-9 * len(mine) + 1e-12
    assert httpx.get(gw.base_url + "/key", headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 401


def run(fakes, store: str, n: int, seed: int, fail_first: int) -> tuple[GatewayProcess, dict, int]:
    env = {ENV_NAMES[name]: PROVIDER_KEYS[name] for name in fakes}
    gw = GatewayProcess(spend_config(fakes, store), env=env, args=["--workers", "2"]).start(ready_timeout_s=120)
    try:
        fakes["deepinfra"].control("status", status=500, count=fail_first)  # then ok again
        seen, failovers = asyncio.run(fire(gw.base_url, n, seed))
    except BaseException:
        gw.stop()
        raise
    return gw, seen, failovers


def test_spend_equals_what_clients_were_told_under_load_with_failover(fakes, redis_server):
    prefix = f"t{secrets.token_hex(4)}:"
    gw, seen, failovers = run(fakes, f'[redis]\nurl = "{redis_server.url}"\nprefix = "{prefix}"\n', 200, 1, 25)
    with gw:
        failed = [q for q in fakes["deepinfra"].requests(chat_only=True) if q["status"] == 500]
        assert len(failed) == 25 and failovers == 25  # each failed attempt failed over, and was not billed
        assert sum(s.requests for s in seen.values()) == 200 and len(seen) == 4
        check_reports(gw, seen)
        check_key_endpoint(gw, seen)

        # CSV: the same figures, costs written exactly.
        r = admin_get(gw, "/v1/keys/e2e/spend?group_by=day,model", accept="text/csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert list(rows[0]) == ["date", "model", "requests", "prompt_tokens", "completion_tokens", "cost"]
        assert {row["model"] for row in rows} == {V02, V03}
        for row in rows:
            s = seen[("e2e", row["model"])]
            assert int(row["requests"]) == s.requests and int(row["completion_tokens"]) == s.completion_tokens
            assert abs(float(row["cost"]) - s.cost) <= 1e-9 * s.requests
            assert len(row["cost"].split(".")[1]) <= 10  # the ledger's exact units, not a float's tail

        # Reports refuse what they cannot answer, naming the parameter.
        r = admin_get(gw, "/v1/keys/e2e/spend?from=2025-01-01&to=2026-06-01")
        assert r.status_code == 400 and r.json()["error"]["param"] == "from"
        assert admin_get(gw, "/v1/keys/nobody/spend").json()["error"]["code"] == "key_not_found"


def test_spend_in_the_embedded_sqlite_file_without_redis(fakes, tmp_path):
    store = f'data_dir = "{tmp_path}"\n'
    gw, seen, failovers = run(fakes, store, 60, 2, 8)
    with gw:
        assert failovers == 8 and sum(s.requests for s in seen.values()) == 60
        check_reports(gw, seen)
        check_key_endpoint(gw, seen)
    assert (tmp_path / "spend.sqlite3").exists()
    # A restart reads the same spend from the file (what was held was written at shutdown).
    env = {ENV_NAMES[name]: PROVIDER_KEYS[name] for name in fakes}
    with GatewayProcess(spend_config(fakes, store), env=env).start(ready_timeout_s=120) as again:
        check_reports(again, seen)
