"""Fixtures: a tiny random Mistral with the real mistral-common v3 tokenizer, and engines over it."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import mistral_common
import pytest
import torch
from litestar.testing import AsyncTestClient
from transformers import MistralConfig, MistralForCausalLM

from local_backend.cli import make_loader
from local_backend.engine import Engine, EngineConfig, add_request, build_engine
from local_backend.models import ChatTokenizer, load_model
from local_backend.sampling import SamplingParams
from local_backend.server import create_app

V3_TOKENIZER = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, hidden 64, vocab 32768: runs in milliseconds, formats chats like Mistral v3."""
    d = tmp_path_factory.mktemp("tiny-mistral")
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=512, initializer_range=0.2, sliding_window=None,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    MistralForCausalLM(cfg).save_pretrained(d)
    shutil.copy(V3_TOKENIZER, d / "tokenizer.model.v3")
    return d


@pytest.fixture
def make_engine(tiny_model_dir: Path):
    """Factory: a started Engine over the tiny model; shut down after the test."""
    engines: list[Engine] = []

    def make(dtype: str | None = None, **overrides: int) -> Engine:
        lm = load_model(str(tiny_model_dir), dtype=dtype)  # None: the CPU default (bf16 where native)
        cfg = EngineConfig(**{"max_batch": 4, "max_queue": 8, "max_model_len": 256, "prefill_chunk": 16,
                              "prefill_chunk_idle": 64, **overrides})
        eng = build_engine(lm.model, lm.tokenizer.decode, lm.tokenizer.eos_token_ids, cfg)
        eng.tokenizer = lm.tokenizer  # type: ignore[attr-defined]
        eng.start()
        engines.append(eng)
        return eng

    yield make
    for e in engines:
        e.shutdown()


@asynccontextmanager
async def in_process_server(model_dir: Path, name: str, **loader: int) -> AsyncIterator[AsyncTestClient]:
    """The HTTP app over `model_dir` in this process, once /health says the model is loaded."""
    app = create_app(name, make_loader(str(model_dir), **loader), exit_on_failure=False)  # type: ignore[arg-type]
    async with AsyncTestClient(app=app, timeout=30) as c:
        for _ in range(300):
            if (await c.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        yield c


async def greedy_alone_and_beside_others(engine: Engine, tokenizer: ChatTokenizer, text: str) -> None:
    """Start `engine`, assert that `text`'s 30 greedy tokens are the same alone and with
    three other requests decoding beside it, and shut it down.

    The others start once `text` has its first token, so its prompt is prefilled alone both
    times: what is compared is decoding in a batch of 1 against a batch of up to 4. Prompts
    that share one prefill forward are padded to one length and go through oneDNN's GEMMs
    and SDPA at another size, which round differently (a first logit moved by 0.375 in bf16,
    3 steps of its rounding, and a near tie 17 tokens on flipped): the engine promises
    nothing there, and an earlier form of this test that let the others' prompts share the
    forward failed about once in 12 runs."""
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)

    async def run(message: str, first_token: asyncio.Event | None = None) -> list[int]:
        prompt = tokenizer.encode_chat([{"role": "user", "content": message}])
        tokens = []
        async for out in add_request(engine, prompt, greedy):
            tokens += out.token_ids
            if first_token is not None:
                first_token.set()
        return tokens

    engine.start()
    try:
        alone = await run(text)
        started = asyncio.Event()
        target = asyncio.ensure_future(run(text, started))
        await started.wait()
        together = await asyncio.gather(target, run("Already running."), run("word " * 30), run("x"))
    finally:
        engine.shutdown()
    assert together[0] == alone and len(alone) == 30
