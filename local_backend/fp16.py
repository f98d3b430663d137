"""fp32 GEMMs on weights stored in fp16 (FBGEMM), for the embedded model in fp32 on a CPU.

Decoding in fp32 reads every weight once a step, and at a few rows that read is most
of the time. FBGEMM's fp16 GEMM (`quantized.linear_dynamic_fp16`) keeps the weights
in fp16 (half the bytes), widens them to fp32 inside the kernel, and multiplies fp32
activations with fp32 accumulation: only the weights are rounded. The embedded
model's weights were 4-bit (Q4_1: d * q + m, with d and m in fp16) and 8-bit (Q8_0
embeddings, d * q) to begin with, so fp16 keeps them to within 2^-11 of their value.

On the 2-core EPYC box, the 120 layer GEMMs of a step (bench/NOTES.md): capped at AVX2,
6.4 ms at one row and 21.4 at 16 against 17.0 and 32.3 for oneDNN's packed fp32; with
AVX-512, 8.2 and 21.5 against 19.7 and 26.2. Prompts of 256-512 rows cost about the
same as packed fp32 (0-10% more). One kernel serves every row count, and on AVX-512 a
row's result does not depend on the rows beside it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fp16Weight:
    """A [out, in] weight prepacked in fp16 for FBGEMM; called on fp32 activations [..., in]."""

    packed: torch.Tensor  # an opaque LinearPackedParams handle

    @staticmethod
    def of(w: torch.Tensor) -> Fp16Weight:
        return Fp16Weight(torch.ops.quantized.linear_prepack_fp16(w.float().contiguous(), None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # torch.ops resolves ops at run time: the call is typed as returning Any.
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)  # type: ignore[no-any-return]


@functools.cache  # load_model and ModelRunner both ask; the answer is fixed for the process
def fp16_usable(device: torch.device) -> bool:
    """FBGEMM is built in (x86 CPUs with AVX2) and its fp16 GEMM agrees with F.linear here."""
    if device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        w, x = torch.randn(64, 32), torch.randn(3, 32)
        got = Fp16Weight.of(w)(x)
        return bool(torch.allclose(got, x @ w.half().float().t(), atol=1e-4, rtol=1e-4))
    except (AttributeError, RuntimeError):
        return False
