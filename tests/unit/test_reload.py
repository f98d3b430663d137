"""Config hot reload in one worker: ``gateway.server.reload.reload`` reads the
file again and ``Gateway.reload`` swaps a new view in whole, or keeps the
running one and says why; ``POST /admin/reload`` answers with the result."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway import config as config_mod
from gateway.errors import GatewayError
from gateway.limits.keys import GatewayKey, digest
from gateway.routing.health import Circuit
from gateway.server import reload as reload_mod
from gateway.state import Gateway
from tests.unit.conftest import KEYS

ADMIN_KEY = "admin-key-for-reload-tests"
TEAM_KEY = "sk-gw-team"
OTHER_KEY = "sk-gw-other"


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def toml(
    price: float = 0.5,
    alias: str = "first",
    key: str = TEAM_KEY,
    extra: str = "",
    admin: str = ADMIN_KEY,
    data_dir: str = ".",
) -> str:
    return (
        f'[admin]\nsha256 = "{sha(admin)}"\ndata_dir = "{data_dir}"\n'
        f'[[auth.keys]]\nname = "team"\nsha256 = "{sha(key)}"\n'
        "[local]\nenabled = false\n"
        '[providers.acme]\nbase_url = "http://127.0.0.1:9/v1"\n'
        f'[[models]]\nid = "acme/m"\naliases = ["{alias}"]\n'
        f'[[models.endpoints]]\nprovider = "acme"\ncontext_length = 1000\n'
        f"input_usd_per_mtok = {price}\noutput_usd_per_mtok = {price}\n" + extra
    )


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "gateway.toml"

    def write(**kw) -> None:
        path.write_text(toml(data_dir=str(tmp_path), **kw))

    write()
    gw = Gateway(config_mod.load(path), env=KEYS, config_path=str(path))
    return gw, write


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_config_reloads_total", {"result": result}) or 0.0


def test_reload_swaps_a_new_view_and_keeps_what_outlives_a_config(setup):
    gw, write = setup
    old = gw.view
    endpoint = old.catalog.find("acme/m").endpoints[0]
    for _ in range(gw.config.health.failure_threshold):
        gw.health.failure(endpoint.key, "timeout")
    assert gw.health.circuit(endpoint.key) is Circuit.OPEN
    ok_before = reloads("ok")

    write(price=2.0, alias="second")
    out = reload_mod.reload(gw)

    assert (out.result, out.errors, out.changed, out.restart_needed) == ("ok", [], True, [])
    assert reloads("ok") == ok_before + 1
    new = gw.view
    assert new is not old
    # A request that read the old view keeps the old catalog, price and alias.
    assert old.catalog.find("acme/m").endpoints[0].input_usd_per_mtok == 0.5
    assert old.router.resolve("first").id == "acme/m"
    assert new.catalog.find("acme/m").endpoints[0].input_usd_per_mtok == 2.0
    assert new.router.resolve("second").id == "acme/m" and new.catalog.find("first") is None
    # What outlives a config is the same object in both views.
    for part in ("keys", "limiter", "health", "client", "accountant", "responses"):
        assert getattr(new, part) is getattr(old, part), part
    # The endpoint still exists: its circuit is still open.
    assert gw.health.circuit(new.catalog.find("acme/m").endpoints[0].key) is Circuit.OPEN
    assert (gw.catalog, gw.router, gw.config) == (new.catalog, new.router, new.config)


def test_an_invalid_file_keeps_the_running_config_and_says_each_error(setup, caplog):
    gw, write = setup
    old = gw.view
    errors_before = reloads("error")
    write(
        extra='[[models]]\nid = "acme/other"\n[[models.endpoints]]\nprovider = "nowhere"\n[routing]\nmax_attempts = 0\n'
    )

    out = reload_mod.reload(gw)

    path = gw.config_path
    assert out.result == "error"
    assert out.errors == [f"{path}: routing.max_attempts: Expected `int` >= 1"]
    assert gw.view is old and reloads("error") == errors_before + 1
    assert f"config reload: {path}: routing.max_attempts: Expected `int` >= 1" in caplog.text
    # A reference error (found once the file parses) is reported the same way.
    write(extra='[[models]]\nid = "acme/other"\n[[models.endpoints]]\nprovider = "nowhere"\n')
    out = reload_mod.reload(gw)
    assert out.result == "error" and len(out.errors) == 1
    assert out.errors[0].startswith(f"{path}: models[1].endpoints[0].provider: unknown provider 'nowhere'")
    assert gw.view is old
    Path(path).write_text("[server\n")
    out = reload_mod.reload(gw)
    assert out.errors == [f"{path}: line 1, column 8: invalid TOML: Expected ']' at the end of a table declaration"]
    assert gw.view is old and reloads("error") == errors_before + 3


def test_an_unchanged_file_is_not_reloaded(setup):
    gw, _ = setup
    old, ok_before = gw.view, reloads("ok")
    out = reload_mod.reload(gw)
    assert (out.result, out.changed) == ("ok", False)
    assert gw.view is old and reloads("ok") == ok_before


def test_file_keys_are_replaced_and_managed_keys_kept(setup):
    gw, write = setup
    managed = GatewayKey("made-at-runtime", source="admin")
    gw.keys.set_managed({digest("sk-gw-managed"): managed})
    assert gw.keys.authenticate(f"Bearer {TEAM_KEY}").name == "team"

    write(key=OTHER_KEY)
    assert reload_mod.reload(gw).result == "ok"

    assert gw.keys.authenticate(f"Bearer {OTHER_KEY}").name == "team"
    with pytest.raises(GatewayError) as err:
        gw.keys.authenticate(f"Bearer {TEAM_KEY}")
    assert err.value.status == 401
    assert gw.keys.authenticate("Bearer sk-gw-managed") is managed


def test_the_admin_key_rotates(setup):
    gw, write = setup
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    gw.admin.require("POST", headers, {})
    write(admin="a-new-admin-key")
    assert reload_mod.reload(gw).result == "ok"
    with pytest.raises(GatewayError) as err:
        gw.admin.require("POST", headers, {})
    assert err.value.status == 401
    gw.admin.require("POST", {"authorization": "Bearer a-new-admin-key"}, {})


def test_sections_built_at_start_up_wait_for_a_restart(setup, caplog):
    gw, write = setup
    write(extra="[server]\nport = 9999\n[health]\nfailure_threshold = 9\n[routing]\nmax_attempts = 5\n")
    out = reload_mod.reload(gw)
    assert out.result == "ok" and out.restart_needed == ["server", "health"]
    assert gw.view.config.server.port == 8000 and gw.view.config.health.failure_threshold == 3
    assert gw.view.config.routing.max_attempts == 5 and gw.router.max_attempts == 5
    assert "changes to server, health take effect at the next restart" in caplog.text


def test_the_safety_policy_is_swapped(setup):
    gw, write = setup
    old = gw.view
    assert old.moderation.policy.mode == "annotate"
    write(extra='[safety]\nmode = "block"\n')
    assert reload_mod.reload(gw).result == "ok"
    assert gw.view.moderation.policy.mode == "block"
    assert old.moderation.policy.mode == "annotate"  # a request in flight keeps its policy


def test_post_admin_reload(setup, client_for):
    gw, write = setup
    client = client_for(gw)
    assert client.post("/admin/reload").status_code == 401
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    write(price=3.0)
    r = client.post("/admin/reload", headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["result"] == "ok" and body["errors"] == [] and body["changed"] is True
    assert gw.view.catalog.find("acme/m").endpoints[0].input_usd_per_mtok == 3.0
    write(extra="[routing]\nmax_attempts = 0\n")
    r = client.post("/admin/reload", headers=auth)
    assert r.status_code == 400
    assert r.json() == {
        "result": "error",
        "errors": [f"{gw.config_path}: routing.max_attempts: Expected `int` >= 1"],
        "changed": False,
        "restart_needed": [],
        "models": 0,
        "providers": 0,
    }
    assert gw.view.catalog.find("acme/m").endpoints[0].input_usd_per_mtok == 3.0


def test_post_admin_reload_is_off_without_an_admin_key(client_for, tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text("[local]\nenabled = false\n")
    gw = Gateway(config_mod.load(path), env=KEYS, config_path=str(path))
    r = client_for(gw).post("/admin/reload", headers={"authorization": "Bearer anything"})
    assert r.status_code == 404
