"""Config parsing and merging over the built-in catalog."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config as config_mod
from gateway.routing.catalog import build

REPO = Path(__file__).resolve().parents[2]


def test_example_config_is_valid():
    r = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(REPO / "deploy/gateway.example.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_user_config_merges_over_builtin(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[providers.deepinfra]\ntimeout_s = 5.0\n'
        '[[models]]\nid = "MISTRALAI/Mistral-Nemo"\naliases = ["nemo"]\n'
        '[[models.endpoints]]\nprovider = "deepinfra"\ninput_usd_per_mtok = 0.02\noutput_usd_per_mtok = 0.04\n'
        '[routing]\nmax_attempts = 5\n'
    )
    cfg = config_mod.load(path)
    catalog = build(cfg, env={"DEEPINFRA_TOKEN": "k"})
    assert catalog.providers["deepinfra"].timeout_s == 5.0
    assert catalog.providers["deepinfra"].base_url == "https://api.deepinfra.com/v1/openai"  # kept
    nemo = catalog.find("nemo")
    assert nemo.id == "mistralai/mistral-nemo" and len(nemo.endpoints) == 1
    ep = nemo.endpoints[0]
    assert (ep.input_usd_per_mtok, ep.output_usd_per_mtok, ep.context_length) == (0.02, 0.04, 131072)
    assert cfg.routing.max_attempts == 5 and cfg.health.failure_threshold == 3
    assert catalog.providers["novita"].enabled is False
    assert catalog.providers["novita"].disabled_reason == "$NOVITA_API_KEY is not set"


def test_invalid_toml_is_reported(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[server\n")
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(path)
    assert "invalid TOML" in err.value.errors[0]
