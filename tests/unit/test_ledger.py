"""The spend ledger in its three stores (memory, SQLite, a real Redis), the
report helpers, and the ledger seen through the HTTP routes."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import io
import random
import secrets
import sqlite3

import httpx
import pytest
import respx

from gateway.control.ledger import (
    UNITS_PER_USD,
    LedgerError,
    MemoryLedger,
    RedisLedger,
    SpendRow,
    SqliteLedger,
    cost_units,
    usd_text,
    utc_day,
)
from gateway.errors import GatewayError
from gateway.server.admin_spend import _csv, grouping, report_range
from gateway.storage.autopipeline import AutoPipeline
from gateway.storage.resp import RespClient
from tests.eventually import aeventually
from tests.unit.conftest import DEEPINFRA, OPENROUTER, V02, chat, completion, make_gateway

V03 = "mistralai/mistral-7b-instruct-v0.3"


def today() -> dt.date:
    return dt.datetime.strptime(utc_day(), "%Y%m%d").date()


def totals(rows, key=None, model=None):
    """(requests, prompt, completion, cost units) over the rows that match."""
    out = [0, 0, 0, 0]
    for r in rows:
        if (key is None or r.key == key) and (model is None or r.model == model):
            for i, v in enumerate((r.requests, r.prompt_tokens, r.completion_tokens, r.cost)):
                out[i] += v
    return tuple(out)


def spend_plan(n: int, seed: int = 7):
    """n requests over two keys and two models, with costs as usage reports them (1e-10 USD)."""
    rng = random.Random(seed)
    plan = []
    for _ in range(n):
        p, c = rng.randint(1, 4000), rng.randint(0, 2000)
        cost = round((p * rng.choice([0.07, 0.18, 0.39]) + c * 0.11) / 1e6, 10)
        plan.append((rng.choice(["team-a", "team-b"]), rng.choice([V02, V03]), p, c, cost))
    return plan


def expected(plan, key=None, model=None):
    sel = [x for x in plan if (key is None or x[0] == key) and (model is None or x[1] == model)]
    return (len(sel), sum(x[2] for x in sel), sum(x[3] for x in sel), sum(round(x[4] * UNITS_PER_USD) for x in sel))


# --- units ---------------------------------------------------------------------------


def test_cost_units_are_exact_at_the_precision_of_usage():
    rng = random.Random(1)
    costs = [round(rng.uniform(0, 0.02), 10) for _ in range(5000)]
    units = [cost_units(c) for c in costs]
    assert all(abs(u / UNITS_PER_USD - c) < 1e-15 for u, c in zip(units, costs, strict=True))
    assert abs(sum(units) / UNITS_PER_USD - sum(costs)) < 1e-9  # the float sum drifts; the integers do not
    assert cost_units(None) == 0 and cost_units(0.0) == 0
    assert usd_text(12_345) == "0.0000012345" and usd_text(10**10) == "1.0" and usd_text(0) == "0.0"
    assert usd_text(3 * 10**10 + 5) == "3.0000000005"


# --- the three stores, one contract ----------------------------------------------------


async def check_store(ledger, reader=None):
    """Adds a plan, then reads it back per key, over all keys and out of range."""
    reader = reader or ledger
    plan = spend_plan(300)
    for key, model, p, c, cost in plan:
        ledger.add(key, model, p, c, cost)
    ledger.add("team-a", V02, 5, 0, None)  # unpriced: a request and its tokens, no cost
    plan.append(("team-a", V02, 5, 0, 0.0))
    day = today()

    async def all_there():
        rows = await reader.rows("team-a", day, day)
        assert totals(rows) == expected(plan, "team-a")
        return rows

    rows = await aeventually(all_there)
    assert {r.key for r in rows} == {"team-a"} and all(r.day == day for r in rows)
    assert len(rows) == 2  # one row per model: aggregates, not one per request
    for model in (V02, V03):
        assert totals(rows, model=model) == expected(plan, "team-a", model)
    everyone = await reader.rows(None, day - dt.timedelta(days=3), day)
    assert {r.key for r in everyone} >= {"team-a", "team-b"}
    for key in ("team-a", "team-b"):
        for model in (V02, V03):
            assert totals(everyone, key, model) == expected(plan, key, model)
    assert await reader.rows("team-a", day - dt.timedelta(days=10), day - dt.timedelta(days=1)) == []
    assert await reader.rows("nobody", day, day) == []


async def test_memory_ledger():
    await check_store(MemoryLedger(400))


async def test_sqlite_ledger_reads_what_is_not_written_yet_and_keeps_it_across_restarts(tmp_path):
    path = tmp_path / "data" / "spend.sqlite3"
    ledger = SqliteLedger(path, 400, interval_s=30)  # nothing written before close
    ledger.add("solo", V02, 10, 20, 0.0000123456)
    day = today()
    assert totals(await ledger.rows("solo", day, day)) == (1, 10, 20, 123456)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM spend").fetchone() == (0,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    await ledger.close()  # the shutdown flush
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT key, requests, cost FROM spend").fetchall() == [("solo", 1, 123456)]
    again = SqliteLedger(path, 400)  # a restart
    await check_store(again)
    await again.close()
    assert totals(await _reopened(path, "solo")) == (1, 10, 20, 123456)
    assert totals(await _reopened(path, "team-b")) == expected(spend_plan(300), "team-b")


async def _reopened(path, key):
    ledger = SqliteLedger(path, 400)
    try:
        return await ledger.rows(key, today(), today())
    finally:
        await ledger.close()


async def test_sqlite_ledger_writes_in_batches_of_one_transaction(tmp_path):
    path = tmp_path / "spend.sqlite3"
    ledger = SqliteLedger(path, 400, interval_s=0.01)
    for _ in range(50):
        ledger.add("k", V02, 1, 1, 1e-10)

    def written():
        with sqlite3.connect(path) as db:
            return db.execute("SELECT requests, prompt_tokens, cost FROM spend").fetchall() == [(50, 50, 50)]

    await aeventually(written)
    await ledger.close()


async def test_two_sqlite_writers_on_one_file_add_up(tmp_path):
    """Two workers of one host share the file (WAL, upserts that add)."""
    path = tmp_path / "spend.sqlite3"
    a, b = SqliteLedger(path, 400, interval_s=0.005), SqliteLedger(path, 400, interval_s=0.005)
    for i in range(200):
        (a if i % 2 else b).add("k", V02, 2, 3, 0.0000000007)
        if i % 20 == 0:
            await asyncio.sleep(0.01)
    await a.close()
    await b.close()
    assert totals(await _reopened(path, "k")) == (200, 400, 600, 1400)


async def test_sqlite_ledger_drops_days_past_retention(tmp_path):
    path = tmp_path / "spend.sqlite3"
    SqliteLedger(path, 30)._db.close()  # the schema
    old, kept = today() - dt.timedelta(days=30), today() - dt.timedelta(days=29)
    with sqlite3.connect(path) as db:
        for day in (old, kept):
            db.execute("INSERT INTO spend VALUES (?, 'k', 'm', 1, 1, 1, 1)", (day.strftime("%Y%m%d"),))
    ledger = SqliteLedger(path, 30, interval_s=0.001)
    ledger.add("k", "m", 1, 1, None)
    await ledger.close()
    with sqlite3.connect(path) as db:
        days = [d for (d,) in db.execute("SELECT day FROM spend ORDER BY day")]
    assert days == [kept.strftime("%Y%m%d"), utc_day()]


async def test_unreadable_sqlite_is_a_ledger_error(tmp_path):
    ledger = SqliteLedger(tmp_path / "spend.sqlite3", 400)
    await asyncio.get_running_loop().run_in_executor(ledger._thread, ledger._db.execute, "DROP TABLE spend")
    with pytest.raises(LedgerError):
        await ledger.rows("k", today(), today())
    ledger._pending.clear()
    await ledger.close()


@pytest.fixture
async def redis_pair(redis_server):
    """Two ledgers (two replicas: each its own connection and batcher) on one Redis prefix."""
    prefix = f"t{secrets.token_hex(4)}:"
    clients = [RespClient(redis_server.url, 2.0) for _ in range(2)]
    ledgers = [RedisLedger(prefix, AutoPipeline(c, 2.0), 400) for c in clients]
    yield ledgers, clients[0], prefix
    for c in clients:
        await c.aclose()


async def test_redis_ledger(redis_pair):
    (ledger, _), _, _ = redis_pair
    await check_store(ledger)


async def test_redis_ledger_is_shared_by_replicas(redis_pair):
    (a, b), _, _ = redis_pair
    plan = spend_plan(200, seed=3)
    for i, (key, model, p, c, cost) in enumerate(plan):
        (a if i % 2 else b).add(key, model, p, c, cost)
    await b.close()  # b's batch handed to its pipeline, and sent
    await b.batcher.drain()
    rows = await a.rows(None, today(), today())  # a's own, held or not, and b's
    for key in ("team-a", "team-b"):
        for model in (V02, V03):
            assert totals(rows, key, model) == expected(plan, key, model)


async def test_redis_ledger_sends_one_deferred_script_per_key_day_and_model_and_expires(redis_pair):
    (ledger, _), raw, prefix = redis_pair
    for _ in range(3):
        ledger.add("k", V02, 3, 4, 0.0000000042)
    assert not ledger.batcher._pending  # held in memory: nothing per request
    await ledger.close()  # (the timer does this within interval_s)
    assert len(ledger.batcher._pending) == 1  # one call for the three, deferred: it rides with the next round trip
    await ledger.batcher.drain()
    day = utc_day()
    by_key, by_day = f"{prefix}{{spend:{day}}}:key:k", f"{prefix}{{spend:{day}}}:keys"
    (fields, members, ttl, ttl_day) = await raw.execute(
        [("HGETALL", by_key), ("SMEMBERS", by_day), ("TTL", by_key), ("TTL", by_day)]
    )
    assert dict(zip(fields[::2], fields[1::2], strict=True)) == {
        b"r:" + V02.encode(): b"3",
        b"p:" + V02.encode(): b"9",
        b"c:" + V02.encode(): b"12",
        b"$:" + V02.encode(): b"126",
    }
    assert members == [b"k"]
    assert 399 * 86400 < ttl <= 400 * 86400 and 399 * 86400 < ttl_day <= 400 * 86400


async def test_redis_ledger_survives_a_flushed_script_cache(redis_pair):
    (ledger, _), raw, _ = redis_pair
    ledger.add("k", V02, 1, 1, None)
    await ledger.close()
    await ledger.batcher.drain()
    await raw.execute([("SCRIPT", "FLUSH")])
    ledger.add("k", V02, 1, 1, None)
    await ledger.close()
    await ledger.batcher.drain()
    await aeventually(lambda: _requests(ledger, "k", 2))


async def _requests(ledger, key, n):
    assert totals(await ledger.rows(key, today(), today()))[0] == n


async def test_redis_ledger_read_failure_is_a_ledger_error():
    ledger = RedisLedger("x:", AutoPipeline(RespClient("redis://127.0.0.1:1/0", 0.5), 0.5), 400)
    with pytest.raises(LedgerError):
        await ledger.rows("k", today(), today())


# --- report parameters -------------------------------------------------------------


def test_report_range_and_grouping():
    now = dt.date(2025, 3, 17)
    assert report_range({}, now) == (dt.date(2025, 3, 1), now)
    assert report_range({"to": "2025-02-10"}, now) == (dt.date(2025, 2, 1), dt.date(2025, 2, 10))
    assert report_range({"from": "2024-03-17", "to": "2025-03-17"}, now)[0] == dt.date(2024, 3, 17)  # 366 days
    for params, param in [
        ({"from": "2025-3-1"}, "from"),
        ({"to": "20250301"}, "to"),
        ({"from": "2025-02-30"}, "from"),
        ({"from": "2025-03-18"}, "from"),  # after to (today)
        ({"from": "2024-03-16", "to": "2025-03-17"}, "from"),  # 367 days
    ]:
        with pytest.raises(GatewayError) as err:
            report_range(params, now)
        assert err.value.status == 400 and err.value.param == param
    assert grouping(None, ("day", "model")) == ("day",)
    assert grouping("model,day", ("day", "model")) == ("day", "model")
    assert grouping("key", ("key", "day", "model")) == ("key",)
    for bad in ("key", "week", "", "day,day", "day,"):
        with pytest.raises(GatewayError) as err:
            grouping(bad, ("day", "model"))
        assert err.value.status == 400 and err.value.param == "group_by"


# --- through the HTTP routes ---------------------------------------------------------

ADMIN = "adm-" + "x" * 20
KEY_A, KEY_B = "sk-gw-unit-a", "sk-gw-unit-b"


def _keys_toml(tmp_path) -> str:
    def key(name, secret, extra=""):
        return f'[[auth.keys]]\nname = "{name}"\nsha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n{extra}'

    return (
        key("team-a", KEY_A, "budget_usd_per_day = 1.0\n")
        + key("team-b", KEY_B)
        + f'[admin]\nsha256 = "{hashlib.sha256(ADMIN.encode()).hexdigest()}"\ndata_dir = "{tmp_path}"\n'
    )


@respx.mock
def test_served_requests_are_billed_once_failed_attempts_and_refusals_not(client_for, tmp_path):
    gw = make_gateway(_keys_toml(tmp_path))
    assert isinstance(gw.ledger, SqliteLedger) and gw.ledger.path == tmp_path / "spend.sqlite3"
    client = client_for(gw)
    respx.post(DEEPINFRA).mock(
        side_effect=[
            httpx.Response(503, json={"detail": "busy"}),
            *[httpx.Response(200, json=completion()) for _ in range(5)],
        ]
    )
    respx.post(OPENROUTER).mock(return_value=httpx.Response(200, json=completion()))
    a = {"authorization": f"Bearer {KEY_A}"}
    seen = []
    for _ in range(3):
        r = client.post("/v1/chat/completions", json=chat(), headers=a)
        assert r.status_code == 200
        seen.append(r.json()["usage"])
    assert client.post("/v1/chat/completions", json=chat(max_tokens=0), headers=a).status_code == 400
    assert client.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer no"}).status_code == 401
    admin = {"authorization": f"Bearer {ADMIN}"}

    def report():
        r = client.get("/v1/keys/team-a/spend?group_by=model", headers=admin)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total"]["requests"] == 3
        return body

    body = report()
    assert body["data"] == [{"model": V02, **body["total"]}]
    assert body["total"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in seen)
    assert abs(body["total"]["cost"] - sum(u["estimated_cost"] for u in seen)) < 3e-9
    assert body["group_by"] == "model" and body["to"] == today().isoformat()
    mine = client.get("/v1/key", headers=a).json()["data"]
    assert mine["name"] == "team-a" and mine["source"] == "config" and mine["budget_usd_per_day"] == 1.0
    assert mine["usage"]["today"] == mine["usage"]["month"] == body["total"]
    assert mine["remaining"] == {"day": pytest.approx(1.0 - body["total"]["cost"], abs=1e-12), "month": None}


def test_admin_spend_routes_check_the_admin_key_and_their_parameters(client_for, tmp_path):
    client = client_for(make_gateway(_keys_toml(tmp_path)))
    admin = {"authorization": f"Bearer {ADMIN}"}
    assert client.get("/v1/keys/team-a/spend").status_code == 401
    assert client.get("/v1/spend", headers={"authorization": f"Bearer {KEY_A}"}).status_code == 401
    r = client.get("/v1/keys/ghost/spend", headers=admin)
    assert r.status_code == 404 and r.json()["error"]["code"] == "key_not_found"
    for query, param in [
        ("from=yesterday", "from"),
        ("to=2025-13-01", "to"),
        ("group_by=hour", "group_by"),
        ("from=2025-02-01&to=2025-01-01", "from"),
        ("from=2020-01-01&to=2025-01-01", "from"),
    ]:
        r = client.get(f"/v1/spend?{query}", headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (query, r.text)
    r = client.get("/v1/spend?group_by=key,day", headers={**admin, "accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.text == "key,date,requests,prompt_tokens,completion_tokens,cost\n"


def test_admin_spend_routes_are_off_without_an_admin_key(client_for):
    gw = make_gateway()
    assert isinstance(gw.ledger, MemoryLedger)
    client = client_for(gw)
    assert client.get("/v1/spend").status_code == 404
    mine = client.get("/v1/key").json()["data"]  # open mode: the key is "open"
    assert mine["name"] == "open" and mine["remaining"] == {"day": None, "month": None}
    assert mine["usage"]["today"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}


def test_csv_never_hands_a_spreadsheet_a_formula():
    """Key names and model ids come from config files and admin requests; a
    cell that starts like a formula is written as text (OWASP CSV injection)."""
    day = dt.date(2026, 11, 30)
    rows = [
        SpendRow('=HYPERLINK("http://x")', day, "+cmd|' /C calc'!A0", 1, 2, 3, 10),
        SpendRow("team-a", day, "mistralai/mistral-7b-instruct-v0.2", 4, 5, 6, 20),
    ]
    table = list(csv.reader(io.StringIO(_csv(rows, ("key", "model")).decode())))
    assert table[0] == ["key", "model", "requests", "prompt_tokens", "completion_tokens", "cost"]
    cells = {tuple(r[:2]) for r in table[1:]}
    assert cells == {
        ('\'=HYPERLINK("http://x")', "'+cmd|' /C calc'!A0"),
        ("team-a", "mistralai/mistral-7b-instruct-v0.2"),
    }
