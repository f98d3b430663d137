"""End-to-end fixtures: fake seed providers as real HTTP servers, the gateway
as a real ``gateway serve`` process, and the official openai SDK as client."""

from __future__ import annotations

import hashlib

import openai
import pytest

from tests.e2e.gateway_process import GatewayProcess
from tests.fakes.servers import FakeUpstream, start_many

GATEWAY_KEY = "sk-gw-e2e-key"
PROVIDER_KEYS = {"novita": "nv-key-e2e", "deepinfra": "di-key-e2e", "openrouter": "or-key-e2e"}
ENV_NAMES = {"novita": "NOVITA_API_KEY", "deepinfra": "DEEPINFRA_TOKEN", "openrouter": "OPENROUTER_API_KEY"}


def gateway_config(fakes: dict[str, FakeUpstream], extra: str = "", key_fields: str = "") -> str:
    lines = [
        "[[auth.keys]]",
        'name = "e2e"',
        f'sha256 = "{hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()}"',
        key_fields,
        "[local]",
        "enabled = false",
    ]
    for name, fake in fakes.items():
        lines += [f"[providers.{name}]", f'base_url = "{fake.base_url}"', "timeout_s = 2.0"]
        if name == "openrouter":
            lines.append('headers = { "HTTP-Referer" = "https://e2e.example", "X-Title" = "e2e" }')
    return "\n".join(lines) + "\n" + extra


@pytest.fixture(scope="session")
def fakes():
    ups = {name: FakeUpstream(name, api_key=key) for name, key in PROVIDER_KEYS.items()}
    start_many(*ups.values())
    yield ups
    for up in ups.values():
        up.stop()


@pytest.fixture(autouse=True)
def _reset_fakes(fakes):
    for up in fakes.values():
        up.reset()
    yield


@pytest.fixture
def start_gateway(fakes):
    """``start_gateway(extra_toml)`` -> a running GatewayProcess, stopped after the test."""
    running = []

    def start(extra: str = "", args: list[str] | None = None, key_fields: str = "") -> GatewayProcess:
        env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
        gw = GatewayProcess(gateway_config(fakes, extra, key_fields), env=env, args=args)
        running.append(gw)
        return gw.start()

    yield start
    for gw in running:
        gw.stop()


@pytest.fixture(scope="module")
def shared_gateway(fakes):
    """One gateway for tests that do not trip circuits (high failure threshold)."""
    env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
    with GatewayProcess(gateway_config(fakes, "[health]\nfailure_threshold = 1000\n"), env=env) as gw:
        yield gw


@pytest.fixture
def client(shared_gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=shared_gateway.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=30)
