"""The embedded model's 4-bit weights, run as the GGUF stores them.

The bundled SmolLM2 is a Q4_1 GGUF: each run of 32 weights in a row is stored as
4-bit values q with a scale d and a minimum m (w = d * q + m, d and m in fp16). Loading
dequantizes that into float weights for transformers; this module reads the blocks
themselves and hands them to torch's int4 weight-only kernel
(`_weight_int4pack_mm_for_cpu`, 32-wide groups), which computes (q - 8) * scale + zero,
so scale = d and zero = m + 8d give the same weights. The kernel reads 4.5 bits a
weight instead of 16: one decoding row in bf16 is ~2.7x faster than oneDNN's packed
bf16 GEMMs on the 2-core EPYC box, 16 rows ~10% slower (bench/NOTES.md). Its fp32
path is a slow reference loop, so the runner uses it only in bf16. Where the native
kernels have `q4_matmul` (native.py: AVX512-BF16), the runner runs these same blocks
on that instead, which stays ahead of oneDNN up to 16 rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

GROUP = 32
Q4_1 = 3  # GGMLQuantizationType.Q4_1
_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles


@dataclass(frozen=True)
class Q4Blocks:
    """One weight matrix in Q4_1 form: q [out, in] (0..15), d and m [out, in / 32]."""

    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        out, inp = self.q.shape
        w = self.q.float().view(out, inp // GROUP, GROUP) * self.d[..., None] + self.m[..., None]
        return w.view(out, inp)

    @staticmethod
    def stack(parts: list[Q4Blocks]) -> Q4Blocks:
        """Rows of several matrices as one (q/k/v or gate/up fused into one GEMM)."""
        return Q4Blocks(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "d", "m")))


@dataclass(frozen=True)
class Int4Weight:
    """Q4Blocks in the kernel's layout; called on activations of any float dtype (see above)."""

    packed: torch.Tensor
    scale_zero: torch.Tensor  # [in / 32, out, 2], bf16

    @staticmethod
    def of(blocks: Q4Blocks) -> Int4Weight:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32).contiguous(), 1)
        scale_zero = torch.stack([blocks.d, blocks.m + 8 * blocks.d], -1).transpose(0, 1).contiguous()
        return Int4Weight(packed, scale_zero.to(torch.bfloat16))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scale_zero)
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


def int4_usable(device: torch.device) -> bool:
    """The kernel exists here and agrees with the float product."""
    if device.type != "cpu":
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        blocks = Q4Blocks(
            torch.randint(0, 16, (64, 64), generator=gen),
            torch.rand(64, 2, generator=gen) * 0.01,
            -torch.rand(64, 2, generator=gen) * 0.05,
        )
        x = torch.randn(3, 64, generator=gen)
        got = Int4Weight.of(blocks)(x)
        return bool(torch.allclose(got, F.linear(x, blocks.dequantized()), atol=2e-2, rtol=2e-2))
    except (AttributeError, RuntimeError):
        return False


def read_q4_layers(gguf_path: Path, n_heads: int, n_kv_heads: int) -> list[dict[str, Q4Blocks]] | None:
    """Each decoder layer's Q4_1 matrices, fused as the runner multiplies them:
    ``wqkv`` (q, k, v rows), ``wo``, ``wgu`` (gate, up rows), ``wd``. None when any
    of them is stored in another format.

    q and k rows are un-permuted as transformers does when it loads a llama GGUF
    (llama.cpp interleaves each head's rotary halves), so row i here is row i of the
    loaded model.
    """
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    n_layers = sum(1 for name in tensors if name.endswith(".attn_q.weight"))

    def blocks(name: str, heads: int | None = None) -> Q4Blocks | None:
        t = tensors.get(name)
        if t is None or int(t.tensor_type) != Q4_1:
            return None
        raw = np.asarray(t.data).reshape(t.data.shape[0], -1, _BLOCK_BYTES)  # [out, in / 32, 20]
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = raw[..., 4:]
        # ggml's Q4_1: byte j holds value j in its low nibble and value j + 16 in its high one.
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(raw.shape[0], -1)
        arrays = [q, d, m]
        if heads is not None:
            arrays = [_unpermute(a, heads) for a in arrays]
        return Q4Blocks(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))

    layers: list[dict[str, Q4Blocks]] = []
    for i in range(n_layers):
        p = f"blk.{i}."
        parts = {
            "q": blocks(p + "attn_q.weight", n_heads),
            "k": blocks(p + "attn_k.weight", n_kv_heads),
            "v": blocks(p + "attn_v.weight"),
            "o": blocks(p + "attn_output.weight"),
            "gate": blocks(p + "ffn_gate.weight"),
            "up": blocks(p + "ffn_up.weight"),
            "down": blocks(p + "ffn_down.weight"),
        }
        if any(b is None for b in parts.values()):
            return None
        b = {k: v for k, v in parts.items() if v is not None}
        layers.append(
            {
                "wqkv": Q4Blocks.stack([b["q"], b["k"], b["v"]]),
                "wo": b["o"],
                "wgu": Q4Blocks.stack([b["gate"], b["up"]]),
                "wd": b["down"],
            }
        )
    return layers


def _unpermute(a: np.ndarray, heads: int) -> np.ndarray:
    """transformers' reverse of llama.cpp's q/k row permutation (per head: halves interleaved)."""
    dim = a.shape[0] // heads // 2
    return a.reshape(heads, dim, 2, *a.shape[1:]).swapaxes(2, 1).reshape(a.shape)
