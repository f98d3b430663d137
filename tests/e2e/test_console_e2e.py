"""The web console in a real headless Chromium (Debian's ``chromium``, driven by
Playwright), against a real ``gateway serve`` with an admin key and fake
providers: sign in, create a key through the form, use it with the openai SDK,
see its spend and its request on the page, revoke it, and see it refused.

No browser is downloaded: ``make system-deps`` installs Debian's chromium, and
without it this test fails (it does not skip)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import sync_playwright

from tests.eventually import eventually
from tests.fakes.servers import REPO_ROOT

ADMIN_KEY = "adm-console-e2e-" + "x" * 24
V02 = "mistralai/mistral-7b-instruct-v0.2"
DEEPINFRA_ONLY = {"provider": {"only": ["deepinfra"]}}
ARTIFACTS = Path(REPO_ROOT) / "tests" / "artifacts"
WAIT_MS = 15_000


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), "Debian's chromium is missing: run `make system-deps` (apt-get install chromium)"
    return path


def admin_toml(data_dir: Path) -> str:
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    return f'[admin]\nsha256 = "{digest}"\ndata_dir = "{data_dir}"\n'


def usd(text: str) -> float:
    """A cost cell of the page (``$0.00000217``) as a number."""
    assert text.startswith("$"), text
    return float(text[1:])


def sdk(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)


def ask(client: openai.OpenAI):
    return client.chat.completions.with_raw_response.create(
        model=V02, messages=[{"role": "user", "content": "Hi console"}], extra_body=DEEPINFRA_ONLY
    )


def accepted(client: openai.OpenAI):
    """The answer, or False while the key is not live yet (eventually() retries)."""
    try:
        return ask(client)
    except openai.AuthenticationError:
        return False


@pytest.fixture
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True)
        yield browser
        browser.close()


def test_console_end_to_end(start_gateway, tmp_path, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    gw = start_gateway(admin_toml(tmp_path / "data"))
    context = browser.new_context(base_url=gw.url, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    # Sign in through the form.
    page.goto("/console")
    page.wait_for_selector("#sign-in-form", state="visible", timeout=WAIT_MS)
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#app", state="visible", timeout=WAIT_MS)
    page.wait_for_selector("#keys-table tr[data-key='e2e']", timeout=WAIT_MS)  # the config file's key, read-only

    cookies = {c["name"]: c for c in context.cookies()}
    assert cookies["gw_console"]["httpOnly"] is True and cookies["gw_console"]["sameSite"] == "Strict"
    assert ADMIN_KEY not in cookies["gw_console"]["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: out of the page's reach
    storage = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert ADMIN_KEY not in storage and json.loads(storage) == [[], []]
    assert page.input_value("#admin-key") == ""

    # Create a key through the form; the page shows it once.
    form = page.locator("#key-form")
    form.locator("input[name=name]").fill("team-console")
    form.locator("input[name=rpm]").fill("120")
    form.locator("input[name=budget_usd_per_day]").fill("5")
    page.click("#key-submit")
    page.wait_for_selector("#new-key", state="visible", timeout=WAIT_MS)
    key = page.input_value("#new-key-value")
    assert re.fullmatch(r"sk-gw-[A-Za-z0-9_-]{43}", key), key
    row = page.locator("#keys-table tr[data-key='team-console']")
    row.wait_for(timeout=WAIT_MS)
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == "team-console" and cells[2] == "admin" and cells[3] == "120" and cells[6] == "$5.00"
    assert key[:8] in cells[1] and key not in cells[1]

    # Use it with the openai SDK.
    client = sdk(gw, key)
    raw = eventually(lambda: accepted(client))  # a new key is live within 1 s
    answer = raw.parse()
    request_id = raw.headers["x-request-id"]
    cost = answer.usage.model_extra["estimated_cost"]
    assert answer.model_extra["provider"] == "deepinfra" and cost > 0

    # The request, its spend and the endpoint's health appear (the page polls).
    request_row = page.locator(f"#requests-table tr[data-id='{request_id}']")
    request_row.wait_for(timeout=WAIT_MS)
    cells = request_row.locator("td").all_inner_texts()
    assert cells[2] == "team-console" and cells[4] == V02 and cells[5] == "deepinfra" and cells[6] == "200"
    assert usd(cells[8]) == pytest.approx(cost, rel=1e-2)
    bar = page.locator(f"#spend-chart rect[data-model='{V02}']")
    bar.first.wait_for(timeout=WAIT_MS)
    assert float(bar.first.get_attribute("height")) > 1
    spend_row = page.locator("#spend-table tbody tr", has_text=V02)
    spend_row.first.wait_for(timeout=WAIT_MS)
    spent = spend_row.first.locator("td").all_inner_texts()
    assert spent[2] == "1" and usd(spent[5]) == pytest.approx(cost, rel=1e-2)
    assert usd(page.locator("#spend-table tfoot td").nth(5).inner_text()) == pytest.approx(cost, rel=1e-2)
    assert page.locator("#spend-legend [data-model]").all_inner_texts() == [V02]
    endpoint = page.locator(f"#endpoints-table tr[data-endpoint^='deepinfra:'][data-model='{V02}']")
    assert endpoint.locator("td").nth(3).inner_text() == "closed"
    eventually(lambda: endpoint.locator("td").nth(4).inner_text() == "1")
    eventually(lambda: re.fullmatch(r"\d+\.\d+", page.inner_text("#live-rps")))
    page.click("#dismiss-key")
    assert page.input_value("#new-key-value") == "" and key not in page.content()
    page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)

    # A write with the session cookie but without the CSRF token (what another
    # site's form or script could send) is refused.
    forged = context.request.post(f"{gw.url}/v1/keys", data={"name": "forged"},
                                  headers={"origin": "https://evil.example"})
    assert forged.status == 403 and forged.json()["error"]["code"] == "csrf_failed"
    forged = context.request.delete(f"{gw.url}/v1/keys/team-console")
    assert forged.status == 403
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    names = [k["name"] for k in httpx.get(f"{gw.url}/v1/keys", headers=admin).json()["data"]]
    assert "forged" not in names and "team-console" in names

    # Edit it through the page: a new rpm, and the daily budget cleared.
    row.locator("button[data-action=edit]").click()
    assert form.locator("input[name=name]").is_disabled() and form.locator("input[name=rpm]").input_value() == "120"
    form.locator("input[name=rpm]").fill("60")
    form.locator("input[name=budget_usd_per_day]").fill("")
    page.click("#key-submit")
    eventually(lambda: row.locator("td").all_inner_texts()[3] == "60")
    assert row.locator("td").all_inner_texts()[6] == "\u2013"  # no limit
    got = httpx.get(f"{gw.url}/v1/keys/team-console", headers=admin).json()["data"]
    assert got["rpm"] == 60 and got["budget_usd_per_day"] is None

    # Revoke it through the page: the next request is refused.
    revoke = row.locator("button[data-action=revoke]")
    revoke.click()
    assert revoke.inner_text() == "Confirm revoke"
    revoke.click()
    row.wait_for(state="detached", timeout=WAIT_MS)

    def refused() -> bool:
        try:
            ask(client)
        except openai.AuthenticationError as exc:
            return exc.status_code == 401
        return False

    assert eventually(refused)
    assert problems == []
    context.close()
