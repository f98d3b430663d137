"""Engine behaviour on the tiny random Mistral: batching invariance, sampling, stops, cancel, admission."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from local_backend.engine import ContextLengthExceeded, Engine, QueueFull, add_request
from local_backend.sampling import SamplingParams


def chat(eng: Engine, text: str) -> list[int]:
    return eng.tokenizer.encode_chat([{"role": "user", "content": text}])  # type: ignore[attr-defined]


async def run(eng: Engine, prompt: list[int], params: SamplingParams,
              on_token=None) -> tuple[list[int], str, str]:
    stream = add_request(eng, prompt, params)
    ids: list[int] = []
    text = ""
    async for out in stream:
        ids += out.token_ids
        text += out.text
        if on_token is not None:
            await on_token(len(ids))
        if out.finish_reason:
            return ids, text, out.finish_reason
    raise AssertionError("no finish_reason")


GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_greedy_matches_transformers_generate(make_engine, tiny_model_dir, dtype) -> None:
    """The fused runner + slot cache (packed oneDNN GEMMs in bf16) computes what transformers computes."""
    from transformers import MistralForCausalLM

    eng = make_engine(dtype=dtype)
    prompt = chat(eng, "Hello there, how are you?")
    ids, _, _ = await run(eng, prompt, SamplingParams(max_tokens=24, **GREEDY))
    ref = MistralForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype)).eval()
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                       pad_token_id=0, min_new_tokens=24)
    assert ids == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_greedy_identical_alone_and_in_a_changing_batch(make_engine, dtype) -> None:
    eng = make_engine(dtype=dtype)
    target = chat(eng, "The quick brown fox jumps over the lazy dog.")
    alone, _, _ = await run(eng, target, SamplingParams(max_tokens=40, **GREEDY))

    others: list[asyncio.Task] = []

    async def on_token(n: int) -> None:
        # Others join mid-stream (one with a long, chunk-prefilled prompt) and leave before us.
        if n in (3, 10, 18):
            long_prompt = chat(eng, " ".join(["word"] * (20 + 10 * n)))
            others.append(asyncio.create_task(run(eng, long_prompt, SamplingParams(max_tokens=5 + n // 2, **GREEDY))))
            await asyncio.sleep(0)

    early = asyncio.create_task(run(eng, chat(eng, "Already running."), SamplingParams(max_tokens=8, **GREEDY)))
    batched, _, _ = await run(eng, target, SamplingParams(max_tokens=40, **GREEDY), on_token)
    await early
    results = await asyncio.gather(*others)
    assert len(results) == 3 and all(len(r[0]) > 0 for r in results)
    assert batched == alone
    await wait_for(lambda: eng.num_running == 0)


async def test_seeded_sampling_is_reproducible(make_engine) -> None:
    eng = make_engine()
    prompt = chat(eng, "Tell me something random.")
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    first, _, _ = await run(eng, prompt, p)
    noise = [asyncio.create_task(run(eng, chat(eng, f"noise {i}"), SamplingParams(max_tokens=15, seed=i)))
             for i in range(3)]
    second, _, _ = await run(eng, prompt, p)
    await asyncio.gather(*noise)
    other, _, _ = await run(eng, prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True))
    assert first == second
    assert other != first


async def test_stop_string_cuts_output(make_engine) -> None:
    eng = make_engine()
    prompt = chat(eng, "Say something.")
    _, full, finish = await run(eng, prompt, SamplingParams(max_tokens=30, **GREEDY))
    assert finish == "length" and len(full) > 12
    stop = full[8:11]
    cut = full.index(stop)
    ids, text, finish = await run(eng, prompt, SamplingParams(max_tokens=30, stop=(stop, "\x00never"), **GREEDY))
    assert finish == "stop"
    assert text == full[:cut]
    assert len(ids) < 30


async def test_logit_bias_forces_a_token(make_engine) -> None:
    eng = make_engine()
    ids, _, _ = await run(eng, chat(eng, "hi"), SamplingParams(max_tokens=5, logit_bias={1000: 100.0}, **GREEDY))
    assert ids == [1000] * 5


async def test_eos_finishes_with_stop(make_engine) -> None:
    eng = make_engine()
    ids, _, finish = await run(eng, chat(eng, "hi"), SamplingParams(max_tokens=5, temperature=0.0,
                                                                    logit_bias={2: 100.0}))
    assert finish == "stop" and ids == []


async def wait_for(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_cancel_frees_the_slot(make_engine) -> None:
    eng = make_engine(max_batch=1, max_queue=1)
    stream = add_request(eng, chat(eng, "long one"), SamplingParams(max_tokens=200, **GREEDY))
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    assert eng.num_running == 1
    stream.abort()
    await wait_for(lambda: eng.num_running == 0)
    ids, _, finish = await run(eng, chat(eng, "next"), SamplingParams(max_tokens=4, **GREEDY))
    assert finish == "length" and len(ids) == 4


async def test_queue_full_raises_with_retry_after(make_engine) -> None:
    eng = make_engine(max_batch=1, max_queue=2)
    p = SamplingParams(max_tokens=200, **GREEDY)
    streams = [add_request(eng, chat(eng, "a"), p)]
    await wait_for(lambda: eng.num_running == 1)
    streams += [add_request(eng, chat(eng, "b"), p), add_request(eng, chat(eng, "c"), p)]
    with pytest.raises(QueueFull) as exc:
        add_request(eng, chat(eng, "d"), p)
    assert exc.value.retry_after >= 1
    for s in streams:
        s.abort()
    await wait_for(lambda: eng.num_running == 0 and eng.num_waiting == 0)
    add_request(eng, chat(eng, "e"), SamplingParams(max_tokens=1, **GREEDY)).abort()


async def test_context_overflow_is_refused(make_engine) -> None:
    eng = make_engine(max_model_len=64)
    prompt = chat(eng, "x " * 10)
    with pytest.raises(ContextLengthExceeded):
        add_request(eng, prompt, SamplingParams(max_tokens=64 - len(prompt) + 1))
    ids, _, _ = await run(eng, prompt, SamplingParams(max_tokens=64 - len(prompt), **GREEDY))
    assert len(ids) == 64 - len(prompt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_requests_arriving_together_are_prefilled_together(make_engine, dtype) -> None:
    """A burst is prefilled as one padded group (two rows here: budget 64 / 32 per row), rows of
    different lengths finishing their prompts at different steps; each answer is what it is alone."""
    eng = make_engine(dtype=dtype)
    prompts = [chat(eng, "x " * n) for n in (3, 40, 9, 25)]
    alone = [(await run(eng, p, SamplingParams(max_tokens=12, **GREEDY)))[0] for p in prompts]
    steps = eng.steps
    together = await asyncio.gather(*[run(eng, p, SamplingParams(max_tokens=12, **GREEDY)) for p in prompts])
    assert [r[0] for r in together] == alone
    assert eng.steps - steps < 4 * 13  # fewer steps than one prefill step per request
    await wait_for(lambda: eng.num_running == 0)


def test_prefill_rows_match_one_row_at_a_time(tiny_model_dir) -> None:
    from local_backend.models import load_model
    from local_backend.runner import ModelRunner

    lm = load_model(str(tiny_model_dir), dtype="float32")
    a = ModelRunner(lm.model, max_slots=4, max_len=64)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    each = torch.stack([a.prefill(i, r, 0) for i, r in enumerate(rows)])
    lm = load_model(str(tiny_model_dir), dtype="float32")
    b = ModelRunner(lm.model, max_slots=4, max_len=64)
    together = b.prefill_rows(0, rows, [0, 0, 0])
    torch.testing.assert_close(together, each, rtol=1e-4, atol=1e-4)
    # ...and the K/V each row left behind is the same, up to its length.
    for i, r in enumerate(rows):
        torch.testing.assert_close(b.k_cache[:, i, :, : len(r)], a.k_cache[:, i, :, : len(r)], rtol=1e-4, atol=1e-4)
