"""Benchmark: transformers baselines vs. the local_backend engine, same process, same prompts.

    python bench/local_backend_bench.py [--repeats 3] [--dtypes float32,bfloat16]

Prints a markdown table of medians. Baselines (float32, the embedded SmolLM2-135M):
sequential `generate()`, one static left-padded batch through `generate()`, and
transformers' continuous batching `generate_batch()`. Then our engine: 16 concurrent
streams, one stream alone, and the time to first token of a ~500-token prompt that
arrives while 15 other streams decode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from local_backend.engine import EngineConfig, add_request, build_engine  # noqa: E402
from local_backend.models import load_model  # noqa: E402
from local_backend.sampling import SamplingParams  # noqa: E402

N_PROMPTS, NEW_TOKENS = 16, 64
TOPICS = ["the ocean", "a lighthouse", "volcanoes", "a chess game", "bread baking", "the moon", "a lost key",
          "winter in Oslo", "honeybees", "a jazz club", "desert travel", "robots", "a storm", "old maps",
          "a tiny dragon", "autumn leaves"]


def prompts(tok) -> list[list[int]]:
    return [tok.encode_chat([{"role": "user", "content": f"Write a short story about {t}."}]) for t in TOPICS]


def long_prompt(tok, n: int = 500) -> list[int]:
    words = " ".join(f"item{i} is number {i}." for i in range(n))
    ids = tok.encode_chat([{"role": "user", "content": f"Summarize this list: {words}"}])
    return ids[:n - 6] + ids[-6:]  # keep the chat template's closing tokens


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ------------------------------------------------------------------ baselines


@torch.inference_mode()
def sequential_generate(model, ps: list[list[int]]) -> float:
    n = 0
    t = time.perf_counter()
    for p in ps:
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
        n += out.shape[1] - len(p)
    return n / (time.perf_counter() - t)


@torch.inference_mode()
def static_batch_generate(model, ps: list[list[int]], pad: int) -> float:
    width = max(map(len, ps))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    dt, out = timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                           min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad))
    return len(ps) * (out.shape[1] - width) / dt


def hf_generate_batch(model, ps: list[list[int]]) -> float:
    from transformers import GenerationConfig

    # No inference_mode here: the manager updates its static tensors outside it and fails.
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    dt, res = timed(lambda: model.generate_batch(inputs=ps, generation_config=cfg, progress_bar=False))
    return sum(len(r.generated_tokens) for r in res.values()) / dt


# ------------------------------------------------------------------ our engine


async def stream(engine, ids, max_tokens: int, marks: dict) -> int:
    s = add_request(engine, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    n = 0
    async for out in s:
        now = time.perf_counter()
        n += len(out.token_ids)
        marks.setdefault("first", now)
        marks["last"] = now
        if marks.get("stop"):
            s.abort()
            break
    return n


async def engine_concurrent(engine, ps) -> tuple[float, float]:
    """-> (end-to-end tok/s incl. prefill, aggregate decode tok/s after each stream's first token)."""
    marks = [dict() for _ in ps]
    t = time.perf_counter()
    ns = await asyncio.gather(*[stream(engine, p, NEW_TOKENS, m) for p, m in zip(ps, marks)])
    e2e = sum(ns) / (time.perf_counter() - t)
    decode = sum((n - 1) / (m["last"] - m["first"]) for n, m in zip(ns, marks))
    return e2e, decode


async def engine_single(engine, p) -> float:
    m: dict = {}
    n = await stream(engine, p, 128, m)
    return (n - 1) / (m["last"] - m["first"])


async def engine_ttft_under_load(engine, ps, long_ids) -> float:
    marks = [dict() for _ in range(15)]
    tasks = [asyncio.create_task(stream(engine, p, 400, m)) for p, m in zip(ps[:15], marks)]
    while not all("first" in m for m in marks):
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)  # all 15 are decoding now
    lm: dict = {}
    t = time.perf_counter()
    probe = asyncio.create_task(stream(engine, long_ids, 4, lm))
    while "first" not in lm:
        await asyncio.sleep(0.001)
    ttft = lm["first"] - t
    for m in marks:
        m["stop"] = True
    await asyncio.gather(probe, *tasks)
    return ttft


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="dtypes to run our engine with")
    ap.add_argument("--sequential-prompts", type=int, default=4,
                    help="sequential generate() is slow; tok/s is per prompt, so a subset suffices")
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows: list[tuple[str, str, str]] = []

    base = load_model("embedded", dtype="float32")
    ps = prompts(base.tokenizer)
    if not args.skip_baselines:
        m = base.model
        seq = [sequential_generate(m, ps[:args.sequential_prompts]) for _ in range(args.repeats)]
        rows.append((f"transformers sequential generate() ({args.sequential_prompts} prompts, one at a time)",
                     "float32", f"{med(seq):.0f} tok/s"))
        static = [static_batch_generate(m, ps, pad=0) for _ in range(args.repeats)]
        rows.append(("transformers generate(), one static padded batch of 16", "float32", f"{med(static):.0f} tok/s"))
        gb = [hf_generate_batch(m, ps) for _ in range(args.repeats)]
        rows.append(("transformers generate_batch() (continuous batching, paged)", "float32", f"{med(gb):.0f} tok/s"))
        print(rows, file=sys.stderr, flush=True)
    del base

    for dtype in args.dtypes.split(","):
        lm = load_model("embedded", dtype=dtype)
        eng = build_engine(lm.model, lm.tokenizer.decode, lm.tokenizer.eos_token_ids,
                           EngineConfig(max_batch=16, max_model_len=2048))
        eng.start()
        ps = prompts(lm.tokenizer)
        long_ids = long_prompt(lm.tokenizer)

        async def run_all():
            await stream(eng, ps[0], 8, {})  # warm-up
            conc = [await engine_concurrent(eng, ps) for _ in range(args.repeats)]
            single = [await engine_single(eng, ps[0]) for _ in range(args.repeats)]
            ttft = [await engine_ttft_under_load(eng, ps, long_ids) for _ in range(args.repeats)]
            return conc, single, ttft

        conc, single, ttft = asyncio.run(run_all())
        eng.shutdown()
        rows.append(("local_backend engine, 16 concurrent streams: end to end (incl. prefill)", dtype,
                     f"{med([c[0] for c in conc]):.0f} tok/s"))
        rows.append(("local_backend engine, 16 concurrent streams: aggregate decode", dtype,
                     f"{med([c[1] for c in conc]):.0f} tok/s"))
        rows.append(("local_backend engine, single stream decode", dtype, f"{med(single):.0f} tok/s"))
        rows.append((f"local_backend engine, TTFT of a {len(long_ids)}-token prompt while 15 streams decode",
                     dtype, f"{med(ttft) * 1000:.0f} ms"))
        print(rows[-4:], file=sys.stderr, flush=True)

    print(f"\nSmolLM2-135M-Instruct (embedded), {N_PROMPTS} prompts x {NEW_TOKENS} new tokens, greedy, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats}\n")
    print("| what | dtype | median |")
    print("|---|---|---|")
    for what, dtype, value in rows:
        print(f"| {what} | {dtype} | {value} |")


if __name__ == "__main__":
    main()
