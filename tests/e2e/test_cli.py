"""``gateway check-config``, ``gateway models`` and ``gateway serve``'s safety checks."""

from __future__ import annotations

import subprocess
import sys

from tests.fakes.servers import REPO_ROOT, free_port


def gateway(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_check_config_prints_every_error_with_its_key_path(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[server]\nport = "eighty"\n'
        '[routing]\nmax_atempts = 3\n'
        '[[auth.keys]]\nname = "x"\n'
        '[[models]]\nid = "acme/m"\n[[models.endpoints]]\nprovider = "nowhere"\ncontext_length = 100\n'
        '[providers.novita]\ntimeout_s = -1\n'
    )
    r = gateway("check-config", str(cfg))
    assert r.returncode == 1
    out = r.stdout
    assert "server.port: Expected `int`, got `str`" in out
    assert "routing: Object contains unknown field `max_atempts`" in out
    assert "auth.keys[0]: set exactly one of `sha256` or `key_env`" in out
    assert "providers.novita.timeout_s: Expected `float` > 0.0" in out


def test_check_config_resolves_references(tmp_path):
    cfg = tmp_path / "ref.toml"
    cfg.write_text('[[models]]\nid = "acme/m"\n[[models.endpoints]]\nprovider = "nowhere"\ncontext_length = 100\n')
    r = gateway("check-config", str(cfg))
    assert r.returncode == 1 and "unknown provider 'nowhere'" in r.stdout
    good = tmp_path / "good.toml"
    good.write_text('[providers.acme]\nbase_url = "http://127.0.0.1:1/v1"\n'
                    '[[models]]\nid = "acme/m"\n[[models.endpoints]]\nprovider = "acme"\ncontext_length = 100\n')
    r = gateway("check-config", str(good))
    assert r.returncode == 0, r.stdout
    assert "ok" in r.stdout


def test_models_prints_prices_and_context():
    r = gateway("models")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    row = next(line for line in lines if "deepinfra" in line and "v0.2" in line)
    assert "32768" in row and "0.07" in row
    nemo = next(line for line in lines if "mistral-nemo" in line)
    assert nemo.split()[-2:] == ["-", "-"]  # unpriced, not 0


def test_serve_refuses_public_bind_without_keys(tmp_path):
    cfg = tmp_path / "open.toml"
    cfg.write_text("[local]\nenabled = false\n")
    r = gateway("serve", "--config", str(cfg), "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2
    assert "refusing to bind 0.0.0.0" in r.stderr
