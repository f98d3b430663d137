"""The bundled local backend behind the gateway: the default answer and the last resort."""

from __future__ import annotations

import time

import httpx
import openai

from tests.e2e.conftest import GATEWAY_KEY, ENV_NAMES, PROVIDER_KEYS, gateway_config
from tests.e2e.gateway_process import GatewayProcess

V02 = "mistralai/mistral-7b-instruct-v0.2"


def wait_for_local(gw: GatewayProcess, timeout_s: float = 600) -> None:
    """/health/ready turns 200 with the fakes; the local backend may still be loading."""
    url = f"{gw.base_url}/models/local/smollm2-135m-instruct/endpoints"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(url, headers={"authorization": f"Bearer {GATEWAY_KEY}"}).json()
        if status["data"]["endpoints"][0]["status"]["ready"]:
            return
        time.sleep(0.5)
    raise AssertionError("local backend not ready:\n" + gw.log_text())


def test_every_upstream_failing_falls_back_to_the_local_model(fakes):
    for up in fakes.values():
        up.control("status", status=503)
    toml = gateway_config(fakes).replace("[local]\nenabled = false\n", "[local]\nenabled = true\n")
    env = {ENV_NAMES[n]: PROVIDER_KEYS[n] for n in fakes}
    # The first start may convert the embedded GGUF into the cache: allow for it.
    with GatewayProcess(toml, env=env).start(ready_timeout_s=600) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=GATEWAY_KEY, max_retries=0, timeout=120)
        wait_for_local(gw)
        r = client.chat.completions.create(
            model=V02, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=24, extra_body={"provider": {"sort": "price"}})
        assert r.model == "local/smollm2-135m-instruct"
        assert r.model_extra["provider"] == "local"
        assert "Paris" in r.choices[0].message.content
        assert r.usage.model_extra["estimated_cost"] == 0.0
        assert len(fakes["deepinfra"].requests(chat_only=True)) == 1
        assert len(fakes["openrouter"].requests(chat_only=True)) == 1
        stream = client.chat.completions.create(
            model=V02, messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=24, stream=True)
        chunks = list(stream)
        assert chunks[0].model == "local/smollm2-135m-instruct"
        assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
