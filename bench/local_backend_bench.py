"""Benchmark: transformers baselines vs. the local_backend server, same prompts, one run.

    python bench/local_backend_bench.py [--repeats 3] [--dtypes float32,bfloat16]

Prints a markdown table of medians. Baselines (float32, the embedded SmolLM2-135M,
in this process): sequential `generate()`, one static left-padded batch through
`generate()`, and transformers' continuous batching `generate_batch()`. Then our
engine as it is deployed: a `python -m local_backend serve` subprocess driven over
HTTP by streaming clients (httpx, in this process): 16 concurrent streams, one
stream alone, and the time to first token of a ~500-token prompt that arrives while
15 other streams decode.

Why a subprocess and not the engine in this process: libgomp makes OpenMP parallel
regions of a thread slow (~60 us extra each, measured) once another live thread
has its own OpenMP pool; the baselines run torch in this main thread, so an
in-process engine thread would be measured ~1.4x slower than it runs in the server,
where the main thread (uvicorn) never runs torch ops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from local_backend.models import EMBEDDED_SERVED_NAME as SERVED, load_model  # noqa: E402

N_PROMPTS, NEW_TOKENS = 16, 64
TOPICS = ["the ocean", "a lighthouse", "volcanoes", "a chess game", "bread baking", "the moon", "a lost key",
          "winter in Oslo", "honeybees", "a jazz club", "desert travel", "robots", "a storm", "old maps",
          "a tiny dragon", "autumn leaves"]


def texts() -> list[str]:
    return [f"Write a short story about {t}." for t in TOPICS]


def prompts(tok) -> list[list[int]]:
    return [tok.encode_chat([{"role": "user", "content": x}]) for x in texts()]


def long_text(tok, n: int = 500) -> tuple[str, int]:
    """A user message whose chat prompt is about n tokens -> (text, prompt tokens)."""
    items = 0
    while True:
        text = "Summarize this list: " + " ".join(f"item{i} is number {i}." for i in range(items + 1))
        if len(tok.encode_chat([{"role": "user", "content": text}])) > n:
            break
        items += 1
    text = "Summarize this list: " + " ".join(f"item{i} is number {i}." for i in range(items))
    return text, len(tok.encode_chat([{"role": "user", "content": text}]))


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


# ------------------------------------------------------------------ our engine, over HTTP


async def stream(client, url: str, text: str, max_tokens: int, marks: dict) -> int:
    """One streaming chat completion; marks first/last content-chunk times; -> completion tokens."""
    body = {"model": SERVED, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    n = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                marks.setdefault("first", now)
                marks["last"] = now
                if marks.get("stop"):
                    break  # closing the connection aborts the request server-side
                marks["n"] = marks.get("n", 0) + 1
    return n or marks.get("n", 0)


async def engine_concurrent(client, url, texts) -> tuple[float, float]:
    """-> (end-to-end tok/s incl. prefill, aggregate decode tok/s after each stream's first token)."""
    marks = [dict() for _ in texts]
    t = time.perf_counter()
    ns = await asyncio.gather(*[stream(client, url, x, NEW_TOKENS, m) for x, m in zip(texts, marks)])
    e2e = sum(ns) / (time.perf_counter() - t)
    decode = sum((n - 1) / (m["last"] - m["first"]) for n, m in zip(ns, marks))
    return e2e, decode


async def engine_single(client, url, text) -> float:
    m: dict = {}
    n = await stream(client, url, text, 128, m)
    return (n - 1) / (m["last"] - m["first"])


async def engine_ttft_under_load(client, url, texts, long_text) -> float:
    marks = [dict() for _ in range(15)]
    tasks = [asyncio.create_task(stream(client, url, x, 400, m)) for x, m in zip(texts[:15], marks)]
    while not all("first" in m for m in marks):
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)  # all 15 are decoding now
    lm: dict = {}
    t = time.perf_counter()
    probe = asyncio.create_task(stream(client, url, long_text, 4, lm))
    while "first" not in lm:
        await asyncio.sleep(0.001)
    ttft = lm["first"] - t
    for m in marks:
        m["stop"] = True
    await asyncio.gather(probe, *tasks)
    return ttft


def start_server(dtype: str, port: int, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "local_backend", "serve", "--model", "embedded", "--dtype", dtype,
           "--port", str(port), "--max-batch", "16", "--max-model-len", "2048", "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def bench_server(dtype: str, repeats: int, threads: int | None, texts: list[str], long_text: str):
    port = free_port()
    proc = start_server(dtype, port, threads)
    url = f"http://127.0.0.1:{port}"

    async def run_all():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            await stream(client, url, texts[0], 8, {})  # warm-up
            conc = [await engine_concurrent(client, url, texts) for _ in range(repeats)]
            single = [await engine_single(client, url, texts[0]) for _ in range(repeats)]
            ttft = [await engine_ttft_under_load(client, url, texts, long_text) for _ in range(repeats)]
            return conc, single, ttft

    try:
        return asyncio.run(run_all())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="dtypes to run our engine with")
    ap.add_argument("--sequential-prompts", type=int, default=4,
                    help="sequential generate() is slow; tok/s is per prompt, so a subset suffices")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--engine-threads", type=int, default=None, help="--threads for the server")
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
    long, long_n = long_text(base.tokenizer)
    del base
    for dtype in args.dtypes.split(","):
        conc, single, ttft = bench_server(dtype, args.repeats, args.engine_threads, texts(), long)
        rows.append(("local_backend server, 16 concurrent streams: end to end (incl. prefill)", dtype,
                     f"{med([c[0] for c in conc]):.0f} tok/s"))
        rows.append(("local_backend server, 16 concurrent streams: aggregate decode", dtype,
                     f"{med([c[1] for c in conc]):.0f} tok/s"))
        rows.append(("local_backend server, single stream decode", dtype, f"{med(single):.0f} tok/s"))
        rows.append((f"local_backend server, TTFT of a {long_n}-token prompt while 15 streams decode",
                     dtype, f"{med(ttft) * 1000:.0f} ms"))
        print(rows[-4:], file=sys.stderr, flush=True)

    print(f"\nSmolLM2-135M-Instruct (embedded), {N_PROMPTS} prompts x {NEW_TOKENS} new tokens, greedy, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats}; server rows: streaming "
          f"HTTP (SSE) from a `python -m local_backend serve` subprocess\n")
    print("| what | dtype | median |")
    print("|---|---|---|")
    for what, dtype, value in rows:
        print(f"| {what} | {dtype} | {value} |")


if __name__ == "__main__":
    main()
