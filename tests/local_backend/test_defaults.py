"""Sampling defaults from generation_config.json, the default max_tokens cap, and request deadlines."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from litestar.testing import AsyncTestClient

import local_backend.engine as engine_mod
from local_backend import protocol as P
from local_backend.cli import parse_args
from local_backend.engine import add_request
from local_backend.models import (
    EMBEDDED_SAMPLING,
    GenerationDefaults,
    load_model,
    read_generation_defaults,
    write_embedded_sampling,
)
from local_backend.sampling import SamplingParams
from local_backend.server import request_deadline, sampling_params
from tests.local_backend.conftest import in_process_server

NAME = "tiny"


@pytest.fixture
def tiny_with_defaults(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with a generation_config.json that sets sampling, as HF checkpoints do."""
    d = tmp_path / "tiny-defaults"
    shutil.copytree(tiny_model_dir, d)
    (d / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": 2, "do_sample": True,
        "temperature": 0.0, "top_p": 0.8, "top_k": 5, "repetition_penalty": 1.2,
        "min_p": 7.0,  # out of range: skipped, not applied to every request
    }))
    return d


def test_generation_config_values_become_defaults(tiny_with_defaults: Path, tiny_model_dir: Path) -> None:
    d = read_generation_defaults(tiny_with_defaults)
    assert d == GenerationDefaults(temperature=0.0, top_p=0.8, top_k=5, repetition_penalty=1.2)
    assert load_model(str(tiny_with_defaults)).generation_defaults == d
    # transformers' own generation_config.json (no sampling keys): nothing to apply.
    assert read_generation_defaults(tiny_model_dir).as_dict() == {}
    assert read_generation_defaults(tiny_model_dir / "missing").as_dict() == {}


def test_request_values_win_over_defaults() -> None:
    defaults = GenerationDefaults(temperature=0.2, top_p=0.9, repetition_penalty=1.1)

    def params(**body) -> SamplingParams:
        req = P.decode_request(json.dumps({"model": "m", "messages": [], **body}).encode())
        return sampling_params(req, prompt_len=10, max_model_len=100, vocab_size=1000, defaults=defaults,
                               default_max_tokens=32)

    p = params()
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.2, 0.9, 0, 1.1, 32)
    p = params(temperature=0, top_p=1.0, repetition_penalty=1.0, max_tokens=50)
    assert (p.temperature, p.top_p, p.repetition_penalty, p.max_tokens) == (0.0, 1.0, 1.0, 50)
    assert params(max_completion_tokens=5).max_tokens == 5
    # Without max_tokens the cap is cut to what the context leaves, never refused.
    req = P.decode_request(b'{"model": "m", "messages": []}')
    assert sampling_params(req, 95, 100, 1000, defaults, 32).max_tokens == 5


def test_embedded_sampling_is_patched_into_old_caches(tmp_path: Path) -> None:
    """A cache converted before the defaults existed gets them; a chosen value is left alone."""
    old = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "transformers_version": "5.24.0"}
    (tmp_path / "generation_config.json").write_text(json.dumps(old))
    assert write_embedded_sampling(tmp_path) is True
    patched = json.loads((tmp_path / "generation_config.json").read_text())
    assert patched == {**old, **EMBEDDED_SAMPLING}
    assert read_generation_defaults(tmp_path) == GenerationDefaults(temperature=0.2, top_p=0.9)
    assert write_embedded_sampling(tmp_path) is False  # already there
    (tmp_path / "generation_config.json").write_text(json.dumps({**old, "temperature": 0.7}))
    assert write_embedded_sampling(tmp_path) is False
    assert read_generation_defaults(tmp_path) == GenerationDefaults(temperature=0.7)
    assert not list(tmp_path.glob(".generation_config.*"))  # no temp files left behind


def test_the_embedded_model_applies_the_model_cards_sampling() -> None:
    lm = load_model("embedded", dtype="float32")
    assert lm.generation_defaults == GenerationDefaults(temperature=0.2, top_p=0.9)


@pytest.fixture
async def client(tiny_with_defaults: Path):
    async with in_process_server(tiny_with_defaults, NAME, max_batch=2, max_queue=4, max_model_len=128,
                                 default_max_tokens=7) as c:
        yield c


async def test_models_endpoint_shows_the_defaults(client: AsyncTestClient) -> None:
    card = (await client.get("/v1/models")).json()["data"][0]
    assert card["id"] == NAME and card["max_model_len"] == 128
    assert card["sampling_defaults"] == {"temperature": 0.0, "top_p": 0.8, "top_k": 5, "min_p": 0.0,
                                         "repetition_penalty": 1.2, "max_tokens": 7}


async def test_default_max_tokens_caps_an_answer_with_length(client: AsyncTestClient) -> None:
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    data = (await client.post("/v1/chat/completions", json=body)).json()
    assert data["usage"]["completion_tokens"] == 7
    assert data["choices"][0]["finish_reason"] == "length"
    data = (await client.post("/v1/chat/completions", json={**body, "max_tokens": 9})).json()
    assert data["usage"]["completion_tokens"] == 9  # the request's own value wins


async def test_a_request_past_its_deadline_before_it_starts_is_refused(client: AsyncTestClient) -> None:
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    r = await client.post("/v1/chat/completions", json=body, headers={"X-Request-Timeout": "0.000001"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "timeout" and r.headers["retry-after"] == "1"
    # A stream has no deadline (it delivers as it goes); a bad header is ignored.
    r = await client.post("/v1/chat/completions", json={**body, "stream": True}, headers={"X-Request-Timeout": "1e-6"})
    assert r.status_code == 200 and "[DONE]" in r.text
    r = await client.post("/v1/chat/completions", json=body, headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 200


def test_request_deadline() -> None:
    assert request_deadline(100.0, None, None) is None
    assert request_deadline(100.0, 60.0, None) == 160.0
    assert request_deadline(100.0, 60.0, "5") == 105.0  # a header lowers it
    assert request_deadline(100.0, 60.0, "90") == 160.0  # ...never raises it
    assert request_deadline(100.0, None, "5") == 105.0
    for bad in ("0", "-1", "nan", "soon"):
        assert request_deadline(100.0, 60.0, bad) == 160.0


def test_cli_options() -> None:
    args = parse_args(["serve"])
    assert (args.default_max_tokens, args.request_timeout) == (256, 100.0)
    args = parse_args(["serve", "--default-max-tokens", "64", "--request-timeout", "0"])
    assert (args.default_max_tokens, args.request_timeout) == (64, 0.0)
    with pytest.raises(SystemExit):
        parse_args(["serve", "--default-max-tokens", "0"])


async def test_deadline_ends_a_running_request_with_what_it_has(make_engine, monkeypatch) -> None:
    """The engine's clock is moved past the deadline after 3 tokens: the answer ends there, with
    finish_reason "length" and the tokens generated so far (no wall-clock timing involved)."""
    skew = [0.0]
    monkeypatch.setattr(engine_mod, "time", SimpleNamespace(monotonic=lambda: time.monotonic() + skew[0]))
    eng = make_engine()
    prompt = eng.tokenizer.encode_chat([{"role": "user", "content": "go on"}])
    stream = add_request(eng, prompt, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                         deadline=time.monotonic() + 3600)
    ids: list[int] = []
    text = ""
    async for out in stream:
        ids += out.token_ids
        text += out.text
        if len(ids) == 3:
            skew[0] = 7200.0
        if out.finish_reason:
            break
    assert out.finish_reason == "length"
    assert 3 <= len(ids) < 200 and out.completion_tokens == len(ids)
    # Waiting past its deadline: "timeout", nothing generated, and the engine keeps serving.
    late = [o async for o in add_request(eng, prompt, SamplingParams(max_tokens=5), deadline=time.monotonic() - 1)]
    assert [(o.finish_reason, o.completion_tokens) for o in late] == [("timeout", 0)]
    ok = [o async for o in add_request(eng, prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))]
    assert ok[-1].finish_reason == "length" and ok[-1].completion_tokens == 4
