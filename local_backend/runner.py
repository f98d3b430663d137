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

bfloat16 on CPU (where oneDNN supports it): the GEMM weights are reordered once
into oneDNN's blocked layout (`mkldnn._reorder_linear_weight`) and multiplied with
`mkldnn._linear_pointwise`, because plain `F.linear` re-lays-out the weight on
every call. float32 keeps `F.linear`: it is the reference path the tests compare
with transformers bit for bit, and packing changes fp32 rounding.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypedDict

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import MistralForCausalLM

log = logging.getLogger("local_backend.runner")


def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packed bf16 GEMM is available and agrees with F.linear on this machine."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        w = torch.randn(64, 32, dtype=dtype)
        x = torch.randn(3, 32, dtype=dtype)
        packed = torch.ops.mkldnn._linear_pointwise(
            x, torch.ops.mkldnn._reorder_linear_weight(w, None), None, "none", [], ""
        )
        return bool(torch.allclose(packed.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2))
    except (AttributeError, RuntimeError):
        return False


class _Layer(TypedDict):
    """One decoder layer's weights: norms, fused q/k/v and gate/up, output and down projections."""

    ln1: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    ln2: torch.Tensor
    wgu: torch.Tensor
    wd: torch.Tensor


class ModelRunner:
    """Owns fused weights and the KV cache; knows nothing about requests."""

    def __init__(self, model: MistralForCausalLM, max_slots: int, max_len: int) -> None:
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
        self.packed = _can_pack(self.device, self.dtype)
        log.info("GEMMs: %s", "oneDNN packed bf16" if self.packed else f"F.linear ({self.dtype})")

        def pack(w: torch.Tensor) -> torch.Tensor:
            if not self.packed:
                return w
            packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(w, None)
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
                (a.o_proj, m.down_proj) if self.packed else ()
            ):
                p.weight = None
        self.embed: torch.Tensor = model.model.embed_tokens.weight.detach()
        self.norm: torch.Tensor = model.model.norm.weight.detach()
        self.lm_head = pack(model.lm_head.weight.detach())
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim

        shape = (len(self.layers), max_slots, self.n_kv, max_len, self.head_dim)
        # torch.empty: pages are only touched when used; see _ensure_clean.
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._arange = torch.arange(max_len, device=self.device)
        self._clean = [0] * max_slots

    # ------------------------------------------------------------------ cache slots

    # Invariant: positions [0, clean[slot]) of every slot hold finite values. A decode
    # step reads up to the longest row, and a masked entry still multiplies into the
    # output as 0 * value, so never-written memory (possibly NaN) must be zeroed first.
    # Every write (prefill, decode, move) stores finite K/V, so the mark only grows.

    def _ensure_clean(self, rows: int, kv_len: int) -> None:
        for slot in range(rows):
            start = self._clean[slot]
            if start < kv_len:
                end = min(self.max_len, kv_len + 256)  # amortize: zero ahead in blocks
                self.k_cache[:, slot, :, start:end].zero_()
                self.v_cache[:, slot, :, start:end].zero_()
                self._clean[slot] = end

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's KV to another slot (keeps running slots contiguous)."""
        self.k_cache[:, dst, :, :length].copy_(self.k_cache[:, src, :, :length])
        self.v_cache[:, dst, :, :length].copy_(self.v_cache[:, src, :, :length])
        self._clean[dst] = max(self._clean[dst], length)

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of slots 0..B-1. tokens/positions: [B] -> logits [B, vocab]."""
        b = tokens.shape[0]
        kv_len = int(positions.max()) + 1
        self._ensure_clean(b, kv_len)
        x = self.embed[tokens].unsqueeze(1)  # [B, 1, hidden]
        pos = positions.unsqueeze(1)  # [B, 1]
        h = self._forward(x, pos, slice(0, b), kv_len)
        return self._logits(h[:, -1])

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        """Feed a prompt chunk into `slot` at positions start.. -> logits of its last token."""
        t = len(tokens)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(0)
        pos = torch.arange(start, start + t, device=self.device).unsqueeze(0)
        h = self._forward(self.embed[ids], pos, slice(slot, slot + 1), start + t)
        self._clean[slot] = max(self._clean[slot], start + t)
        return self._logits(h[:, -1])[0]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(h, (h.shape[-1],), self.norm, self.eps)
        return self._linear(h, self.lm_head).float()

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
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
        mask = None if no_mask else self._mask(pos, kv_len)
        rows = torch.arange(slots.start, slots.stop, device=self.device).unsqueeze(1)
        nk, g, d = self.n_kv, self.group, self.head_dim
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), w["ln1"], self.eps)
            qkv = self._linear(h, w["wqkv"], w["bqkv"])
            # RoPE on q and k in one pass: they are adjacent in the fused projection.
            qk = _rope(qkv[..., : self.q_size + self.kv_size].view(b, t, self.n_heads + nk, d), cos, sin)
            q, k = qk[:, :, : self.n_heads], qk[:, :, self.n_heads :]
            v = qkv[..., self.q_size + self.kv_size :]
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, pos] = k  # [B, T, nk, D] scattered into [slot, :, pos, :]
            vc[rows, :, pos] = v.view(b, t, nk, d)
            # GQA without repeat_kv: fold each kv head's query group into the query axis.
            q = q.view(b, t, nk, g, d).permute(0, 2, 3, 1, 4).reshape(b, nk, g * t, d)
            o = F.scaled_dot_product_attention(
                q, kc[slots, :, :kv_len], vc[slots, :, :kv_len], attn_mask=mask, scale=self.scale
            )
            o = o.view(b, nk, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, self.q_size)
            x = x + self._linear(o, w["wo"])
            h = F.rms_norm(x, (x.shape[-1],), w["ln2"], self.eps)
            gate, up = self._linear(h, w["wgu"]).chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, w["wd"])
        return x


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
