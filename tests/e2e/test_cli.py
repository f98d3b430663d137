"""``gateway check-config``, ``gateway models`` and ``gateway serve``'s safety checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fakes.servers import REPO_ROOT, free_port


def gateway(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_check_config_prints_every_error_with_its_key_path(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[server]\nport = "eighty"\n'
        "[routing]\nmax_atempts = 3\n"
        '[[auth.keys]]\nname = "x"\n'
        '[[models]]\nid = "acme/m"\n[[models.endpoints]]\nprovider = "nowhere"\ncontext_length = 100\n'
        "[providers.novita]\ntimeout_s = -1\n"
    )
    r = gateway("check-config", str(cfg))
    assert r.returncode == 2
    assert r.stdout.splitlines() == [
        f"{cfg}: server.port: Expected `int`, got `str`",
        f"{cfg}: routing.max_atempts: unknown field",
        f"{cfg}: providers.novita.timeout_s: Expected `float` > 0.0",
        f"{cfg}: auth.keys[0]: set exactly one of `sha256` or `key_env`",
    ]


def test_check_config_resolves_references(tmp_path):
    cfg = tmp_path / "ref.toml"
    cfg.write_text('[[models]]\nid = "acme/m"\n[[models.endpoints]]\nprovider = "nowhere"\ncontext_length = 100\n')
    r = gateway("check-config", str(cfg))
    assert r.returncode == 2
    assert r.stdout.startswith(f"{cfg}: models[0].endpoints[0].provider: unknown provider 'nowhere' (known: ")
    good = tmp_path / "good.toml"
    good.write_text(
        '[providers.acme]\nbase_url = "http://127.0.0.1:1/v1"\n'
        '[[models]]\nid = "acme/m"\n[[models.endpoints]]\nprovider = "acme"\ncontext_length = 100\n'
    )
    r = gateway("check-config", str(good))
    assert r.returncode == 0, r.stdout
    assert "ok" in r.stdout


#: One config error of each kind, and the line it must give (after ``file: ``).
CONFIG_ERRORS = {
    "toml syntax": (
        "[server]\nport = 8000\n[routing\n",  # line 5: two lines of [local] come first
        "line 5, column 9: invalid TOML: Expected ']' at the end of a table declaration",
    ),
    "type": ('[server]\nport = "eighty"\n', "server.port: Expected `int`, got `str`"),
    "range": ("[routing]\nmax_attempts = 0\n", "routing.max_attempts: Expected `int` >= 1"),
    "unknown section": ("[sever]\nport = 1\n", "sever: unknown section (did you mean [server]?)"),
    "unknown field": ("[routing]\nmax_atempts = 3\n", "routing.max_atempts: unknown field"),
    "unknown provider": (
        '[[models]]\nid = "x/a"\n[[models.endpoints]]\nprovider = "novita"\ncontext_length = 9\n'
        '[[models.endpoints]]\nprovider = "nowhere"\ncontext_length = 9\n',
        "models[0].endpoints[1].provider: unknown provider 'nowhere' (known: deepinfra, local, novita, openrouter; "
        "a new one needs [providers.nowhere] with base_url)",
    ),
    "missing base_url": (
        "[providers.acme]\ntimeout_s = 5\n",
        "providers.acme.base_url: required (the built-in catalog has no provider 'acme')",
    ),
    "bad url": (
        '[providers.acme]\nbase_url = "acme.example/v1"\n',
        "providers.acme.base_url: 'acme.example/v1' must be an http:// or https:// URL",
    ),
    "missing context_length": (
        '[[models]]\nid = "mistralai/mistral-nemo"\n[[models.endpoints]]\nprovider = "novita"\n',
        "models[0].endpoints[0].context_length: required (the built-in catalog has no endpoint of "
        "'mistralai/mistral-nemo' on 'novita' to take it from)",
    ),
    "header": (
        '[providers.acme]\nbase_url = "http://a.example/v1"\nheaders = { "X-T" = "a\\nb" }\n',
        "providers.acme.headers.X-T: the value must be ASCII text without CR, LF, NUL or other control characters",
    ),
    "key": ('[[auth.keys]]\nname = "x"\n', "auth.keys[0]: set exactly one of `sha256` or `key_env`"),
}


@pytest.mark.parametrize("kind", CONFIG_ERRORS)
def test_every_config_error_is_one_line_with_its_key_path_and_exit_status_2(tmp_path, kind):
    """``check-config`` (on stdout) and ``serve`` (on stderr, before binding
    anything) print the same ``file: key.path: message`` line, with no traceback."""
    toml, line = CONFIG_ERRORS[kind]
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[local]\nenabled = false\n" + toml)
    check = gateway("check-config", str(cfg))
    assert (check.returncode, check.stdout, check.stderr) == (2, f"{cfg}: {line}\n", "")
    serve = gateway("serve", "--config", str(cfg), "--port", str(free_port()))
    assert (serve.returncode, serve.stderr, serve.stdout) == (2, f"{cfg}: {line}\n", "")
    models = gateway("models", "--config", str(cfg))
    assert (models.returncode, models.stderr) == (2, f"{cfg}: {line}\n")


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
