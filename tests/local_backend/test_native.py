"""The decode step's C kernels (local_backend/native.py): each against torch, the build's
cache and fallbacks, and the runner and engine on them (same tokens as torch's ops, and a
request's greedy output independent of its neighbours)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mistral.modeling_mistral import MistralRMSNorm

from local_backend import native
from local_backend.engine import EngineConfig, build_engine
from local_backend.models import cache_root, cpu_info, load_model
from local_backend.runner import ModelRunner
from tests.local_backend.conftest import greedy_alone_and_beside_others

DTYPES = [torch.float32, torch.bfloat16]
FLAGS = cpu_info()[1]


@pytest.fixture(scope="module")
def kernels() -> native.NativeKernels:
    # The test machine has a C compiler (make test runs here): no kernels is a failure, not a skip.
    got = native.load(torch.device("cpu"), cache_root() / "kernels", FLAGS)
    assert got is not None, "the native kernels did not build or load (see the log)"
    return got


def test_loading_the_kernels_leaves_this_process_floats_alone(kernels) -> None:
    """A shared object built with -ffast-math turns on flush-to-zero for the whole process
    when it loads (crtfastmath): subnormals would read as 0 everywhere, JSON numbers too."""
    tiny = sys.float_info.min
    assert tiny / 2 > 0 and float("4.9e-324") > 0
    assert torch.tensor([tiny], dtype=torch.float64).div(2).item() > 0


def test_a_kernel_that_flushes_denormals_gives_the_caller_its_float_mode_back(kernels) -> None:
    """silu_mul runs with denormals as zero (an Intel core's assists on them cost it 14x),
    in the calling thread's MXCSR: it must restore it, or this thread's floats change."""
    tiny = sys.float_info.min
    for dtype in (torch.float32, torch.bfloat16):
        kernels.silu_mul(torch.randn(4, 64).to(dtype))
        assert tiny / 2 > 0
        assert torch.tensor([tiny], dtype=torch.float64).div(2).item() > 0
        assert torch.tensor([1e-39], dtype=torch.float32).mul(1.0).item() > 0  # a float32 denormal survives


def attention_reference(q, k, v, start, end, scale: float) -> torch.Tensor:
    """fp64 SDPA, row by row, over [start, end) of each row's slot."""
    rows, heads, d = q.shape
    nk = k.shape[1]
    out = []
    for r in range(rows):
        s, e = int(start[r]), int(end[r])
        qq = q[r].double().view(nk, heads // nk, d)
        o = F.scaled_dot_product_attention(qq, k[r, :, s:e].double(), v[r, :, s:e].double(), scale=scale)
        out.append(o.reshape(heads * d))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 16), (8, 2, 128)])
def test_decode_attention_is_sdpa(kernels, dtype, heads, kv_heads, head_dim) -> None:
    gen = torch.Generator().manual_seed(heads * head_dim)
    rows, max_len = 5, 300
    k = torch.randn(rows + 2, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(rows + 2, kv_heads, max_len, head_dim, generator=gen).to(dtype)
    # q as the runner passes it: a strided view of the fused q/k projection.
    qk = torch.randn(rows, heads + kv_heads, head_dim, generator=gen).to(dtype)
    q = qk[:, :heads]
    end = torch.tensor([1, 7, 64, 300, 129])
    start = torch.tensor([0, 0, 0, 200, 1])  # the last two as a sliding window would cut them
    scale = head_dim**-0.5
    got = kernels.decode_attention(q, k, v, start, end, scale)
    assert got.shape == (rows, heads * head_dim) and got.dtype == dtype
    want = attention_reference(q, k, v, start, end, scale)
    # No worse than torch's own SDPA in the same dtype, against the same fp64 reference.
    sdpa = torch.stack(
        [
            F.scaled_dot_product_attention(
                q[r].view(kv_heads, -1, head_dim), k[r, :, s:e], v[r, :, s:e], scale=scale
            ).reshape(-1)
            for r, (s, e) in enumerate(zip(start.tolist(), end.tolist(), strict=True))
        ]
    )
    ours, theirs = float((got.double() - want).abs().max()), float((sdpa.double() - want).abs().max())
    assert ours <= max(1.5 * theirs, 1e-6), (ours, theirs)
    # A single key: the output is that value row.
    assert torch.equal(got[0].view(heads, head_dim), v[0, :, 0].repeat_interleave(heads // kv_heads, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_is_the_runners_rope_and_cache_write(kernels, dtype) -> None:
    from local_backend.runner import _rope

    gen = torch.Generator().manual_seed(4)
    rows, heads, kv_heads, d, max_len = 4, 9, 3, 64, 50
    qkv = torch.randn(rows, 1, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    cos, sin = torch.randn(rows, d, generator=gen).to(dtype), torch.randn(rows, d, generator=gen).to(dtype)
    k, v = (
        torch.zeros(rows + 1, kv_heads, max_len, d, dtype=dtype),
        torch.zeros(rows + 1, kv_heads, max_len, d, dtype=dtype),
    )
    positions = torch.tensor([0, 7, 49, 7])
    q = kernels.rope_store(qkv[:, 0], cos, sin, k, v, positions, heads)
    x = qkv.view(rows, 1, heads + 2 * kv_heads, d)
    want = _rope(x[:, :, : heads + kv_heads].float(), cos.float()[:, None, None], sin.float()[:, None, None])[:, 0]
    tol = 1e-6 if dtype == torch.float32 else 2**-7  # torch rounds each product in bf16; we round once
    torch.testing.assert_close(q.float(), want[:, :heads], atol=tol * 4, rtol=tol)
    at = torch.arange(rows)
    torch.testing.assert_close(k[at, :, positions].float(), want[:, heads:], atol=tol * 4, rtol=tol)
    assert torch.equal(v[at, :, positions], x[:, 0, heads + kv_heads :])
    written = torch.zeros(rows + 1, kv_heads, max_len, dtype=torch.bool)
    written[at, :, positions] = True
    assert not k[~written].any() and not v[~written].any()  # nothing else in the caches moved
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.rope_store(qkv[:, 0], cos, sin, k, v, torch.tensor([0, 1, 50, 2]), heads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_mistrals(kernels, dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    norm = MistralRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=gen) * 2)
    norm = norm.to(dtype)
    x = (torch.randn(3, 4, 576, generator=gen) * 3).to(dtype)
    got = kernels.rms_norm(x, norm.weight.detach(), 1e-5)
    want = norm(x).detach()
    assert got.shape == x.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    else:  # the same roundings: at most one bf16 step apart (the sum's order differs)
        assert float(((got.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)).max()) <= 2**-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_torchs(kernels, dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(2, 3, 2 * 1536, generator=gen) * 8).to(dtype)
    gate_up[0, 0, :4] = torch.tensor([-200.0, -90.0, 90.0, 0.0])  # exp's range at both ends
    got = kernels.silu_mul(gate_up)
    want = F.silu(gate_up[..., :1536]) * gate_up[..., 1536:]
    assert got.shape == (2, 3, 1536) and got.dtype == dtype and torch.isfinite(got).all()
    # bf16: exp's last bit can move silu's rounding by a step, and the product's with it (2 steps).
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_kernels_refuse_what_they_cannot_read(kernels) -> None:
    k = torch.zeros(3, 1, 8, 16)
    q = torch.zeros(2, 2, 16)
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.decode_attention(q, k, k, torch.tensor([0, 0]), torch.tensor([4, 9]), 0.25)
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.decode_attention(q, k, k, torch.tensor([3, 0]), torch.tensor([3, 4]), 0.25)  # empty range
    with pytest.raises(ValueError, match="contiguous"):
        kernels.decode_attention(q, k.transpose(2, 3), k, torch.tensor([0, 0]), torch.tensor([4, 4]), 0.25)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.rms_norm(torch.zeros(4, 6).t(), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="gate and up"):
        kernels.silu_mul(torch.zeros(2, 7))


#: What q4_matmul needs from the CPU (kernels.c compiles it in only for such a target).
Q4_CPU = {"avx512f", "avx512bw", "avx512_bf16"} <= FLAGS
needs_q4 = pytest.mark.skipif(not Q4_CPU, reason="this CPU has no AVX512-BF16, so q4_matmul is not built here")


def q4_blocks(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Q4_1 blocks as the GGUF stores them: q in 0..15, fp16 d and m per 32 inputs."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(n, k // 32, generator=gen) * 0.15).half().float()
    return q, d, m


def dequantized(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.double().view(n, k // 32, 32) * d.double()[..., None] + m.double()[..., None]).view(n, k)


def test_q4_matmul_is_built_where_the_cpu_has_avx512_bf16(kernels) -> None:
    assert kernels.has_q4 == Q4_CPU


def test_q4_matmul_runs_on_amx_tiles_where_the_cpu_has_them(kernels) -> None:
    """The kernels are built for this CPU (-march=native): with AMX's tiles and bf16 there,
    q4_matmul must have asked Linux for them and use them (its rows then cost little)."""
    assert kernels.amx == (Q4_CPU and {"amx_tile", "amx_bf16"} <= FLAGS)


@needs_q4
@pytest.mark.parametrize("rows", [1, 5, 16, 64])
def test_q4_matmul_is_the_product_with_the_dequantized_weights(kernels, rows) -> None:
    """Against fp64: no further off than oneDNN's bf16 GEMM on the weights dequantized to
    bf16 (what the runner multiplies without the kernel), which rounds each weight."""
    q, d, m = q4_blocks(48, 160, seed=rows)
    tiles = native.pack_q4(q, d, m)
    assert tiles is not None
    x = (torch.randn(rows, 160, generator=torch.Generator().manual_seed(7)) * 3).to(torch.bfloat16)
    want = x.double() @ dequantized(q, d, m).T
    got = kernels.q4_matmul(x, tiles)
    torch_bf16 = F.linear(x, dequantized(q, d, m).to(torch.bfloat16))
    assert got.shape == (rows, 48) and got.dtype == torch.bfloat16
    err, torch_err = (got.double() - want).abs().max(), (torch_bf16.double() - want).abs().max()
    assert err <= torch_err, (err, torch_err)
    assert err <= 2**-7 * want.abs().max()


@needs_q4
def test_q4_matmul_rows_do_not_depend_on_their_batch(kernels) -> None:
    """Greedy output must not depend on a request's neighbours: a row alone, first, last or
    in the middle of 16 gets the same bits."""
    tiles = native.pack_q4(*q4_blocks(64, 96, seed=1))
    assert tiles is not None
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    together = kernels.q4_matmul(x, tiles)
    alone = torch.cat([kernels.q4_matmul(x[r : r + 1], tiles) for r in range(16)])
    assert torch.equal(together, alone)
    assert torch.equal(kernels.q4_matmul(x[3:9], tiles), together[3:9])


@needs_q4
def test_q4_matmul_refuses_what_it_cannot_take(kernels) -> None:
    assert native.pack_q4(*q4_blocks(40, 64, seed=0)) is None  # 40 outputs: not tiles of 16
    assert native.pack_q4(torch.zeros(16, 48, dtype=torch.long), torch.ones(16, 1), torch.ones(16, 1)) is None
    tiles = native.pack_q4(*q4_blocks(16, 64, seed=0))
    assert tiles is not None
    with pytest.raises(ValueError, match="64 bf16 rows"):
        kernels.q4_matmul(torch.zeros(65, 64, dtype=torch.bfloat16), tiles)
    with pytest.raises(ValueError, match="64 bf16 rows"):
        kernels.q4_matmul(torch.zeros(2, 64), tiles)  # fp32
    with pytest.raises(ValueError, match="64 bf16 rows"):
        kernels.q4_matmul(torch.zeros(2, 32, dtype=torch.bfloat16), tiles)


def test_kernels_built_for_avx2_have_no_q4_matmul_and_the_runner_keeps_torchs_int4(tmp_path, monkeypatch) -> None:
    """An AVX2-only CPU (here: the build capped at x86-64-v3, as the benchmark caps torch)
    gets the other kernels and no q4_matmul; the runner then runs the 4-bit blocks on
    torch's int4 kernel."""
    import ctypes

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    path = native.build(tmp_path, FLAGS)
    assert path is not None
    capped = native.NativeKernels(native._bind(ctypes.CDLL(str(path))))
    assert not capped.has_q4 and native.self_check(capped)
    monkeypatch.setattr(native, "load", lambda *a: capped)
    lm = load_model("embedded", dtype="bfloat16")
    runner = ModelRunner(lm.model, max_slots=3, max_len=64, q4_layers=lm.q4_layers, native_kernels=True)
    assert runner.native is capped and runner.int4_max_rows == 4
    assert all(type(w).__name__ == "Int4Weight" for layer in runner.int4_layers for w in layer)


def test_build_is_cached_and_keyed_by_the_target(tmp_path: Path, monkeypatch) -> None:
    first = native.build(tmp_path, FLAGS)
    assert first is not None and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path, FLAGS) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # the emulated AVX2-only CPU: another object
    capped = native.build(tmp_path, FLAGS)
    assert capped is not None and capped != first
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no temporary left behind


def test_no_compiler_or_a_failing_one_means_torch(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.build(tmp_path / "a", FLAGS) is None
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.WARNING, logger="local_backend.native"):
        assert native.build(tmp_path / "b", FLAGS) is None
    assert "the build failed" in caplog.text and "cc: error: no" in caplog.text
    # The runner then decodes on torch's ops.
    monkeypatch.setattr(native, "load", lambda device, directory, cpu_flags: None)
    lm = load_model("embedded", dtype="float32")
    runner = ModelRunner(lm.model, max_slots=2, max_len=64, native_kernels=True)
    assert runner.native is None


def test_a_read_only_cache_means_torch_not_a_failed_start(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="local_backend.native"):
        assert native.build(blocker / "kernels", FLAGS) is None
    assert "the build failed" in caplog.text


@pytest.fixture(scope="module")
def portable_dir(tmp_path_factory) -> Path:
    """Every portable build, made by `python -m local_backend build-kernels --dir`."""
    import subprocess

    directory = tmp_path_factory.mktemp("portable")
    done = subprocess.run([sys.executable, "-m", "local_backend", "build-kernels", "--dir", str(directory)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = [Path(line).name for line in done.stdout.split()]
    assert names == [level.file_name() for level in native.PORTABLE]
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)
    return directory


def test_with_no_compiler_the_best_portable_build_the_cpu_runs_serves(portable_dir, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", str(portable_dir / "no-such-cc"))
    amx, v4_bf16, v4, v3 = native.PORTABLE
    assert native.build(portable_dir, amx.needs) == portable_dir / amx.file_name()
    assert native.build(portable_dir, v4_bf16.needs | {"sse4_2"}) == portable_dir / v4_bf16.file_name()
    assert native.build(portable_dir, v4.needs) == portable_dir / v4.file_name()  # AVX-512 without bf16
    assert native.build(portable_dir, v3.needs | {"avx512_bf16"}) == portable_dir / v3.file_name()
    with caplog.at_level(logging.INFO, logger="local_backend.native"):
        assert native.build(portable_dir, v3.needs - {"avx2"}) is None  # no level this CPU runs
    assert "no portable build for this CPU" in caplog.text
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # torch capped at AVX2: no AVX-512 build either
    assert native.build(portable_dir, v4_bf16.needs) == portable_dir / v3.file_name()


def test_a_portable_build_of_other_source_is_never_loaded(portable_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    for level in native.PORTABLE:
        stale = tmp_path / level.file_name()
        stale.write_bytes((portable_dir / level.file_name()).read_bytes())
    source = tmp_path / "kernels.c"
    source.write_text(native.SOURCE.read_text() + "\n/* another version */\n")
    monkeypatch.setattr(native, "SOURCE", source)
    assert native.build(tmp_path, native.PORTABLE[0].needs) is None


def test_the_portable_build_this_cpu_gets_passes_the_self_check(portable_dir, monkeypatch) -> None:
    """...and has q4_matmul exactly where the CPU has AVX512-BF16; the runner then uses it."""
    monkeypatch.setenv("CC", str(portable_dir / "no-such-cc"))
    loaded = native.load(torch.device("cpu"), portable_dir, FLAGS)  # builds nothing: no compiler
    assert loaded is not None, "this CPU has AVX2 (the test machines do): a portable build must serve it"
    assert loaded.has_q4 == (native.PORTABLE[1].needs <= FLAGS)
    assert loaded.amx == (native.PORTABLE[0].needs <= FLAGS)
    monkeypatch.setattr(native, "load", lambda *a: loaded)
    lm = load_model("embedded", dtype="bfloat16")
    runner = ModelRunner(lm.model, max_slots=3, max_len=64, q4_layers=lm.q4_layers, native_kernels=True)
    assert runner.native is loaded
    assert isinstance(runner.int4_layers[0][0], native.Q4Tiles) == loaded.has_q4


def test_build_kernels_without_a_compiler_says_so(tmp_path) -> None:
    import os
    import subprocess

    done = subprocess.run([sys.executable, "-m", "local_backend", "build-kernels", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CC": str(tmp_path / "no-such-cc")})
    assert done.returncode == 1 and "needs a C compiler" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_kernels_that_disagree_with_torch(tmp_path: Path, monkeypatch, caplog) -> None:
    source = tmp_path / "kernels.c"  # the same source with RMSNorm's weight left out
    source.write_text(native.SOURCE.read_text().replace("* LOAD(w[i]));", ");"))
    monkeypatch.setattr(native, "SOURCE", source)
    with caplog.at_level(logging.WARNING, logger="local_backend.native"):
        assert native.load(torch.device("cpu"), tmp_path / "kernels", FLAGS) is None
    assert "disagreed with torch" in caplog.text


def embedded_runners(dtype: str, native_kernels: bool) -> ModelRunner:
    """The embedded model's runner as the server builds it, 16 rows prefilled at different lengths."""
    lm = load_model("embedded", dtype=dtype)
    runner = ModelRunner(
        lm.model, max_slots=17, max_len=512, q4_layers=lm.q4_layers, fp16_weights=lm.fp16_weights,
        native_kernels=native_kernels,
    )  # fmt: skip
    assert (runner.native is not None) == native_kernels
    for slot in range(16):
        runner.prefill(slot, list(range(100, 120 + 9 * slot)), 0)
    return runner


TOKENS = torch.randint(200, 5000, (16,), generator=torch.Generator().manual_seed(3))
POSITIONS = torch.tensor([20 + 9 * slot for slot in range(16)])


def test_fp32_decodes_the_same_tokens_on_native_kernels(kernels) -> None:
    off, on = embedded_runners("float32", False), embedded_runners("float32", True)
    for rows in (16, 1):
        want, got = off.decode(TOKENS[:rows], POSITIONS[:rows]), on.decode(TOKENS[:rows], POSITIONS[:rows])
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert float((got - want).abs().max()) <= 1e-3  # the same arithmetic up to summation order


def test_bf16_on_native_kernels_is_as_close_to_fp32_as_torchs_ops(kernels) -> None:
    """bf16 roundings compound over 30 layers, so tokens may flip at near ties either way;
    what must hold is that the kernels (q4_matmul too, where built) are no further from the
    fp32 logits than torch is."""
    reference = embedded_runners("float32", False)
    off, on = embedded_runners("bfloat16", False), embedded_runners("bfloat16", True)
    assert on.int4_max_rows == (16 if kernels.has_q4 else 4)
    # One forward of 16 rows, and 16 forwards of one row (each token in turn at slot 0's
    # position 20): one row's error is one sample, which lands either side of torch's by
    # chance (0.14 against 0.05 for row 0 on a Sapphire Rapids, before any change here).
    for batches in ([(TOKENS, POSITIONS)], [(TOKENS[i : i + 1], POSITIONS[:1]) for i in range(16)]):
        ref = torch.cat([reference.decode(t, p) for t, p in batches])
        torch_err = (torch.cat([off.decode(t, p) for t, p in batches]) - ref).abs()
        native_err = (torch.cat([on.decode(t, p) for t, p in batches]) - ref).abs()
        assert float(native_err.mean()) <= 1.2 * float(torch_err.mean()), (native_err.mean(), torch_err.mean())
        assert float(native_err.max()) <= 1.5 * float(torch_err.max()), (native_err.max(), torch_err.max())


PROMPTS = [
    "What is the capital of France?", "Write a short story about the ocean.", "Name three rivers of Europe.",
    "Explain photosynthesis briefly.", "Summarize this list: item1 is number 1. item2 is number 2.", "Hi",
    "Translate 'good morning' to German.", "What is 17 times 23?",
]  # fmt: skip


def test_bf16_prompts_on_native_norms_and_silu_are_as_close_to_fp32_as_torchs(kernels) -> None:
    """A prompt's forward runs its RMSNorms and SiLU on the kernels too (RoPE and attention
    stay torch's). The kernels' RMSNorm rounds as transformers' MistralRMSNorm does (the
    normalised row to bf16, then times the weight), F.rms_norm rounds once: the logits move
    by a near-constant offset, which softmax ignores, so what is compared is the error
    around each row's mean, over eight chat prompts."""
    lm = load_model("embedded", dtype="float32")
    reference = ModelRunner(lm.model, max_slots=2, max_len=256, pack_weights=False)
    bf16 = load_model("embedded", dtype="bfloat16")
    off = ModelRunner(bf16.model, max_slots=2, max_len=256, q4_layers=bf16.q4_layers)
    bf16 = load_model("embedded", dtype="bfloat16")
    on = ModelRunner(bf16.model, max_slots=2, max_len=256, q4_layers=bf16.q4_layers, native_kernels=True)

    def centred(err: torch.Tensor) -> float:
        return float((err - err.mean()).abs().mean())

    torch_errs, native_errs = [], []
    for text in PROMPTS:
        ids = lm.tokenizer.encode_chat([{"role": "user", "content": text}])
        want = reference.prefill(0, ids, 0)
        torch_errs.append(centred(off.prefill(0, ids, 0).float() - want))
        native_errs.append(centred(on.prefill(0, ids, 0).float() - want))
    assert sum(native_errs) <= 1.25 * sum(torch_errs), (native_errs, torch_errs)


async def test_greedy_output_does_not_depend_on_neighbours_on_native_kernels(kernels) -> None:
    lm = load_model("embedded", dtype="bfloat16")
    engine = build_engine(
        lm.model, lm.tokenizer.decode, lm.tokenizer.eos_token_ids, EngineConfig(max_batch=4, max_model_len=256),
        lm.q4_layers, lm.fp16_weights, native_kernels=True,
    )  # fmt: skip
    assert engine.runner.native is not None
    await greedy_alone_and_beside_others(engine, lm.tokenizer, "Name three rivers of Europe.")


def test_the_server_decodes_on_native_kernels_by_default() -> None:
    from local_backend.cli import parse_args

    assert parse_args(["serve", "--model", "embedded"]).native_kernels == "auto"
    assert parse_args(["serve", "--model", "embedded", "--native-kernels", "off"]).native_kernels == "off"
