"""The admin key API against real ``gateway serve`` processes: keys made,
changed and revoked at runtime take effect on every replica and worker
within 1 s, survive restarts (Redis, or SQLite without it), and are limited
like the config file's keys. Model calls go through the openai SDK."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from tests.e2e.conftest import ENV_NAMES, GATEWAY_KEY, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess
from tests.eventually import eventually

V02 = "mistralai/mistral-7b-instruct-v0.2"
ASK = [{"role": "user", "content": "Say hi"}]
ADMIN_KEY = "adm-e2e-" + secrets.token_urlsafe(16)
#: The issue's promise: a change made on one replica holds on every other within this.
PROPAGATION_S = 1.0


def admin_section(data_dir: object, redis_url: str | None = None, prefix: str | None = None) -> str:
    lines = ["[admin]", f'sha256 = "{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}"', f'data_dir = "{data_dir}"']
    if redis_url:
        lines += ["[redis]", f'url = "{redis_url}"', f'prefix = "{prefix or f"t{secrets.token_hex(4)}:"}"']
    return "\n".join(lines) + "\n"


def admin(gw: GatewayProcess, key: str = ADMIN_KEY) -> httpx.Client:
    return httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=30)


def chat(gw: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)


def call(client: openai.OpenAI) -> int | str:
    """200, or the refusal's error code (401s and 429s are what is under test)."""
    try:
        client.chat.completions.create(model=V02, messages=ASK)
    except openai.APIStatusError as exc:
        return exc.response.json()["error"]["code"]
    return 200


def within_propagation(since: float, check: Callable[[], object]) -> object:
    """``check`` passes on a request sent at most ``PROPAGATION_S`` after ``since``
    (the moment the admin call answered)."""
    left = PROPAGATION_S - (time.monotonic() - since)
    return eventually(check, timeout=max(left, 0.0), interval=0.02)


def create(client: httpx.Client, **fields: object) -> tuple[str, dict]:
    response = client.post("/v1/keys", json=fields)
    assert response.status_code == 201, response.text
    body = response.json()
    return body["key"], body["data"]


def assert_openai_error(
    response: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= error.keys() and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert "Traceback" not in response.text and ADMIN_KEY not in response.text
    return error


def test_two_replicas_on_one_redis_see_create_disable_and_delete_within_1s(start_gateway, redis_server, tmp_path):
    section = admin_section(tmp_path, redis_server.url, f"t{secrets.token_hex(4)}:")
    replica_a, replica_b = start_gateway(section), start_gateway(section)
    with admin(replica_a) as on_a:
        key, data = create(on_a, name="team-x", rpm=1000)
        created = time.monotonic()
        on_b = chat(replica_b, key)
        within_propagation(created, lambda: call(on_b) == 200)
        assert data["label"] == key[:8] + "…" + key[-4:] and data["source"] == "admin"
        with admin(replica_b) as on_b_admin:  # read from Redis: the same key object on the other replica
            assert on_b_admin.get("/v1/keys/team-x").json()["data"] == data

        assert on_a.patch("/v1/keys/team-x", json={"disabled": True}).status_code == 200
        disabled = time.monotonic()
        within_propagation(disabled, lambda: call(on_b) == "key_disabled")

        assert on_a.patch("/v1/keys/team-x", json={"disabled": False}).status_code == 200
        enabled = time.monotonic()
        within_propagation(enabled, lambda: call(on_b) == 200)

        deleted_answer = on_a.delete("/v1/keys/team-x")
        assert deleted_answer.json() == {"data": {"name": "team-x", "deleted": True}}
        deleted = time.monotonic()
        within_propagation(deleted, lambda: call(on_b) == "invalid_api_key")
    with admin(replica_b) as listing:
        assert [k["name"] for k in listing.get("/v1/keys").json()["data"]] == ["e2e"]


def test_a_refused_key_says_why(start_gateway, tmp_path):
    gw = start_gateway(admin_section(tmp_path))
    with admin(gw) as ops:
        key, _ = create(ops, name="disabled-one", disabled=True)
        with pytest.raises(openai.AuthenticationError) as refused:
            chat(gw, key).chat.completions.create(model=V02, messages=ASK)
        assert refused.value.response.json()["error"]["code"] == "key_disabled"
        assert "disabled-one" in refused.value.response.json()["error"]["message"]


@pytest.mark.parametrize("store", ["redis", "sqlite"])
def test_keys_survive_a_restart(start_gateway, redis_server, tmp_path, store):
    section = admin_section(tmp_path, redis_server.url if store == "redis" else None)
    gw = start_gateway(section)
    with admin(gw) as ops:
        key, _ = create(ops, name="durable", budget_usd_per_day=5.0)
    assert call(chat(gw, key)) == 200
    gw.stop()
    if store == "sqlite":
        assert (tmp_path / "keys.sqlite3").exists()
    gw.start()
    assert call(chat(gw, key)) == 200
    with admin(gw) as ops:
        listed = ops.get("/v1/keys/durable").json()["data"]
    assert listed["budget_usd_per_day"] == 5.0 and listed["source"] == "admin"


def test_an_expired_key_is_refused_and_says_so(start_gateway, tmp_path):
    gw = start_gateway(admin_section(tmp_path))
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    with admin(gw) as ops:
        expired, data = create(ops, name="old", expires_at=past)
        assert data["expires_at"].endswith("Z")
        assert call(chat(gw, expired)) == "key_expired"
        live, _ = create(ops, name="later", expires_at=future)
        assert call(chat(gw, live)) == 200
        assert ops.patch("/v1/keys/later", json={"expires_at": past}).status_code == 200
        assert call(chat(gw, live)) == "key_expired"  # this process's own write: at once
        cleared = ops.patch("/v1/keys/later", json={"expires_at": None}).json()["data"]
        assert cleared["expires_at"] is None
        assert call(chat(gw, live)) == 200


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_managed_keys_rpm_is_enforced_and_a_change_applies_within_1s(start_gateway, redis_server, tmp_path, store):
    section = admin_section(tmp_path, redis_server.url if store == "redis" else None)
    replica_a, replica_b = start_gateway(section), (start_gateway(section) if store == "redis" else None)
    with admin(replica_a) as ops:
        key, _ = create(ops, name="slow", rpm=2)
        client = chat(replica_a, key)
        assert [call(client) for _ in range(3)] == [200, 200, "rate_limit_exceeded"]
        assert ops.patch("/v1/keys/slow", json={"rpm": 3}).json()["data"]["rpm"] == 3
        changed = time.monotonic()
        # The raised limit holds on the replica that was told and, through Redis, on the other.
        other = chat(replica_b, key) if replica_b is not None else client
        within_propagation(changed, lambda: call(other) == 200)
        assert call(client) == "rate_limit_exceeded"  # 3 in the window now: the new limit, exactly
        cleared = ops.patch("/v1/keys/slow", json={"rpm": None}).json()["data"]
        assert cleared["rpm"] is None
        assert call(client) == 200  # no limit at all


def test_admin_api_bad_input_is_an_openai_error(start_gateway, tmp_path):
    gw = start_gateway(admin_section(tmp_path) + "[server]\nmax_body_bytes = 4096\n")
    with admin(gw) as ops:
        assert_openai_error(ops.post("/v1/keys", content=b'{"name": '), 400, "invalid_json")
        assert_openai_error(ops.post("/v1/keys", content=b""), 400)
        assert_openai_error(ops.post("/v1/keys", json=["name"]), 400)
        assert_openai_error(ops.post("/v1/keys", json={"name": "x", "rpm": "many"}), 400, param="rpm")
        assert_openai_error(ops.post("/v1/keys", json={"name": "x", "models": "gpt-4o"}), 400, param="models")
        assert_openai_error(ops.post("/v1/keys", json={"name": "has space"}), 400, param="name")
        assert_openai_error(ops.post("/v1/keys", json={"name": "x" * 65}), 400, param="name")
        assert_openai_error(ops.post("/v1/keys", json={"name": "x", "owner": "me"}), 400, param="owner")
        naive = ops.post("/v1/keys", json={"name": "x", "expires_at": "2031-01-01T00:00:00"})
        assert "timezone" in assert_openai_error(naive, 400, param="expires_at")["message"]
        assert_openai_error(ops.post("/v1/keys", json={"name": "x", "expires_at": "soon"}), 400, param="expires_at")
        assert_openai_error(ops.post("/v1/keys", content=b'{"name": "' + b"x" * 8000 + b'"}'), 413)
        assert ops.get("/v1/keys").json()["data"][1:] == []  # nothing was made by any of these

        create(ops, name="taken")
        assert_openai_error(ops.post("/v1/keys", json={"name": "taken"}), 409, "key_exists")
        assert_openai_error(ops.post("/v1/keys", json={"name": "e2e"}), 409, "key_exists")  # the config file's
        assert_openai_error(ops.patch("/v1/keys/taken", json={"name": "renamed"}), 400, param="name")
        assert_openai_error(ops.patch("/v1/keys/taken", json={"disabled": None}), 400, param="disabled")
        assert_openai_error(ops.patch("/v1/keys/taken", content=b"{nope"), 400, "invalid_json")
        for method in ("GET", "PATCH", "DELETE"):
            assert_openai_error(ops.request(method, "/v1/keys/nobody", json={}), 404, "key_not_found")
        assert_openai_error(ops.patch("/v1/keys/e2e", json={"rpm": 1}), 403, "read_only_key")
        assert_openai_error(ops.delete("/v1/keys/e2e"), 403, "read_only_key")
        config_key = ops.get("/v1/keys/e2e").json()["data"]
        assert config_key["read_only"] is True and config_key["source"] == "config" and config_key["label"] is None

    for credentials in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {GATEWAY_KEY}"}):
        with httpx.Client(base_url=gw.url, headers=credentials, timeout=30) as stranger:
            assert_openai_error(stranger.get("/v1/keys"), 401)
            assert_openai_error(stranger.post("/v1/keys", json={"name": "sneaky"}), 401)
            assert_openai_error(stranger.delete("/v1/keys/taken"), 401)
    with admin(gw) as ops:
        assert [k["name"] for k in ops.get("/v1/keys").json()["data"]] == ["e2e", "taken"]


def test_admin_routes_are_off_without_an_admin_key(start_gateway):
    gw = start_gateway()
    with admin(gw) as ops:
        for method, path in (
            ("GET", "/v1/keys"),
            ("POST", "/v1/keys"),
            ("GET", "/v1/keys/e2e"),
            ("PATCH", "/v1/keys/e2e"),
            ("DELETE", "/v1/keys/e2e"),
        ):
            assert_openai_error(ops.request(method, path, json={"name": "x"}), 404)


@pytest.fixture
def two_workers(fakes, tmp_path):
    """``gateway serve --workers 2`` without Redis; two workers start slowly on a busy machine."""
    env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
    gw = GatewayProcess(gateway_config(fakes, admin_section(tmp_path)), env=env, args=["--workers", "2"])
    with gw.start(ready_timeout_s=90):
        yield gw


def test_a_key_made_through_one_worker_is_accepted_by_the_other(two_workers):
    """Two workers, no Redis: they share the SQLite file, and each polls it."""
    gw = two_workers
    with admin(gw) as ops:
        key, _ = create(ops, name="both-workers")
    created = time.monotonic()

    def every_connection_accepts() -> bool:
        # Fresh connections, so the kernel spreads them over both workers.
        results = [call(chat(gw, key)) for _ in range(8)]
        return all(r == 200 for r in results)

    within_propagation(created, every_connection_accepts)
    with admin(gw) as ops:
        assert ops.delete("/v1/keys/both-workers").status_code == 200
    deleted = time.monotonic()
    within_propagation(deleted, lambda: all(call(chat(gw, key)) == "invalid_api_key" for _ in range(8)))
