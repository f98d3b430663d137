"""Mistral forward pass over a pre-allocated, slot-indexed KV cache.

Why not `model(...)` with a transformers Cache: every sequence in a continuous batch
sits at a different position, which transformers' StaticCache (one shared
cache_position) cannot express, and a DynamicCache per sequence has to be stacked
and split every step. Here the weights come from the loaded `MistralForCausalLM`
(q/k/v and gate/up fused into one matmul each, so a layer is 4 GEMMs) and K and V
are one pre-allocated tensor each, `[layers, slots, kv_heads, max_len, head_dim]`.
Running sequences occupy slots 0..B-1 so a decode step reads a plain view
`cache[layer, :B, :, :L]`; rows of different lengths are masked. RoPE comes from
the model's own rotary module, so every rope variant transformers supports is
honoured.

CPU GEMMs (where oneDNN supports the dtype): the weights are reordered once into
oneDNN's blocked layout (`mkldnn._reorder_linear_weight`) and multiplied with
`mkldnn._linear_pointwise`, because plain `F.linear` re-lays-out (bf16) or goes through
an unpacked sgemm (fp32) on every call. Measured on the 2-core EPYC box over the 121
GEMMs of one SmolLM2 decode step (distinct weights, so from memory as in the model):
fp32 44 -> 25 ms at batch 1 and 66 -> 32 ms at batch 16 (with oneDNN capped at AVX2:
45 -> 26 and 70 -> 48); bf16 18 -> 14 and 28 -> 19 ms. fp32 is packed for the batch size
the engine decodes (the layout depends on it; any batch still works); packing changes
fp32 rounding in the last bits (|diff| ~1e-4 on logits-sized sums), so
`pack_weights=False` keeps the F.linear path for comparisons with transformers bit for bit.

Given the checkpoint's 4-bit blocks (the embedded GGUF's, `quantized.py`), a forward of
at most INT4_MAX_ROWS token rows runs the layers' GEMMs on them instead: decoding reads
4.5 bits a weight, not 16 or 32. In bf16 with native kernels that have `q4_matmul`
(AVX512-BF16), those GEMMs run on it, up to Q4_NATIVE_MAX_ROWS rows: it unpacks each
block once for all rows, where torch's int4 kernel is slower than oneDNN beyond 4 (with
AMX it multiplies a block for all rows in one tile product, so 16 rows cost about what 1
does).
Those limits were measured on one CPU; `check_crossover` lowers them on a CPU where the
packed GEMMs clearly win sooner.

Asked for fp16 weights (the embedded model in fp32, where FBGEMM runs: `fp16.py`), every
GEMM of every forward multiplies fp32 activations with the weights stored in fp16, and
neither the packed fp32 weights nor the 4-bit ones are used.

Asked for native kernels (`native.py`: C, built at start where there is a compiler), a
decode forward (one token a row) runs its RoPE and K/V cache write and attention through
them, and every forward its RMSNorms and SiLU; prompts' RoPE and attention, and machines
without them, run on torch's ops.
"""

from __future__ import annotations

import logging
import math
import mmap
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import torch
import torch.nn.functional as F

from . import native
from .fp16 import Fp16Weight, fp16_usable
from .models import cache_root, cpu_info
from .quantized import Int4Weight, Q4Blocks, int4_usable

if TYPE_CHECKING:
    from transformers import MistralForCausalLM

log = logging.getLogger("local_backend.runner")

#: Up to this many token rows in a forward, the layers' GEMMs use the 4-bit weights when
#: there are any; above it, the packed ones. The 120 layer GEMMs on the 2-core EPYC box
#: (bench/NOTES.md), int4 against packed, ms: bf16 4.3 / 11.2 at 1 row, 6.5 / 9.5 at 4,
#: 11.5 / 9.5 at 6, 21.7 / 14.7 at 16; fp32 5.0 / 19.7 at 1, 18.1 / 22.2 at 12, 22.9 /
#: 25.6 at 16, and with the kernels capped at AVX2 8.5 / 19.6, 27.1 / 30.1 and 34.8 /
#: 34.2. So bf16 switches at 4 rows and fp32 decodes every batch (up to 16) in int4
#: (unless it has fp16 weights, which are faster at 16 rows on both ISAs: fp16.py).
INT4_MAX_ROWS = {torch.bfloat16: 4, torch.float32: 16}
#: ...and with native.q4_matmul (bf16). The 120 layer GEMMs, q4_matmul / oneDNN packed
#: bf16 / torch int4, ms (`bench/local_kernels.py crossover --dtype bfloat16`): 3.3 / 11.0 /
#: 4.6 at 1 row, 4.9 / 9.9 / 7.6 at 4, 12.7 / 14.1 / 22.7 at 16; 25.1 / 22.3 at 32. In
#: place, a 16-row decode step went from 26.5 to 22.5 ms (bench/NOTES.md).
Q4_NATIVE_MAX_ROWS = 16
#: The row counts at which `check_crossover` times the 4-bit GEMMs against the packed ones,
#: and how much slower the 4-bit ones must be there to give way: a margin over timing noise,
#: so that a restart on the same machine keeps the same crossover (the closest call on the
#: 2-core EPYC box, bf16 at 16 rows, is 12.7 against 14.1 ms).
CROSSOVER_ROWS = (1, 2, 4, 8, 16)
CLEAR_LOSS = 1.25


def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packed GEMM is available for `dtype` and agrees with F.linear on this machine."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        w = torch.randn(64, 32, dtype=dtype)
        x = torch.randn(3, 32, dtype=dtype)
        packed = torch.ops.mkldnn._linear_pointwise(
            x, torch.ops.mkldnn._reorder_linear_weight(w, 3 if dtype == torch.float32 else None), None, "none", [], ""
        )
        return bool(torch.allclose(packed.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2))
    except (AttributeError, RuntimeError):
        return False


#: A GEMM's weight as the runner keeps it: a plain or oneDNN-packed tensor, or fp16-packed.
Weight = torch.Tensor | Fp16Weight
#: ...or one from the checkpoint's 4-bit blocks.
AnyWeight = Weight | Int4Weight | native.Q4Tiles


class _Layer(TypedDict):
    """One decoder layer's weights: norms, fused q/k/v and gate/up, output and down projections."""

    ln1: torch.Tensor
    wqkv: Weight
    bqkv: torch.Tensor | None
    wo: Weight
    ln2: torch.Tensor
    wgu: Weight
    wd: Weight


class ModelRunner:
    """Owns fused weights and the KV cache; knows nothing about requests."""

    def __init__(
        self,
        model: MistralForCausalLM,
        max_slots: int,
        max_len: int,
        pack_weights: bool = True,
        q4_layers: list[dict[str, Q4Blocks]] | None = None,
        fp16_weights: bool = False,
        native_kernels: bool = False,
    ) -> None:
        cfg = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.n_heads // self.n_kv
        self.eps = cfg.rms_norm_eps
        self.window: int | None = getattr(cfg, "sliding_window", None)
        self.vocab_size = cfg.vocab_size
        self.max_slots = max_slots
        self.max_len = max_len
        self.scale = self.head_dim**-0.5
        self.rotary: torch.nn.Module = model.model.rotary_emb
        self.fp16 = fp16_weights and self.dtype == torch.float32 and fp16_usable(self.device)
        self.packed = not self.fp16 and pack_weights and _can_pack(self.device, self.dtype)
        # The checkpoint's own 4-bit blocks, where the int4 kernel runs (see quantized.py).
        use_int4 = (
            not self.fp16
            and q4_layers is not None
            and len(q4_layers) == len(model.model.layers)
            and self.dtype in INT4_MAX_ROWS
            and int4_usable(self.device)
        )
        self.int4_max_rows = INT4_MAX_ROWS.get(self.dtype, 0)
        self.native = (
            native.load(self.device, cache_root() / "kernels", cpu_info()[1])
            if native_kernels and self.dtype in native.SUFFIX
            else None
        )
        # The same four GEMMs of each layer (q/k/v, o, gate/up, down) from those blocks.
        self.int4_layers: list[tuple[Int4Weight | native.Q4Tiles, ...]] = []
        names = ("wqkv", "wo", "wgu", "wd")
        if use_int4 and q4_layers is not None and self.dtype == torch.bfloat16 and self.native and self.native.has_q4:
            tiles = [tuple(native.pack_q4(q[n].q, q[n].d, q[n].m) for n in names) for q in q4_layers]
            if all(t is not None for layer in tiles for t in layer):
                self.int4_layers = [tuple(t for t in layer if t is not None) for layer in tiles]
                self.int4_max_rows = Q4_NATIVE_MAX_ROWS
        if use_int4 and q4_layers is not None and not self.int4_layers:
            self.int4_layers = [tuple(Int4Weight.of(q[n]) for n in names) for q in q4_layers]
        kernel = "int4"
        if self.int4 and isinstance(self.int4_layers[0][0], native.Q4Tiles):
            kernel = "native q4_matmul on AMX tiles" if self.native and self.native.amx else "native q4_matmul"
        log.info(
            "GEMMs: %s%s (%s); decode RoPE and attention, every RMSNorm and SiLU: %s",
            f"{kernel} (the GGUF's Q4_1 blocks) for the layers up to {self.int4_max_rows} rows, " if self.int4 else "",
            "fp16 weights (FBGEMM)" if self.fp16 else "oneDNN packed" if self.packed else "F.linear",
            self.dtype,
            "native kernels" if self.native else "torch",
        )
        # fp32's blocked layout depends on the batch (M) it is packed for; bf16's does not.
        # (Measured: a hint of 16 was as fast as 1 at batch 1 and 1.5x faster at batch 16.)
        hint = min(16, max(1, max_slots - 1)) if self.dtype == torch.float32 else None

        def pack(w: torch.Tensor) -> Weight:
            if self.fp16:
                return Fp16Weight.of(w)
            if not self.packed:
                return w
            packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(w, hint)
            return packed

        self.layers: list[_Layer] = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
            self.layers.append(
                {
                    "ln1": layer.input_layernorm.weight.detach(),
                    "wqkv": pack(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()),
                    "bqkv": torch.cat(biases).detach() if all(b is not None for b in biases) else None,
                    "wo": pack(a.o_proj.weight.detach()),
                    "ln2": layer.post_attention_layernorm.weight.detach(),
                    "wgu": pack(torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach()),
                    "wd": pack(m.down_proj.weight.detach()),
                }
            )
            # Drop the unfused (or unpacked) copies so big checkpoints are not held twice.
            for p in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj) + (
                (a.o_proj, m.down_proj) if self.packed or self.fp16 else ()
            ):
                p.weight = None
        self.embed: torch.Tensor = model.model.embed_tokens.weight.detach()
        self.norm: torch.Tensor = model.model.norm.weight.detach()
        self.lm_head = pack(model.lm_head.weight.detach())
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.intermediate_size: int = cfg.intermediate_size

        shape = (len(self.layers), max_slots, self.n_kv, max_len, self.head_dim)
        self.k_cache = _zeroed(shape, self.dtype, self.device)
        self.v_cache = _zeroed(shape, self.dtype, self.device)
        self._arange = torch.arange(max_len, device=self.device)

    @property
    def int4(self) -> bool:
        """Whether small forwards run on the checkpoint's 4-bit blocks."""
        return bool(self.int4_layers)

    @torch.inference_mode()
    def check_crossover(self, rounds: int = 5) -> dict[int, tuple[float, float]]:
        """Time the layers' GEMMs on the 4-bit and on the packed weights at each of
        CROSSOVER_ROWS up to int4_max_rows, and lower int4_max_rows to below the first row
        count where the 4-bit ones are CLEAR_LOSS times slower -> {rows: (4-bit ms, packed ms)},
        medians of `rounds` interleaved passes over every layer (distinct weights, so from
        memory as in a forward).

        Why: INT4_MAX_ROWS and Q4_NATIVE_MAX_ROWS are crossovers measured on one CPU
        (AVX512-BF16, no AMX). Where oneDNN has AMX, or memory is faster, the packed GEMMs
        may win at fewer rows; only a clear loss moves the crossover, and only down.
        """
        if not self.int4:
            return {}
        packed = [(layer["wqkv"], layer["wo"], layer["wgu"], layer["wd"]) for layer in self.layers]
        hidden = self.embed.shape[1]
        widths = (hidden, self.q_size, hidden, self.intermediate_size)  # each GEMM's input width
        times: dict[int, tuple[float, float]] = {}
        for rows in (r for r in CROSSOVER_ROWS if r <= self.int4_max_rows):
            xs = [torch.randn(rows, k, dtype=self.dtype, device=self.device) for k in widths]
            self._time_gemms(self.int4_layers, xs), self._time_gemms(packed, xs)  # warm up
            q, p = [], []
            for _ in range(rounds):
                q.append(self._time_gemms(self.int4_layers, xs))
                p.append(self._time_gemms(packed, xs))
            times[rows] = (statistics.median(q), statistics.median(p))
        below = 0
        for rows, (q_ms, p_ms) in times.items():
            if q_ms > CLEAR_LOSS * p_ms:
                self.int4_max_rows = below
                break
            below = rows
        log.info(
            "4-bit / packed GEMMs of the layers on this CPU, ms: %s; the 4-bit ones serve forwards of up to %d rows",
            ", ".join(f"{q_ms:.1f} / {p_ms:.1f} at {rows}" for rows, (q_ms, p_ms) in times.items()),
            self.int4_max_rows,
        )
        return times

    def _time_gemms(self, layers: Sequence[Sequence[AnyWeight]], xs: list[torch.Tensor]) -> float:
        """Milliseconds for every layer's four GEMMs on inputs `xs`."""
        t0 = time.perf_counter()
        for weights in layers:
            for w, x in zip(weights, xs, strict=True):
                self._linear(x, w)
        return (time.perf_counter() - t0) * 1e3

    # ------------------------------------------------------------------ cache slots

    # Invariant: the whole cache holds finite values. A decode step reads every row up to
    # the longest row's length, and a masked entry still multiplies into the output as
    # 0 * value, so it must not be NaN. The cache starts as zeros (_zeroed) and every write
    # (prefill, decode, move) stores finite K/V.

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's KV to another slot (keeps running slots contiguous)."""
        self.k_cache[:, dst, :, :length].copy_(self.k_cache[:, src, :, :length])
        self.v_cache[:, dst, :, :length].copy_(self.v_cache[:, src, :, :length])

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of slots 0..B-1. tokens/positions: [B] -> logits [B, vocab]."""
        b = tokens.shape[0]
        kv_len = int(positions.max()) + 1
        x = self.embed[tokens].unsqueeze(1)  # [B, 1, hidden]
        pos = positions.unsqueeze(1)  # [B, 1]
        h = self._forward(x, pos, slice(0, b), kv_len)
        return self._logits(h[:, -1])

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        """Feed a prompt chunk into `slot` at positions start.. -> logits of its last token."""
        return self.prefill_rows(slot, [tokens], [start])[0]

    @torch.inference_mode()
    def prefill_rows(self, first_slot: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Prompt chunks of several sequences in one forward: row i goes into slot
        first_slot + i at positions starts[i].. -> [rows, vocab] logits of each row's last token.

        Rows are padded to the longest chunk. A pad token's K/V lands past its row's real
        tokens (finite, and overwritten before it is ever attended to: a row writes position
        p before it attends to p), clamped below max_len; its outputs are dropped.
        """
        t = max(map(len, chunks))
        ids = torch.tensor([c + [0] * (t - len(c)) for c in chunks], device=self.device)
        pos = torch.tensor(starts, device=self.device).unsqueeze(1) + torch.arange(t, device=self.device)
        pos = pos.clamp_(max=self.max_len - 1)
        kv_len = int(pos.max()) + 1
        h = self._forward(self.embed[ids], pos, slice(first_slot, first_slot + len(chunks)), kv_len)
        last = torch.tensor([len(c) - 1 for c in chunks], device=self.device)
        return self._logits(h[torch.arange(len(chunks), device=self.device), last])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self._rms_norm(h, self.norm)
        return self._linear(h, self.lm_head).float()

    def _linear(self, x: torch.Tensor, w: AnyWeight, b: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, native.Q4Tiles):
            assert self.native is not None  # Q4Tiles are made only where it has q4_matmul
            y = self.native.q4_matmul(x, w)
            return y if b is None else y + b
        if isinstance(w, (Int4Weight, Fp16Weight)):
            return w(x) if b is None else w(x) + b
        if self.packed:
            # torch.ops resolves ops at run time: the call is typed as returning Any.
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")  # type: ignore[no-any-return]
        return F.linear(x, w, b)

    def _mask(self, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[B, 1, G*T, L] bool (for T == 1: [B, 1, 1, L], broadcast over the G query rows).

        Causal, per-row length, optional sliding window.
        """
        j = self._arange[:kv_len]
        p = pos.unsqueeze(-1)  # [B, T, 1]
        allowed = j <= p
        if self.window is not None and kv_len > self.window:
            allowed &= j > p - self.window
        b, t, _ = allowed.shape
        if t == 1:
            return allowed.unsqueeze(1)  # broadcasts over the G query rows
        return allowed.unsqueeze(1).expand(b, self.group, t, kv_len).reshape(b, 1, self.group * t, kv_len)

    def _forward(self, x: torch.Tensor, pos: torch.Tensor, slots: slice, kv_len: int) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = self.rotary(x, pos)  # [B, T, D]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, D]
        # One decoding row attends to its whole prefix: no mask (a cheaper SDPA path).
        no_mask = b == 1 and t == 1 and (self.window is None or kv_len <= self.window)
        kern = self.native if t == 1 else None
        mask = None if no_mask or kern else self._mask(pos, kv_len)
        if kern:  # row r attends to [start, end): causal, and the sliding window if any
            end = pos[:, 0] + 1
            start = (end - self.window).clamp_(min=0) if self.window is not None else torch.zeros_like(end)
        nk, g, d = self.n_kv, self.group, self.head_dim
        # K/V writes: one index_copy_ into the flattened cache per layer (advanced-index
        # assignment cost 146 us per call at 16 rows, index_copy_ 5 us). Row r of the batch is
        # slot slots.start + r; flat row = (slot * nk + head) * max_len + position.
        # (Not needed where the native kernels write the cache.)
        if not kern:
            heads = torch.arange(nk, device=self.device)
            base = (torch.arange(slots.start, slots.stop, device=self.device) * nk).view(b, 1, 1)
            flat_idx = ((base + heads) * self.max_len + pos.unsqueeze(-1)).view(-1)  # [B*T*nk]
        # Few rows: the 4-bit weights (memory-bound, 4.5 bits a weight read); more: the packed ones.
        small = self.int4 and b * t <= self.int4_max_rows
        for i, layer in enumerate(self.layers):
            wqkv, wo, wgu, wd = (
                self.int4_layers[i] if small else (layer["wqkv"], layer["wo"], layer["wgu"], layer["wd"])
            )
            qkv = self._linear(self._rms_norm(x, layer["ln1"]), wqkv, layer["bqkv"])
            kc, vc = self.k_cache[i], self.v_cache[i]
            if kern:  # RoPE with the K/V write, then attention: one kernel each
                kcs, vcs = kc[slots.start :], vc[slots.start :]
                q1 = kern.rope_store(qkv[:, 0], cos[:, 0, 0], sin[:, 0, 0], kcs, vcs, pos[:, 0], self.n_heads)
                o = kern.decode_attention(q1, kcs, vcs, start, end, self.scale).view(b, t, self.q_size)
            else:
                # RoPE on q and k in one pass: they are adjacent in the fused projection.
                qk = _rope(qkv[..., : self.q_size + self.kv_size].view(b, t, self.n_heads + nk, d), cos, sin)
                q, k = qk[:, :, : self.n_heads], qk[:, :, self.n_heads :]
                v = qkv[..., self.q_size + self.kv_size :]
                kc.view(-1, d).index_copy_(0, flat_idx, k.reshape(-1, d))
                vc.view(-1, d).index_copy_(0, flat_idx, v.reshape(-1, d))
                # GQA without repeat_kv: fold each kv head's query group into the query axis.
                q = q.view(b, t, nk, g, d).permute(0, 2, 3, 1, 4).reshape(b, nk, g * t, d)
                o = F.scaled_dot_product_attention(
                    q, kc[slots, :, :kv_len], vc[slots, :, :kv_len], attn_mask=mask, scale=self.scale
                )
                o = o.view(b, nk, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, self.q_size)
            x = x + self._linear(o, wo)
            gate_up = self._linear(self._rms_norm(x, layer["ln2"]), wgu)
            x = x + self._linear(self._silu_mul(gate_up), wd)
        return x

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.native:  # prompts too: one kernel wherever a row is normalised
            return self.native.rms_norm(x.contiguous(), weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's silu(gate) * up of the fused gate/up projection."""
        if self.native:
            return self.native.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache that costs nothing until used.

    On CPU it is an anonymous memory mapping: the kernel hands out zero pages lazily, and
    reading a page never written maps the shared zero page (no memory, no memset). Before,
    the cache was torch.empty and a decode step zeroed every row up to the longest row's
    length whenever that grew: when a 493-token prompt joined 15 short rows, the next step
    took 179 ms instead of 105 (fp32; bf16 92 vs 51), measured in bench/NOTES.md (issue 16).
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # frombuffer keeps `buf` alive for as long as the tensor lives.
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
