"""Where a local-backend decode step's time goes, and what the kernel alternatives cost.

    python bench/local_kernels.py gemm [--dtype float32|bfloat16]
    python bench/local_kernels.py attention [--dtype ...]
    python bench/local_kernels.py ablate [--dtype ...]
    python bench/local_kernels.py accuracy
    python bench/local_kernels.py crossover [--dtype ...]
    python bench/local_kernels.py ops [--dtype ...]

`gemm`: the 121 GEMMs of one SmolLM2-135M decode step (q/k/v, o, gate/up, down per
layer, and the tied lm_head), each with its own weights so every call reads them from
memory as the model does, at batch 1 and 16: oneDNN packed (what the runner uses),
F.linear, MKL packed (fp32), and torch's int4 weight-only kernel with per-32-block
scale and zero (the layout of the shipped Q4_1 GGUF, so it would run those weights
without loss; its 120 layer GEMMs only).
`attention`: one decode attention call for 16 rows (3 kv heads, 3 queries each, as
the runner folds GQA), SDPA against matmul formulations.
`ablate`: the runner's own decode step on the embedded model at 1 and 16 rows, then
with one part left out at a time (outputs are wrong; only the time is read), so the
difference is what that part costs in place.
`crossover`: the 120 layer GEMMs at 1-256 rows, int4 (the runner's `Int4Weight`, which
rounds fp32 inputs to bf16; up to 16 rows) against oneDNN packed in the given dtype, in
fp32 the weights in fp16 (`Fp16Weight`, FBGEMM), and in bf16 the native `q4_matmul`
where it is built (AVX512-BF16; up to 64 rows): where `INT4_MAX_ROWS` and
`Q4_NATIVE_MAX_ROWS` come from, and why fp32 runs on fp16 weights.
`ops`: torch's profiler over ten 16-row decode steps of the runner built as the server
builds it (4-bit blocks, fp16 weights and native kernels where they apply), at 71 keys:
self time and calls per ATen op, so "the rest of the step" has names and counts (the
native kernels are ctypes calls, which the profiler does not show).
`accuracy`: the embedded model through the runner in fp32 and bf16, each with the
dequantized weights packed and with the GGUF's int4 blocks (one row at a time, so int4
is used; fp32 then rounds the GEMM inputs to bf16), fp32 on fp16 weights, and bf16 on
the native kernels (q4_matmul on the blocks where it is built): the
perplexity of an English paragraph and the first token of the README's question (that
one comes from the prompt's forward, over more than 4 rows: packed weights in every run).

Prints the CPU with every table (the figures depend on it; see bench/NOTES.md).
Medians; run on an idle box (`flock /tmp/bench.lock ...`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from local_backend import native
from local_backend.models import CPU_FEATURES, cache_root, cpu_info

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads / 3 kv heads of 64, 30 layers, vocab 49152.
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LM_HEAD = (49152, 576)


def median_ms(fn: Callable[[], object], repeats: int = 9, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def gemm(dtype: torch.dtype) -> None:
    shapes = LAYER_SHAPES * 30 + [LM_HEAD]
    weights = [torch.randn(o, i, dtype=dtype) * 0.02 for o, i in shapes]
    hint = 16 if dtype == torch.float32 else None
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in weights]
    q4 = [_int4(o, i, dtype) for o, i in shapes[:-1]]
    print("| rows | oneDNN packed | F.linear | MKL packed | int4 weight-only (120 layer GEMMs) |")
    print("|---|---|---|---|---|")
    for rows in (1, 16):
        x = {k: torch.randn(rows, k, dtype=dtype) for k in (576, 1536)}
        cols = [
            _each(shapes, x, lambda a, j: torch.ops.mkldnn._linear_pointwise(a, packed[j], None, "none", [], "")),
            _each(shapes, x, lambda a, j: F.linear(a, weights[j])),
            _mkl(shapes, weights, x, rows) if dtype == torch.float32 else float("nan"),
            _each(
                shapes[:-1],
                x,
                lambda a, j: torch.ops.aten._weight_int4pack_mm_for_cpu(a, q4[j][0], 32, q4[j][1]),
                repeats=3 if dtype == torch.float32 else 9,
            ),
        ]
        print(f"| {rows} | " + " | ".join(f"{c:.1f} ms" for c in cols) + " |")


def _each(
    shapes: list[tuple[int, int]],
    x: dict[int, torch.Tensor],
    call: Callable[[torch.Tensor, int], object],
    repeats: int = 9,
) -> float:
    """ms for one call per shape, in order (each with its own weights, read from memory)."""
    return median_ms(lambda: [call(x[shape[1]], j) for j, shape in enumerate(shapes)], repeats=repeats)


def _mkl(shapes: list[tuple[int, int]], weights: list[torch.Tensor], x: dict[int, torch.Tensor], rows: int) -> float:
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
    return _each(shapes, x, lambda a, j: torch.ops.mkl._mkl_linear(a, mkl[j], weights[j], None, rows))


def _int4(out_f: int, in_f: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Q4_1-style weights (w = d*q + m per 32 inputs) in torch's int4 layout."""
    q = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32)
    d = torch.rand(out_f, in_f // 32) * 0.01
    m = -torch.rand(out_f, in_f // 32) * 0.05
    # torch's kernel computes (q - 8) * scale + zero: scale = d, zero = m + 8d.
    scale_zero = torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().to(dtype)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scale_zero


def attention(dtype: torch.dtype) -> None:
    rows, kv_heads, group, head_dim, max_len = 16, 3, 3, 64, 2048
    k_cache = torch.randn(rows + 1, kv_heads, max_len, head_dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    print("| kv length | SDPA, bool mask | SDPA, additive mask | matmul in fp32 | matmul in dtype, fp32 softmax |")
    print("|---|---|---|---|---|")
    for length in (64, 128, 512):
        q = torch.randn(rows, kv_heads, group, head_dim, dtype=dtype)
        pos = torch.randint(length // 2, length, (rows,))
        pos[0] = length - 1
        allowed = (torch.arange(length) <= pos[:, None])[:, None, None, :]
        k, v = k_cache[:rows, :, :length], v_cache[:rows, :, :length]
        us = [_attention_us(kind, q, k, v, allowed, dtype) for kind in ("sdpa", "sdpa-additive", "fp32", "low")]
        print(f"| {length} | " + " | ".join(f"{u:.0f} us" for u in us) + " |")


def _attention_us(
    kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype
) -> float:
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    if kind == "sdpa":
        mask = allowed
    elif kind == "sdpa-additive":
        mask = additive.to(dtype)

    def call() -> torch.Tensor:
        if kind.startswith("sdpa"):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)
        if kind == "fp32":
            s = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(0.125).add_(additive)
            return torch.matmul(s.softmax(-1), v.float()).to(dtype)
        s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(0.125).add_(additive)
        return torch.matmul(s.softmax(-1).to(dtype), v)

    return median_ms(lambda: [call() for _ in range(50)], repeats=7) * 1e3 / 50


def ablate(dtype_name: str) -> None:
    from local_backend import runner as R
    from local_backend.models import load_model

    lm = load_model("embedded", dtype=dtype_name)
    runner = R.ModelRunner(lm.model, max_slots=17, max_len=2048)
    for slot in range(16):
        runner.prefill(slot, list(range(100, 160 + slot)), 0)
    # The runner calls these through module attributes, so leaving a part out is a swap of one name.
    stand_ins = {
        "rope": ("_rope", R, lambda x, cos, sin: x),
        "norm": ("rms_norm", F, lambda x, *a, **k: x),
        "attention": ("scaled_dot_product_attention", F, lambda q, k, v, **kw: q),
        "silu": ("silu", F, lambda x, *a, **k: x),
    }
    originals = {name: getattr(mod, attr) for name, (attr, mod, _fake) in stand_ins.items()}

    def step(rows: int) -> float:
        tokens = torch.randint(100, 1000, (rows,))
        positions = torch.arange(100, 100 + rows)
        return median_ms(lambda: runner.decode(tokens, positions), repeats=15, warmup=3)

    print("| left out | 1 row, ms/step | 16 rows, ms/step |")
    print("|---|---|---|")
    for part in ["(nothing)", *stand_ins]:
        for name, (attr, mod, fake) in stand_ins.items():
            setattr(mod, attr, fake if name == part else originals[name])
        print(f"| {part} | {step(1):.1f} | {step(16):.1f} |")
    for name, (attr, mod, _fake) in stand_ins.items():
        setattr(mod, attr, originals[name])


def crossover(dtype: torch.dtype) -> None:
    from local_backend.fp16 import Fp16Weight
    from local_backend.quantized import Int4Weight, Q4Blocks

    shapes = LAYER_SHAPES * 30
    blocks = [
        Q4Blocks(torch.randint(0, 16, (o, i)), torch.rand(o, i // 32) * 0.01, -torch.rand(o, i // 32) * 0.05)
        for o, i in shapes
    ]
    hint = 16 if dtype == torch.float32 else None
    packed = [torch.ops.mkldnn._reorder_linear_weight(b.dequantized().to(dtype), hint) for b in blocks]
    int4 = [Int4Weight.of(b) for b in blocks]
    # fp32 only: FBGEMM's GEMM on the weights in fp16 (local_backend/fp16.py), what fp32 runs.
    fp16 = [Fp16Weight.of(b.dequantized()) for b in blocks] if dtype == torch.float32 else []
    # bf16 where the native kernels have it: q4_matmul on the same blocks (local_backend/native.py).
    kernels = native.load(torch.device("cpu"), cache_root() / "kernels", cpu_info()[1])
    q4 = [native.pack_q4(b.q, b.d, b.m) for b in blocks] if dtype == torch.bfloat16 and kernels and kernels.has_q4 else []
    print("| rows | int4 | oneDNN packed |" + (" fp16 weights (FBGEMM) |" if fp16 else "")
          + (" native q4_matmul |" if q4 else ""))
    print("|---|---|---|" + ("---|" if fp16 else "") + ("---|" if q4 else ""))
    for rows in (1, 2, 4, 6, 8, 12, 16, 32, 64, 256):
        x = {k: torch.randn(rows, k, dtype=dtype) for k in (576, 1536)}
        a = _each(shapes, x, lambda v, j: int4[j](v)) if rows <= 16 else math.nan
        b = _each(shapes, x, lambda v, j: torch.ops.mkldnn._linear_pointwise(v, packed[j], None, "none", [], ""))
        c = f" {_each(shapes, x, lambda v, j: fp16[j](v)):.1f} ms |" if fp16 else ""
        if q4:
            c += f" {_each(shapes, x, lambda v, j: kernels.q4_matmul(v, q4[j])):.1f} ms |" if rows <= 64 else " n/a |"
        print(f"| {rows} | {a:.1f} ms | {b:.1f} ms |{c}")


PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower. Locally nicknamed the "
    "Iron Lady, it was constructed from 1887 to 1889 as the centerpiece of the 1889 World's Fair."
)


def accuracy() -> None:
    from local_backend import runner as R
    from local_backend.models import load_model

    print("| weights | perplexity | first token of the README question at temperature 0.2 |")
    print("|---|---|---|")
    for label, dtype, int4, fp16, kernels in (
        ("fp32 packed", "float32", False, False, False),
        ("fp32 int4 (bf16 GEMM inputs)", "float32", True, False, False),
        ("fp32 fp16 weights (FBGEMM)", "float32", False, True, False),
        ("bf16 packed", "bfloat16", False, False, False),
        ("bf16 int4", "bfloat16", True, False, False),
        ("bf16 native kernels (q4_matmul where built)", "bfloat16", True, False, True),
    ):
        lm = load_model("embedded", dtype=dtype, int4=int4, fp16=fp16)
        runner = R.ModelRunner(lm.model, max_slots=2, max_len=512, q4_layers=lm.q4_layers,
                               fp16_weights=lm.fp16_weights, native_kernels=kernels)
        assert runner.int4 == int4 and runner.fp16 == fp16
        if kernels:
            label += f": {type(runner.int4_layers[0][0]).__name__} up to {runner.int4_max_rows} rows"
        tok = lm.tokenizer.tok  # type: ignore[attr-defined]
        ids = tok(PARAGRAPH)["input_ids"]
        logits, nll = runner.prefill(0, ids[:1], 0), 0.0
        for i in range(1, len(ids)):  # one row a step: the path a lone stream takes
            nll -= float(torch.log_softmax(logits.float(), -1)[ids[i]])
            logits = runner.decode(torch.tensor([ids[i]]), torch.tensor([i]))[0]
        question = lm.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        probs = torch.softmax(runner.prefill(1, question, 0).float() / 0.2, -1)
        top = torch.topk(probs, 2)
        first = ", ".join(
            f"{tok.decode([int(t)])!r} {float(p):.3f}" for p, t in zip(top.values, top.indices, strict=True)
        )
        print(f"| {label} | {math.exp(nll / (len(ids) - 1)):.3f} ({len(ids) - 1} tokens) | {first} |")


def ops(dtype_name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    from local_backend import runner as R
    from local_backend.models import load_model

    lm = load_model("embedded", dtype=dtype_name)
    runner = R.ModelRunner(lm.model, max_slots=17, max_len=2048, q4_layers=lm.q4_layers,
                           fp16_weights=lm.fp16_weights, native_kernels=True)
    for slot in range(16):
        runner.prefill(slot, list(range(100, 160)), 0)
    tokens, positions = torch.randint(100, 1000, (16,)), torch.full((16,), 70)
    for _ in range(5):
        runner.decode(tokens, positions)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            runner.decode(tokens, positions)
    print("ten steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["gemm", "attention", "ablate", "accuracy", "crossover", "ops"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    name, flags = cpu_info()
    shown = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FEATURES)
    print(f"CPU: {name}; {shown}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}\n")
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    if args.what == "gemm":
        gemm(dtype)
    elif args.what == "attention":
        attention(dtype)
    elif args.what == "accuracy":
        accuracy()
    elif args.what == "crossover":
        crossover(dtype)
    elif args.what == "ops":
        ops(args.dtype)
    else:
        ablate(args.dtype)


if __name__ == "__main__":
    main()
