"""fp32 GEMMs on fp16-stored weights (local_backend/fp16.py): the kernel computes the
product of fp32 activations with the weights rounded to fp16, the embedded model in fp32
gets it and nothing else does, the runner uses it for every GEMM of every forward, and a
request's greedy output does not depend on its neighbours."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from local_backend.engine import EngineConfig, build_engine
from local_backend.fp16 import Fp16Weight, fp16_usable
from local_backend.models import load_model
from local_backend.quantized import Int4Weight
from local_backend.runner import ModelRunner
from tests.local_backend.conftest import greedy_alone_and_beside_others
from tests.local_backend.test_int4 import quantized_tiny


def test_fp16_weight_is_the_fp32_product_with_weights_rounded_to_fp16() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(2, 3, 128, generator=gen)
    got = Fp16Weight.of(w)(x)
    assert got.shape == (2, 3, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w.half().float()), atol=1e-5, rtol=1e-5)
    # ...and not the product with the fp32 weights, at this scale of rounding.
    assert not torch.allclose(got, F.linear(x, w), atol=1e-7, rtol=0)


def test_fp16_on_cpus_with_fbgemm_only() -> None:
    assert fp16_usable(torch.device("cpu")) == ("fbgemm" in torch.backends.quantized.supported_engines)
    assert not fp16_usable(torch.device("cuda"))


def test_only_the_embedded_model_in_fp32_gets_fp16_weights(tiny_model_dir) -> None:
    if not fp16_usable(torch.device("cpu")):
        pytest.fail("this x86 torch build has no FBGEMM: the fp32 fast path is missing")
    assert load_model("embedded", dtype="float32").fp16_weights
    assert not load_model("embedded", dtype="float32", fp16=False).fp16_weights
    assert not load_model("embedded", dtype="bfloat16").fp16_weights
    # Someone else's fp32 checkpoint keeps its weights exact.
    assert not load_model(str(tiny_model_dir), dtype="float32").fp16_weights


def test_runner_runs_every_gemm_on_fp16_weights(tiny_model_dir, monkeypatch) -> None:
    lm, q4 = quantized_tiny(tiny_model_dir, "float32")
    runner = ModelRunner(lm.model, max_slots=18, max_len=64, q4_layers=q4, fp16_weights=True)
    assert runner.fp16 and not runner.int4 and not runner.packed  # fp16 wins over the 4-bit blocks
    ref_lm, _ = quantized_tiny(tiny_model_dir, "float32")
    with torch.no_grad():
        for name, p in ref_lm.model.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:  # the embedding lookup stays fp32
                p.copy_(p.half().float())  # the same fp16-rounded GEMM weights, through F.linear
    ref = ModelRunner(ref_lm.model, max_slots=18, max_len=64, pack_weights=False)
    calls = []
    real_call = Fp16Weight.__call__
    monkeypatch.setattr(Fp16Weight, "__call__", lambda self, x: calls.append(x.shape) or real_call(self, x))
    monkeypatch.setattr(Int4Weight, "__call__", lambda self, x: pytest.fail("int4 used beside fp16 weights"))
    gemms = 4 * len(lm.model.model.layers) + 1  # the layers' four, and the LM head
    for r in (runner, ref):
        for slot in range(17):
            r.prefill(slot, [5 + slot] + [6] * 16, 0)
    assert len(calls) == 17 * gemms
    for rows in (1, 4, 16, 17):
        tokens, positions = torch.arange(20, 20 + rows), torch.full((rows,), 17)
        calls.clear()
        got, want = runner.decode(tokens, positions), ref.decode(tokens, positions)
        assert len(calls) == gemms, rows
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_bf16_never_uses_fp16_weights(tiny_model_dir) -> None:
    lm = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert not ModelRunner(lm.model, max_slots=2, max_len=16, fp16_weights=True).fp16


async def test_fp16_greedy_output_is_the_same_alone_and_beside_others() -> None:
    """Every forward runs the same kernel, so a neighbour changes nothing (the embedded model)."""
    lm = load_model("embedded", dtype="float32")
    cfg = EngineConfig(max_batch=4, max_queue=8, max_model_len=256, prefill_chunk=16, prefill_chunk_idle=64)
    eng = build_engine(lm.model, lm.tokenizer.decode, lm.tokenizer.eos_token_ids, cfg, lm.q4_layers,
                       lm.fp16_weights)
    assert eng.runner.fp16
    await greedy_alone_and_beside_others(eng, lm.tokenizer, "Name three rivers in Europe.")
