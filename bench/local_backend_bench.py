"""Benchmark: transformers baselines vs. the local_backend server, same prompts, one run.

    python bench/local_backend_bench.py [--repeats 3] [--dtypes float32,bfloat16] [--isa native|avx2]

Prints the CPU (model, the flags that pick the fast paths, torch's kernel level) and
then a markdown table of medians with the issue's ratios. Per dtype, in rounds
(baselines and server interleaved, so a noisy neighbour hits both alike): transformers
in this process, in the same dtype as the server (sequential `generate()`, one static
left-padded batch of 16 through `generate()`), then our engine as it is deployed: a
`python -m local_backend serve` subprocess driven over HTTP by streaming clients
(httpx, in this process): 16 concurrent streams, one stream alone, and the time to
first token of a ~500-token prompt alone and while 15 other streams decode.
`--generate-batch` adds transformers' continuous batching `generate_batch()` (float32).

The server runs as deployed, with `--int4 auto --fp16-weights auto --native-kernels auto`:
in bf16 it decodes from the GGUF's own 4-bit weights (local_backend/quantized.py; up to 16
rows on the native q4_matmul where the CPU has AVX512-BF16, else up to 4 on torch's int4),
in fp32 it keeps the weights in fp16 (local_backend/fp16.py), and where there is a C
compiler a decode step's RoPE and attention, and every RMSNorm and SiLU, run as C
kernels built at start (local_backend/native.py); "same dtype" is the dtype of its
activations, residual stream and KV cache. `--also-server "ARGS"` (repeatable) adds a
server started with those extra arguments in the same rounds, e.g. `--also-server
"--int4 off --fp16-weights off"` for the dequantized weights, the baseline's exactly.

`--isa avx2` reruns this script with torch's kernels (ATEN_CPU_CAPABILITY), oneDNN
(ONEDNN_MAX_CPU_ISA), MKL and FBGEMM capped at AVX2, for the server too: the code
paths an AVX2-only CPU takes (no AVX-512, no native bf16), on this CPU's cores and
memory. It is not a real AVX2-only machine; label its figures as capped.

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

AVX2_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def _isa_from_argv() -> str:
    for i, a in enumerate(sys.argv):
        if a == "--isa" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if a.startswith("--isa="):
            return a.split("=", 1)[1]
    return "native"


# The caps must be in the environment before torch (and its libraries) load: re-exec.
if _isa_from_argv() == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_CAP.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_CAP})

import httpx  # noqa: E402
import torch  # noqa: E402

from local_backend.models import (  # noqa: E402
    CPU_FEATURES,
    EMBEDDED_SERVED_NAME as SERVED,
    cpu_has_native_bf16,
    cpu_info,
    load_model,
)

N_PROMPTS, NEW_TOKENS = 16, 64
TOPICS = ["the ocean", "a lighthouse", "volcanoes", "a chess game", "bread baking", "the moon", "a lost key",
          "winter in Oslo", "honeybees", "a jazz club", "desert travel", "robots", "a storm", "old maps",
          "a tiny dragon", "autumn leaves"]


def cpu_line() -> str:
    """The CPU, the flags that pick the fast paths, and what torch makes of them."""
    name, flags = cpu_info()
    shown = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FEATURES)
    amx = "yes" if flags & {"amx_tile", "amx_bf16", "amx_int8"} else "no"
    cap = {k: v for k, v in os.environ.items() if k in AVX2_CAP}
    return (f"CPU: {name}, {os.cpu_count()} cores; flags: {shown} amx={amx}; torch kernels: "
            f"{torch.backends.cpu.get_cpu_capability()}, native bf16 used: {'yes' if cpu_has_native_bf16() else 'no'}"
            + (f"; CAPPED at AVX2 ({' '.join(f'{k}={v}' for k, v in cap.items())})" if cap else ""))


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


async def engine_ttft_alone(client, url, long_text) -> float:
    lm: dict = {}
    t = time.perf_counter()
    await stream(client, url, long_text, 4, lm)
    return lm["first"] - t


async def engine_ttft_under_load(client, url, texts, long_text) -> tuple[float, float]:
    """-> (TTFT of the long prompt, longest gap between two chunks of any decoding stream meanwhile)."""
    marks = [dict() for _ in range(15)]
    gaps: list[float] = [0.0]

    async def watched(text: str, m: dict) -> int:
        body = {"model": SERVED, "messages": [{"role": "user", "content": text}], "max_tokens": 400,
                "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if not (chunk["choices"] and chunk["choices"][0]["delta"].get("content")):
                    continue  # the role chunk comes before any token
                if "first" in m and m.get("probe_started") and not m.get("stop"):
                    gaps.append(now - m["last"])
                m.setdefault("first", now)
                m["last"] = now
                if m.get("stop"):
                    break
        return 0

    tasks = [asyncio.create_task(watched(x, m)) for x, m in zip(texts[:15], marks)]
    while not all("first" in m for m in marks):
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)  # all 15 are decoding now
    lm: dict = {}
    for m in marks:
        m["probe_started"] = True
    t = time.perf_counter()
    probe = asyncio.create_task(stream(client, url, long_text, 4, lm))
    while "first" not in lm:
        await asyncio.sleep(0.001)
    ttft = lm["first"] - t
    for m in marks:
        m["stop"] = True
    await asyncio.gather(probe, *tasks)
    return ttft, max(gaps)


def start_server(dtype: str, port: int, threads: int | None, root: Path = ROOT,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "local_backend", "serve", "--model", "embedded", "--dtype", dtype,
           "--port", str(port), "--max-batch", "16", "--max-model-len", "2048", "--log-level", "warning", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)


async def server_round(url: str, texts: list[str], long_text: str) -> dict[str, float]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await stream(client, url, texts[0], 8, {})  # warm-up
        e2e, decode = await engine_concurrent(client, url, texts)
        single = await engine_single(client, url, texts[0])
        alone = await engine_ttft_alone(client, url, long_text)
        loaded, gap = await engine_ttft_under_load(client, url, texts, long_text)
    return {"e2e": e2e, "decode": decode, "single": single, "ttft_alone": alone, "ttft_loaded": loaded,
            "max_gap": gap}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="dtypes to run our engine (and the baselines) with")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: cap torch/oneDNN/MKL/FBGEMM at AVX2 (the paths an AVX2-only CPU takes)")
    ap.add_argument("--sequential-prompts", type=int, default=4,
                    help="sequential generate() is slow; tok/s is per prompt, so a subset suffices")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--generate-batch", action="store_true", help="add transformers' generate_batch() (float32)")
    ap.add_argument("--engine-threads", type=int, default=None, help="--threads for the server")
    ap.add_argument("--compare-with", type=Path, default=None,
                    help="another checkout (its local_backend/): its server is measured too, in the same rounds")
    ap.add_argument("--also-server", action="append", default=[], metavar="ARGS",
                    help='also measure a server started with these extra arguments, same rounds (repeatable), '
                         'e.g. "--int4 off --fp16-weights off"')
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(cpu_line(), flush=True)
    dtypes = args.dtypes.split(",")

    fp32 = load_model("embedded", dtype="float32")
    ps = prompts(fp32.tokenizer)
    long, long_n = long_text(fp32.tokenizer)
    models = {"float32": fp32.model}
    for d in dtypes:
        if d not in models and not args.skip_baselines:
            models[d] = load_model("embedded", dtype=d).model
    servers = {}
    # label -> (checkout, extra server arguments)
    roots: dict[str, tuple[Path, tuple[str, ...]]] = {"": (ROOT, ())}
    if args.compare_with is not None:
        roots[" (before)"] = (args.compare_with.resolve(), ())
    for extra in args.also_server:
        roots[f" ({extra})"] = (ROOT, tuple(extra.split()))
    try:
        for d in dtypes:
            for label, (root, extra) in roots.items():
                port = free_port()
                proc = start_server(d, port, args.engine_threads, root, extra)
                servers[d + label] = (proc, f"http://127.0.0.1:{port}")
        res: dict[tuple[str, str], list[float]] = {}
        for rnd in range(args.repeats):
            for d in dtypes:
                if not args.skip_baselines:
                    m = models[d]
                    res.setdefault((d, "seq"), []).append(sequential_generate(m, ps[: args.sequential_prompts]))
                    res.setdefault((d, "static"), []).append(static_batch_generate(m, ps, pad=0))
                    if args.generate_batch and d == "float32":
                        res.setdefault((d, "generate_batch"), []).append(hf_generate_batch(m, ps))
                for label in roots:
                    for k, v in asyncio.run(server_round(servers[d + label][1], texts(), long)).items():
                        res.setdefault((d, k + label), []).append(v)
                print(f"round {rnd + 1} {d}: " + ", ".join(f"{k}={v[-1]:.3g}" for (dd, k), v in res.items() if dd == d),
                      file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\n{cpu_line()}\n")
    print(f"SmolLM2-135M-Instruct (embedded), {N_PROMPTS} prompts x {NEW_TOKENS} new tokens, greedy, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats} interleaved rounds; server rows: "
          "streaming HTTP (SSE) from a `python -m local_backend serve` subprocess\n")
    print("| what | dtype | median |")
    print("|---|---|---|")
    for d in dtypes:
        def row(what: str, key: str, unit: str = "tok/s", scale: float = 1.0, d: str = d) -> None:
            if (d, key) in res:
                print(f"| {what} | {d} | {med(res[(d, key)]) * scale:.0f} {unit} |")

        row(f"transformers sequential generate() ({args.sequential_prompts} prompts, one at a time)", "seq")
        row("transformers generate(), one static padded batch of 16", "static")
        row("transformers generate_batch() (continuous batching, paged)", "generate_batch")
        row("local_backend server, 16 concurrent streams: end to end (incl. prefill)", "e2e")
        row("local_backend server, 16 concurrent streams: aggregate decode", "decode")
        row("local_backend server, single stream decode", "single")
        row(f"local_backend server, TTFT of a {long_n}-token prompt alone", "ttft_alone", "ms", 1000)
        row(f"local_backend server, TTFT of a {long_n}-token prompt while 15 streams decode", "ttft_loaded", "ms",
            1000)
        row("local_backend server, longest gap between two chunks of a decoding stream meanwhile", "max_gap", "ms",
            1000)
        if args.compare_with is not None:
            b = " (before)"
            row(f"before ({args.compare_with}): 16 concurrent streams: end to end", "e2e" + b)
            row("before: 16 concurrent streams: aggregate decode", "decode" + b)
            row("before: single stream decode", "single" + b)
            row(f"before: TTFT of a {long_n}-token prompt alone", "ttft_alone" + b, "ms", 1000)
            row(f"before: TTFT of a {long_n}-token prompt while 15 streams decode", "ttft_loaded" + b, "ms", 1000)
            row("before: longest gap between two chunks meanwhile", "max_gap" + b, "ms", 1000)
        for extra in args.also_server:
            o = f" ({extra})"
            row(f"`{extra}`: 16 concurrent streams: aggregate decode", "decode" + o)
            row(f"`{extra}`: single stream decode", "single" + o)
    print("\nRatios (issue 16 targets: 16 streams >= 2x the static batch, single stream >= 2x sequential):\n")
    for d in dtypes:
        def ratio(a: str, b: str, d: str = d) -> str:
            return f"{med(res[(d, a)]) / med(res[(d, b)]):.2f}x" if (d, a) in res and (d, b) in res else "n/a"

        print(f"- {d}: 16-stream aggregate decode / static batch = {ratio('decode', 'static')}; "
              f"single stream / sequential generate() = {ratio('single', 'seq')}; "
              f"TTFT under 15 streams / alone = {ratio('ttft_loaded', 'ttft_alone')}")
        for extra in args.also_server:
            o = f" ({extra})"
            print(f"  - with `{extra}`: {ratio('decode' + o, 'static')}; {ratio('single' + o, 'seq')}")


if __name__ == "__main__":
    main()
