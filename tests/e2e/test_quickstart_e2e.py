"""The README's quick start, as a new user runs it: ``make serve`` (the gateway on its
embedded default: no config, no keys, the bundled model through the local backend),
then the README's own openai SDK example, 20 times in a row: every answer a 200 within
30 s, and "Paris" in at least 15 of the 20 (issue 16).

The example is read from README.md's "## Quick start" section and run unchanged but
for the port (``make serve`` binds 8000, which another process may hold here). The
gateway is started as ``make serve`` starts it, minus the install step:
``python -m gateway serve`` with no config and no provider keys in the environment.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import openai
import pytest

from tests.e2e.gateway_process import GatewayProcess
from tests.fakes.servers import REPO_ROOT

README = Path(REPO_ROOT) / "README.md"
README_URL = "http://127.0.0.1:8000/v1"
REQUESTS = 20
PER_REQUEST_S = 30.0  # the bound for one answer on a 2-core box
# Variables that would change what `make serve` does on a fresh clone.
USER_ENV = ("DEEPINFRA_TOKEN", "OPENROUTER_API_KEY", "NOVITA_API_KEY", "GATEWAY_CONFIG", "GATEWAY_LOCAL_URL")


def quickstart_snippet() -> str:
    """The python block of README.md's "## Quick start" section."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the quick start should show one python example"
    assert README_URL in blocks[0], "the example no longer points at make serve's address"
    return blocks[0]


@pytest.fixture(scope="module")
def gateway_url():
    # No config and none of the user's provider keys: what `make serve` starts on a fresh clone.
    # The first start on a machine converts the bundled GGUF into the cache (~25 s, more when busy).
    gw = GatewayProcess(None, env_drop=USER_ENV)
    with gw.start(ready_timeout_s=600):
        yield gw.url


def test_readme_quickstart_twenty_times(gateway_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    code = quickstart_snippet().replace(README_URL, f"{gateway_url}/v1")

    class OneTry(openai.OpenAI):
        """The README's client, but a failed or slow answer fails here instead of being retried
        (the SDK retries twice by default, which would hide a 504 behind a slow 200)."""

        def __init__(self, **kw) -> None:
            super().__init__(**kw, max_retries=0, timeout=PER_REQUEST_S)

    monkeypatch.setattr(openai, "OpenAI", OneTry)  # what the snippet's `from openai import OpenAI` gets
    answers: list[str] = []
    times: list[float] = []
    for i in range(REQUESTS):
        scope: dict = {}
        t0 = time.monotonic()
        exec(compile(code, "README.md (quick start)", "exec"), scope)  # raises on any non-200
        elapsed = time.monotonic() - t0
        r = scope["r"]
        assert elapsed < PER_REQUEST_S, f"request {i} took {elapsed:.1f} s"
        times.append(elapsed)
        assert r.model == "local/smollm2-135m-instruct"
        assert r.model_extra["provider"] == "local"
        assert r.choices[0].finish_reason in ("stop", "length")
        answers.append(r.choices[0].message.content or "")
    # Issue 16's quality bar: "Paris" in at least 15 of the 20 answers, at the model card's
    # sampling (temperature 0.2, top_p 0.9, from the converted generation_config.json).
    # The README's system message ("Answer in one sentence.") is what makes this Q4_1
    # build reliable: bench/quickstart_answers.py counts Paris in 100 of 100 answers with
    # it and in 58-92 of 100 for the bare question, by dtype (README, "Local backend").
    mentions = sum("Paris" in a for a in answers)
    print(f"Paris in {mentions} of {REQUESTS} answers; slowest {max(times):.1f} s")
    assert mentions >= 15, f"Paris in only {mentions} of {REQUESTS} answers: {answers}"
