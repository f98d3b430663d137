"""The embedded GGUF's 4-bit weights through torch's int4 kernel (local_backend/quantized.py):
the blocks are the loaded weights, the kernel computes their product, the runner uses them
up to its row limit (4 in bf16, 16 in fp32) and the packed weights above it, that limit comes
down at start where the packed GEMMs are clearly faster, and a request's greedy output does not
depend on its neighbours while the batch stays within that limit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from local_backend import runner as runner_mod
from local_backend.engine import EngineConfig, build_engine
from local_backend.models import embedded_gguf_path, load_model
from local_backend.quantized import Int4Weight, Q4Blocks, int4_usable, read_q4_layers
from local_backend.runner import INT4_MAX_ROWS, ModelRunner
from tests.local_backend.conftest import greedy_alone_and_beside_others


def q4_1(w: torch.Tensor) -> Q4Blocks:
    """Quantize like llama.cpp's Q4_1: per 32 inputs, m = min, d = (max - min) / 15 (fp16)."""
    out, inp = w.shape
    groups = w.float().view(out, inp // 32, 32)
    m = groups.amin(-1).half().float()
    d = ((groups.amax(-1) - m) / 15).clamp_min(1e-8).half().float()
    q = ((groups - m[..., None]) / d[..., None]).round().clamp(0, 15).to(torch.int32).view(out, inp)
    return Q4Blocks(q, d, m)


def quantized_tiny(tiny_model_dir, dtype: str):
    """The tiny model with every layer weight replaced by its Q4_1 rounding, and those blocks."""
    lm = load_model(str(tiny_model_dir), dtype=dtype)
    layers = []
    for layer in lm.model.model.layers:
        a, m = layer.self_attn, layer.mlp
        blocks = {p: q4_1(p.weight.detach()) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                         m.gate_proj, m.up_proj, m.down_proj)}
        with torch.no_grad():
            for p, b in blocks.items():
                p.weight.copy_(b.dequantized().to(p.weight.dtype))
        layers.append({"wqkv": Q4Blocks.stack([blocks[a.q_proj], blocks[a.k_proj], blocks[a.v_proj]]),
                       "wo": blocks[a.o_proj],
                       "wgu": Q4Blocks.stack([blocks[m.gate_proj], blocks[m.up_proj]]),
                       "wd": blocks[m.down_proj]})
    return lm, layers


def test_int4_weight_computes_the_dequantized_product() -> None:
    gen = torch.Generator().manual_seed(1)
    blocks = Q4Blocks(torch.randint(0, 16, (96, 128), generator=gen), torch.rand(96, 4, generator=gen) * 0.02,
                      -torch.rand(96, 4, generator=gen) * 0.1)
    x = torch.randn(2, 3, 128, generator=gen)
    want = F.linear(x, blocks.dequantized())
    for dtype in (torch.bfloat16, torch.float32):  # fp32 activations go in rounded to bf16, come back fp32
        got = Int4Weight.of(blocks)(x.to(dtype))
        assert got.shape == (2, 3, 96) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def test_int4_on_cpus_only() -> None:
    assert int4_usable(torch.device("cpu"))
    assert not int4_usable(torch.device("cuda"))


def test_gguf_blocks_are_the_weights_transformers_loads() -> None:
    """Dequantized, the GGUF's blocks (q and k rows un-permuted, then fused) equal the
    converted checkpoint's weights exactly."""
    lm = load_model("embedded", dtype="float32")
    cfg = lm.model.config
    layers = read_q4_layers(embedded_gguf_path(), cfg.num_attention_heads, cfg.num_key_value_heads)
    assert layers is not None and len(layers) == cfg.num_hidden_layers
    assert lm.q4_layers is not None and len(lm.q4_layers) == len(layers)
    for i in (0, cfg.num_hidden_layers - 1):
        a, m = lm.model.model.layers[i].self_attn, lm.model.model.layers[i].mlp
        want = {"wqkv": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), "wo": a.o_proj.weight,
                "wgu": torch.cat([m.gate_proj.weight, m.up_proj.weight]), "wd": m.down_proj.weight}
        for name, weight in want.items():
            assert torch.equal(layers[i][name].dequantized(), weight.detach()), (i, name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_runner_uses_int4_up_to_its_row_limit(tiny_model_dir, monkeypatch, dtype) -> None:
    lm, q4 = quantized_tiny(tiny_model_dir, dtype)
    limit = INT4_MAX_ROWS[getattr(torch, dtype)]
    runner = ModelRunner(lm.model, max_slots=limit + 2, max_len=64, q4_layers=q4)
    ref_lm, _ = quantized_tiny(tiny_model_dir, dtype)
    ref = ModelRunner(ref_lm.model, max_slots=limit + 2, max_len=64)  # the same weights, packed only
    assert runner.int4 and not ref.int4 and runner.int4_max_rows == limit
    calls = []
    real_call = Int4Weight.__call__
    monkeypatch.setattr(Int4Weight, "__call__", lambda self, x: calls.append(x.shape) or real_call(self, x))
    for r in (runner, ref):
        for slot in range(limit + 1):
            r.prefill(slot, [5 + slot] + [6] * 16, 0)  # 17 tokens a row: packed GEMMs
    assert calls == []
    for rows in (1, limit, limit + 1):
        tokens, positions = torch.arange(20, 20 + rows), torch.full((rows,), 17)
        calls.clear()
        got, want = runner.decode(tokens, positions), ref.decode(tokens, positions)
        assert len(calls) == (4 * len(q4) if rows <= limit else 0), rows
        # Same weights, other rounding: the logits agree to bf16 precision and rank alike.
        torch.testing.assert_close(got, want, atol=0.15, rtol=0.05)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


async def test_int4_greedy_output_is_the_same_alone_and_beside_others(tiny_model_dir) -> None:
    """Up to the row limit every decode step runs int4, so a neighbour changes nothing."""
    lm, q4 = quantized_tiny(tiny_model_dir, "bfloat16")
    limit = INT4_MAX_ROWS[torch.bfloat16]
    cfg = EngineConfig(max_batch=limit, max_queue=8, max_model_len=256, prefill_chunk=16, prefill_chunk_idle=64)
    eng = build_engine(lm.model, lm.tokenizer.decode, lm.tokenizer.eos_token_ids, cfg, q4)
    assert eng.runner.int4
    await greedy_alone_and_beside_others(eng, lm.tokenizer, "The quick brown fox jumps over the lazy dog.")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_off_keeps_the_dequantized_weights(dtype) -> None:
    lm = load_model("embedded", dtype=dtype, int4=False)
    assert lm.q4_layers is None
    assert not runner_mod.ModelRunner(lm.model, max_slots=2, max_len=16, q4_layers=lm.q4_layers).int4


def test_unreadable_blocks_cost_speed_not_the_start(monkeypatch, caplog) -> None:
    """If the 4-bit blocks cannot be read, the model still loads and serves its dequantized weights."""
    from local_backend import models

    def broken(*args, **kwargs):
        raise ValueError("unexpected tensor layout")

    monkeypatch.setattr(models, "read_q4_layers", broken)
    with caplog.at_level("WARNING", logger="local_backend.models"):
        lm = load_model("embedded", dtype="float32")
    assert lm.q4_layers is None
    assert "not using the GGUF's 4-bit weights" in caplog.text and "unexpected tensor layout" in caplog.text
    assert not ModelRunner(lm.model, max_slots=2, max_len=16, q4_layers=lm.q4_layers).int4


@pytest.fixture
def embedded_fp32():
    """The embedded model in fp32 with its 4-bit blocks (torch's int4 kernel up to 16 rows);
    a fresh load for each runner, which takes the model's weights over."""
    return load_model("embedded", dtype="float32")


def slowed_int4(monkeypatch, from_rows: int) -> list[int]:
    """Make the int4 GEMMs 0.5 ms slower a call from `from_rows` rows (about 3x the packed
    GEMMs' time on the embedded model); -> the row counts of the int4 calls made."""
    import time

    rows: list[int] = []
    real_call = Int4Weight.__call__

    def call(self, x):
        n = x.numel() // x.shape[-1]
        rows.append(n)
        if n >= from_rows:
            time.sleep(0.0005)
        return real_call(self, x)

    monkeypatch.setattr(Int4Weight, "__call__", call)
    return rows


def crossover_by_rule(times: dict[int, tuple[float, float]], start: int) -> int:
    """check_crossover's rule, restated: below the first row count the 4-bit GEMMs clearly lose."""
    below = 0
    for rows, (q_ms, p_ms) in sorted(times.items()):
        if q_ms > runner_mod.CLEAR_LOSS * p_ms:
            return below
        below = rows
    return start


def test_crossover_check_times_both_gemms_and_keeps_a_crossover_they_agree_with(embedded_fp32) -> None:
    runner = ModelRunner(embedded_fp32.model, max_slots=17, max_len=64, q4_layers=embedded_fp32.q4_layers)
    assert runner.int4 and runner.int4_max_rows == INT4_MAX_ROWS[torch.float32] == 16
    times = runner.check_crossover(rounds=3)
    assert list(times) == [1, 2, 4, 8, 16]
    assert all(q_ms > 0 and p_ms > 0 for q_ms, p_ms in times.values())
    assert runner.int4_max_rows == crossover_by_rule(times, 16)
    # Where the 4-bit GEMMs read 4.5 bits a weight against 32, one row is never a clear loss.
    assert times[1][0] * runner_mod.CLEAR_LOSS < times[1][1] and runner.int4_max_rows >= 1


def test_crossover_check_lowers_it_where_the_packed_gemms_clearly_win(embedded_fp32, monkeypatch) -> None:
    runner = ModelRunner(embedded_fp32.model, max_slots=17, max_len=64, q4_layers=embedded_fp32.q4_layers)
    calls = slowed_int4(monkeypatch, from_rows=8)
    times = runner.check_crossover(rounds=3)
    assert sorted(set(calls)) == [1, 2, 4, 8, 16]  # the timing ran the int4 kernel at each row count
    assert times[8][0] > runner_mod.CLEAR_LOSS * times[8][1]
    assert runner.int4_max_rows == 4
    layers = len(embedded_fp32.q4_layers)
    for rows, int4_calls in ((4, 4 * layers), (5, 0)):  # forwards now switch above 4 rows
        calls.clear()
        runner.decode(torch.arange(20, 20 + rows), torch.zeros(rows, dtype=torch.long))
        assert len(calls) == int4_calls, rows


def test_crossover_check_turns_the_4_bit_gemms_off_where_they_always_lose(embedded_fp32, monkeypatch) -> None:
    runner = ModelRunner(embedded_fp32.model, max_slots=17, max_len=64, q4_layers=embedded_fp32.q4_layers)
    calls = slowed_int4(monkeypatch, from_rows=1)
    runner.check_crossover(rounds=3)
    assert runner.int4_max_rows == 0
    calls.clear()
    runner.decode(torch.tensor([20]), torch.tensor([0]))
    assert calls == []


def test_crossover_check_has_nothing_to_do_without_4_bit_weights(tiny_model_dir) -> None:
    runner = ModelRunner(load_model(str(tiny_model_dir), dtype="float32").model, max_slots=2, max_len=16)
    assert runner.check_crossover() == {} and not runner.int4


@pytest.mark.parametrize("pin", [None, 2])
def test_the_server_checks_the_crossover_at_start_unless_pinned(pin, caplog) -> None:
    from local_backend.cli import make_loader

    load = make_loader("embedded", dtype="float32", fp16=False, max_batch=4, max_model_len=64, int4_max_rows=pin)
    with caplog.at_level("INFO", logger="local_backend.runner"):
        runner = load().engine.runner
    assert runner.int4
    assert ("4-bit / packed GEMMs of the layers on this CPU" in caplog.text) == (pin is None)
    if pin is not None:
        assert runner.int4_max_rows == pin


def test_int4_max_rows_flag() -> None:
    from local_backend.cli import parse_args

    assert parse_args(["serve"]).int4_max_rows is None
    assert parse_args(["serve", "--int4-max-rows", "0"]).int4_max_rows == 0
    assert parse_args(["serve", "--int4-max-rows", "64"]).int4_max_rows == 64
    for bad in ("65", "-1", "many"):
        with pytest.raises(SystemExit):
            parse_args(["serve", "--int4-max-rows", bad])
