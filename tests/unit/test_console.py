"""The console's server side: page and static files, the sign-in session, and
the admin views it polls (recent requests, endpoint health, live counters).
The page itself is tested in a real browser: tests/e2e/test_console_e2e.py."""

from __future__ import annotations

import hashlib
import re
import secrets
from html.parser import HTMLParser

import httpx
import pytest
import respx
from litestar.testing import TestClient

from gateway.accounting.generations import Generation, MemoryGenerations, RedisGenerations
from gateway.control.admin_auth import COOKIE
from gateway.server.routes import create_app
from gateway.storage.autopipeline import AutoPipeline
from gateway.storage.connect import redis_client
from tests.unit.conftest import DEEPINFRA, OPENROUTER, V02, chat, completion, make_gateway

ADMIN_KEY = "adm-" + "k" * 40
KEY = "sk-gw-console-unit"
KEYED = f'[[auth.keys]]\nname = "team-a"\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\n'


def admin_toml(tmp_path) -> str:
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    return KEYED + f'[admin]\nsha256 = "{digest}"\ndata_dir = "{tmp_path}"\n'


@pytest.fixture
def console(client_for, tmp_path):
    gw = make_gateway(admin_toml(tmp_path))
    return gw, client_for(gw)


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def record(i: int, key: str = "team-a") -> Generation:
    return Generation(id=f"gen-{i}", key=key, created_at=1000.0 + i, model=V02, provider="deepinfra",
                      requested_model=V02, streamed=False, status=200)


# --- recent generation records --------------------------------------------------


async def test_memory_recent_newest_first_within_capacity():
    store = MemoryGenerations(capacity=3)
    assert await store.recent(10) == []
    for i in range(5):
        store.put_soon(record(i, key=f"k{i}"))
    assert [g.id for g in await store.recent(10)] == ["gen-4", "gen-3", "gen-2"]
    assert [g.id for g in await store.recent(2)] == ["gen-4", "gen-3"]
    assert [g.key for g in await store.recent(1)] == ["k4"]  # every key's records: an admin view


async def test_redis_recent_is_a_capped_list_beside_the_records(redis_server):
    client = redis_client(redis_server.url, timeout_s=2.0)
    prefix = f"t{secrets.token_hex(4)}:"
    batcher = AutoPipeline(client, 2.0)
    store = RedisGenerations(prefix, 3600, batcher, capacity=3)
    other = RedisGenerations(f"t{secrets.token_hex(4)}:", 3600, batcher, capacity=3)
    try:
        assert await store.recent(5) == []
        futures = [store.put_soon(record(i)) for i in range(5)]
        other.put_soon(record(99))
        for f in futures:
            await f  # deferred: no round trip of their own, but sent within defer_s
        assert [g.id for g in await store.recent(10)] == ["gen-4", "gen-3", "gen-2"]
        assert [g.id for g in await store.recent(2)] == ["gen-4", "gen-3"]
        length = await batcher.submit(lambda pipe: pipe.eval("return redis.call('LLEN', KEYS[1])", 1,
                                                                  f"{prefix}gen:recent"))
        assert length == 3  # LTRIM keeps the list at [generations] capacity
        # A listed record that expired is skipped, not an error.
        await batcher.submit(lambda pipe: pipe.eval("return redis.call('DEL', KEYS[1])", 1, f"{prefix}gen:gen-3"))
        assert [g.id for g in await store.recent(10)] == ["gen-4", "gen-2"]
        assert (await store.get("gen-4")).status == 200
        assert [g.id for g in await other.recent(10)] == ["gen-99"]
    finally:
        await client.aclose()


# --- the page and its files -------------------------------------------------------


class _Scripts(HTMLParser):
    """Every <script> and every on* attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []
        self.links: list[str] = []
        self._in_script = False
        self.inline = ""

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.handlers += [name for name in attributes if name.startswith("on")]
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = True
        for name in ("src", "href"):
            if attributes.get(name):
                self.links.append(attributes[name])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.inline += data.strip()


def test_page_has_a_strict_policy_and_no_inline_script(console):
    _, client = console
    r = client.get("/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    page = _Scripts()
    page.feed(r.text)
    assert page.scripts and all(s.get("src") for s in page.scripts)
    assert page.inline == "" and page.handlers == []
    # Everything the page loads comes from this gateway: no CDN.
    assert page.links and all(link.startswith("/console/static/") for link in page.links)
    for link in page.links:
        assert client.get(link).status_code == 200, link


@pytest.mark.parametrize(("name", "content_type"), [
    ("console.js", "text/javascript; charset=utf-8"),
    ("console.css", "text/css; charset=utf-8"),
    ("icon.svg", "image/svg+xml"),
])
def test_static_files_types_and_caching(console, name, content_type):
    _, client = console
    pinned = re.search(rf'/console/static/{re.escape(name)}\?v=([0-9a-f]+)', client.get("/console").text)
    assert pinned, name
    r = client.get(f"/console/static/{name}?v={pinned.group(1)}")
    assert r.status_code == 200 and r.headers["content-type"] == content_type
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert pinned.group(1) == hashlib.sha256(r.content).hexdigest()[:16]  # a new file gets a new URL
    assert r.headers["x-content-type-options"] == "nosniff"
    stale = client.get(f"/console/static/{name}?v=0000")
    assert stale.status_code == 200 and stale.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("path", ["/console/static/index.html", "/console/static/..%2Froutes.py",
                                  "/console/static/nope.js", "/console/static/"])
def test_only_the_listed_files_are_served(console, path):
    _, client = console
    r = client.get(path)
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_everything_is_404_while_the_admin_api_is_off(client_for):
    client = client_for(make_gateway(KEYED))
    for method, path in [("GET", "/console"), ("GET", "/console/static/console.js"), ("GET", "/console/session"),
                         ("POST", "/console/session"), ("DELETE", "/console/session"), ("GET", "/admin/stats"),
                         ("GET", "/admin/requests"), ("GET", "/admin/endpoints")]:
        kwargs = {"json": {"admin_key": ADMIN_KEY}} if method == "POST" else {}
        r = client.request(method, path, **kwargs)
        assert r.status_code == 404, (method, path)
        assert "set-cookie" not in r.headers


# --- signing in -------------------------------------------------------------------


def _cookie_attributes(set_cookie: str) -> dict[str, str]:
    parts = [p.strip() for p in set_cookie.split(";")]
    out = {}
    for p in parts[1:]:
        name, _, value = p.partition("=")
        out[name.lower()] = value
    return out


def test_sign_in_sets_an_httponly_strict_cookie_and_answers_the_csrf_token(console):
    gw, client = console
    assert client.get("/console/session").json() == {"signed_in": False}
    r = client.post("/console/session", json={"admin_key": ADMIN_KEY})
    assert r.status_code == 200
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith(f"{COOKIE}=")
    attributes = _cookie_attributes(set_cookie)
    assert "httponly" in attributes and attributes["samesite"].lower() == "strict" and attributes["path"] == "/"
    assert int(attributes["max-age"]) > 3600
    assert "secure" not in attributes  # plain http (the test client): a Secure cookie would never come back
    assert ADMIN_KEY not in set_cookie and ADMIN_KEY not in r.text
    cookie = client.cookies[COOKIE]
    token = r.json()["csrf_token"]
    assert set(r.json()) == {"csrf_token"}
    # The cookie signs in the admin views; writes need the token beside it.
    assert client.get("/admin/stats").status_code == 200
    gw.admin.require("POST", {"x-csrf-token": token}, {COOKIE: cookie})
    with pytest.raises(Exception, match="x-csrf-token"):
        gw.admin.require("POST", {}, {COOKIE: cookie})
    # A reloaded page reads the same token again.
    assert client.get("/console/session").json() == {"signed_in": True, "csrf_token": token}
    # Signing out clears the cookie.
    out = client.delete("/console/session")
    assert out.status_code == 200 and out.json() == {"signed_in": False}
    assert _cookie_attributes(out.headers["set-cookie"])["max-age"] == "0"
    assert COOKIE not in client.cookies
    assert client.get("/console/session").json() == {"signed_in": False}
    assert client.get("/admin/stats").status_code == 401


def test_cookie_is_secure_over_https(tmp_path):
    gw = make_gateway(admin_toml(tmp_path))
    with TestClient(create_app(gw), base_url="https://gateway.example") as client:
        r = client.post("/console/session", json={"admin_key": ADMIN_KEY})
        assert r.status_code == 200 and "secure" in _cookie_attributes(r.headers["set-cookie"])


@pytest.mark.parametrize(("body", "status", "param"), [
    (b'{"admin_key": "wrong"}', 401, "admin_key"),
    (b'{"admin_key": 5}', 400, "admin_key"),
    (b"{}", 400, None),
    (b'{"admin_key": "x", "other": 1}', 400, None),
    (b"{not json", 400, None),
    (b"", 400, None),
    (b'{"admin_key": "' + b"a" * 10_000 + b'"}', 413, None),
])
def test_bad_sign_ins_are_4xx_without_a_cookie(console, body, status, param):
    _, client = console
    r = client.post("/console/session", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert param is None or error["param"] == param
    assert "set-cookie" not in r.headers and ADMIN_KEY not in r.text


def test_a_forged_or_expired_cookie_is_not_signed_in(console):
    gw, client = console
    client.cookies.set(COOKIE, "v1.9999999999.abc.def")
    assert client.get("/console/session").json() == {"signed_in": False}
    client.cookies.set(COOKIE, gw.admin.new_session(now=0))  # expired long ago
    assert client.get("/console/session").json() == {"signed_in": False}
    assert client.get("/admin/requests").status_code == 401


# --- the admin views ------------------------------------------------------------


@respx.mock
def test_recent_requests_newest_first_for_the_admin_only(console):
    _, client = console
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion("one")))
    auth = {"authorization": f"Bearer {KEY}"}
    ids = []
    for _ in range(3):
        r = client.post("/v1/chat/completions", json=chat(provider={"only": ["deepinfra"]}), headers=auth)
        assert r.status_code == 200
        ids.append(r.headers["x-request-id"])
    r = client.get("/admin/requests?limit=2", headers=ADMIN)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    data = r.json()["data"]
    assert [g["id"] for g in data] == ids[::-1][:2]
    assert data[0]["key"] == "team-a" and data[0]["provider"] == "deepinfra" and data[0]["status"] == 200
    assert data[0]["tokens_prompt"] == 15 and data[0]["total_cost"] > 0
    assert [g["id"] for g in client.get("/admin/requests", headers=ADMIN).json()["data"]][:3] == ids[::-1]
    assert client.get("/admin/requests", headers=auth).status_code == 401  # a gateway key is not the admin key
    assert client.get("/admin/requests").status_code == 401
    for bad in ["0", "-1", "501", "x", "1.5"]:
        r = client.get(f"/admin/requests?limit={bad}", headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit", bad


@respx.mock
def test_endpoint_health_covers_the_catalog_and_shows_failures(console):
    gw, client = console
    respx.post(DEEPINFRA).mock(return_value=httpx.Response(500))
    respx.post(OPENROUTER).mock(return_value=httpx.Response(200, json=completion("ok")))
    r = client.post("/v1/chat/completions", json=chat(provider={"order": ["deepinfra", "openrouter"]}),
                    headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    data = client.get("/admin/endpoints", headers=ADMIN).json()["data"]
    expected = {(m.id, e.key) for m in gw.catalog.models for e in m.endpoints}
    assert {(d["model"], d["endpoint"]) for d in data} == expected
    by_endpoint = {d["endpoint"]: d for d in data if d["model"] == V02}
    failed = next(d for d in by_endpoint.values() if d["provider"] == "deepinfra")
    served = next(d for d in by_endpoint.values() if d["provider"] == "openrouter")
    assert failed["failures"] == 1 and failed["last_error"] == "status" and failed["latency_ms"] is None
    assert served["requests"] == 1 and served["failures"] == 0 and served["latency_ms"] is not None
    assert served["circuit"] == "closed"
    assert client.get("/admin/endpoints").status_code == 401


@respx.mock
def test_stats_count_requests_and_errors(console):
    _, client = console
    route = respx.post(DEEPINFRA).mock(return_value=httpx.Response(200, json=completion()))
    before = client.get("/admin/stats", headers=ADMIN).json()
    auth = {"authorization": f"Bearer {KEY}"}
    body = chat(provider={"only": ["deepinfra"]})
    assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    route.mock(return_value=httpx.Response(503))
    assert client.post("/v1/chat/completions", json=body, headers=auth).status_code >= 500
    assert client.post("/v1/chat/completions", json={"model": V02}, headers=auth).status_code == 400
    after = client.get("/admin/stats", headers=ADMIN).json()
    assert set(after) == {"at", "requests", "server_errors", "client_errors", "upstream_errors", "in_flight"}
    assert after["requests"] - before["requests"] == 4
    assert after["server_errors"] - before["server_errors"] == 1
    assert after["client_errors"] - before["client_errors"] == 1
    assert after["upstream_errors"] - before["upstream_errors"] == 1
    assert after["in_flight"] == 0 and after["at"] >= before["at"]
    assert client.get("/admin/stats").status_code == 401
