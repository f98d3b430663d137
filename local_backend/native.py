"""The decode step's small ops as C kernels, built at start with the machine's compiler.

A 16-row bf16 decode step of SmolLM2 runs ~1,500 ATen ops, and beside the GEMMs the
time goes to ops whose arithmetic is tiny: SDPA pays a oneDNN GEMM set-up per (row, kv
head) pair, and each RMSNorm and SiLU is several kernels with their own passes and
casts. `csrc/kernels.c` does decode attention, RMSNorm and silu(gate) * up in one
pass each, in fp32 arithmetic with the rounding to bf16 where torch rounds
(bench/NOTES.md has the measurements). Where the compiler targets AVX512-BF16, it also
has a GEMM on the GGUF's own 4-bit blocks (`q4_matmul`, `Q4Tiles`): a bf16 decode step
reads 5 bits a weight instead of oneDNN's 16.

The source is plain C (no torch headers), so it compiles in about a second. The shared
object is cached in the model cache's `kernels/` under a hash of everything that decides
its code (source, compiler, flags, CPU flags), so a cache carried to another CPU is
never loaded there. `-march=native` targets the CPU at hand; with torch's kernels capped
at AVX2 (ATEN_CPU_CAPABILITY=avx2, how the benchmark emulates an AVX2-only CPU) it
targets x86-64-v3 instead. Where there is no compiler at run time (the `local` Docker
image), `prebuild` (`python -m local_backend build-kernels`) will have left a build for
each x86-64 level in the cache, and the best one this CPU runs serves. No compiler and
no such build, a failed build, or a kernel that disagrees with torch on the self-check
at load: `load()` returns None and the runner keeps torch.

OpenMP (the attention kernel's loop over rows and kv heads): the object links libgomp by
soname, and torch has loaded its own libgomp.so.1 by then, so the loop runs on torch's
OpenMP runtime with the calling thread's thread count; a second runtime would fight
torch's threads for the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("local_backend.native")

SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
#: Not -ffast-math: linked into a shared object it sets flush-to-zero and
#: denormals-are-zero for the whole process (crtfastmath), which changes how every other
#: float in it behaves. These let the sums vectorise (reassociation) and nothing more.
FLAGS = (
    "-O3",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
    "-freciprocal-math",
    "-fno-strict-aliasing",
    "-fopenmp",
    "-fPIC",
    "-shared",
)
#: GCC only: no loop peeling for alignment, so a vectorised sum runs in the same order
#: whatever the address of its row (a row's result must not depend on its neighbours).
GCC_FLAGS = ("--param=vect-max-peeling-for-alignment=0",)
#: The dtypes the kernels take, with the suffix of their entry points.
SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
#: The largest difference from torch that the self-check accepts, per dtype (bf16: a
#: rounding step of values around 1-4).
TOLERANCE = {torch.bfloat16: 3.2e-2, torch.float32: 1e-5}


def _march() -> str:
    return "x86-64-v3" if _capped() else "native"


def _capped() -> bool:
    """torch's kernels capped at AVX2 (how the benchmark emulates an AVX2-only CPU)."""
    return os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2"


@dataclass(frozen=True)
class Portable:
    """A build of the kernels for a level of x86-64 rather than for the CPU at hand, made
    ahead by `prebuild` for machines with no compiler at run time (the `local` Docker
    image), as llama.cpp ships one CPU backend per level and picks one at start."""

    name: str
    march: tuple[str, ...]
    needs: frozenset[str]  # the /proc/cpuinfo flags of the level (lzcnt shows as "abm")

    def file_name(self) -> str:
        """Named for the source and flags, so a build of other source is never loaded."""
        key = "\0".join([SOURCE.read_text(), " ".join(FLAGS), " ".join(self.march)])
        return f"kernels-{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
#: Best first: x86-64-v4 with AVX512-BF16 and AMX (q4_matmul on tiles: Sapphire Rapids
#: on), with AVX512-BF16 (q4_matmul: Cooper Lake, Zen 4), v4 (AVX-512 without bf16: Skylake
#: to Ice Lake), v3 (AVX2: Haswell on, Zen 1-3).
PORTABLE = (
    Portable(
        "x86-64-v4-amx",
        ("-march=x86-64-v4", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
        _V4 | {"avx512_bf16", "amx_tile", "amx_bf16"},
    ),
    Portable("x86-64-v4-bf16", ("-march=x86-64-v4", "-mavx512bf16"), _V4 | {"avx512_bf16"}),
    Portable("x86-64-v4", ("-march=x86-64-v4",), _V4),
    Portable("x86-64-v3", ("-march=x86-64-v3",), _V3),
)


def build(directory: Path, cpu_flags: frozenset[str]) -> Path | None:
    """The kernels for this CPU in `directory`: compiled there for it (or found there from an
    earlier start); with no compiler, the best portable build there that it runs; else None.

    `cpu_flags` (models.cpu_info's) go into the compiled file's name with what else decides
    its code, and choose the portable build."""
    cc = _compiler()
    if cc is None:
        return _portable(directory, cpu_flags)
    path, version = cc
    flags = (*FLAGS, f"-march={_march()}", *(GCC_FLAGS if "Free Software Foundation" in version else ()))
    key = "\0".join(
        [SOURCE.read_text(), path, version, " ".join(flags), " ".join(sorted(cpu_flags)), platform.machine()]
    )
    return _compile(path, flags, directory / f"kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")


def prebuild(directory: Path) -> list[Path]:
    """Compile every PORTABLE build into `directory` (`python -m local_backend build-kernels`),
    for `build` to find where there is no compiler; -> the files. Raises where it cannot."""
    cc = _compiler()
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError("building the portable kernels needs a C compiler (cc, or $CC) on x86-64 Linux")
    path, version = cc
    built = []
    for level in PORTABLE:
        extra = GCC_FLAGS if "Free Software Foundation" in version else ()
        target = _compile(path, (*FLAGS, *level.march, *extra), directory / level.file_name())
        if target is None:
            raise RuntimeError(f"the {level.name} build failed (the log says why)")
        built.append(target)
    return built


def _portable(directory: Path, cpu_flags: frozenset[str]) -> Path | None:
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        for level in PORTABLE:
            if level.needs <= cpu_flags and not (_capped() and not level.needs <= _V3):
                path = directory / level.file_name()
                if path.exists():
                    log.info("native kernels: the portable %s build (no C compiler here)", level.name)
                    return path
    log.info("native kernels: none (no C compiler, and no portable build for this CPU); decode runs on torch's ops")
    return None


def _compiler() -> tuple[str, str] | None:
    """(path, `--version` output) of the C compiler, on Linux; None where there is none."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None or platform.system() != "Linux":
        return None
    try:
        return cc, subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("native kernels: %s --version failed: %s", cc, e)
        return None


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> Path | None:
    """`target` compiled from SOURCE with `flags` (unless it exists); None where that fails."""
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run(
                [cc, *flags, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                log.warning("native kernels: none (the build failed: %s)", done.stderr.strip()[-2000:])
                return None
            os.replace(out, target)  # atomic: a concurrent start never loads a half-written object
    except (OSError, subprocess.SubprocessError) as e:  # e.g. a read-only model cache
        log.warning("native kernels: none (the build failed: %s)", e)
        return None
    return target


#: The most rows q4_matmul takes (Q4_MAX_ROWS in kernels.c).
Q4_MAX_ROWS = 64


@dataclass(frozen=True)
class Q4Tiles:
    """One weight matrix [n, k] of Q4_1 blocks (w = d q + m, 32 inputs a block) in
    q4_matmul's layout (see kernels.c): `nibbles` [n / 16, k / 32, 16 pairs, 16 outputs]
    uint8 (two inputs a byte), `scales` [n / 16, k / 32, 2, 16] fp16 (16 d, then m)."""

    nibbles: torch.Tensor
    scales: torch.Tensor
    n: int
    k: int


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Q4Tiles | None:
    """Q4_1 blocks (q [n, k] in 0..15, d and m [n, k / 32]) -> Q4Tiles; None when the shape
    does not tile (n a multiple of 16, k of 32)."""
    n, k = q.shape
    if n % 16 or k % 32 or d.shape != (n, k // 32) or m.shape != d.shape:
        return None
    pairs = q.to(torch.uint8).view(n // 16, 16, k // 32, 16, 2)
    nibbles = (pairs[..., 0] | (pairs[..., 1] << 4)).permute(0, 2, 3, 1).contiguous()
    scales = torch.stack([(16 * d).to(torch.float16), m.to(torch.float16)])  # 16 d: exact in fp16
    scales = scales.view(2, n // 16, 16, k // 32).permute(1, 3, 0, 2).contiguous()
    return Q4Tiles(nibbles, scales, n, k)


@dataclass(frozen=True)
class NativeKernels:
    """The loaded kernels. Each takes and returns CPU tensors of one dtype in SUFFIX
    (q4_matmul: bf16 only, and only where `has_q4`)."""

    entry_points: dict[tuple[str, torch.dtype], Any]  # (kernel, dtype) -> the C function
    amx: bool = False  # q4_matmul multiplies on AMX tiles (built with AMX, and Linux granted them)

    @property
    def has_q4(self) -> bool:
        """Whether q4_matmul was compiled in (the compiler targeted AVX512-BF16)."""
        return ("q4_matmul", torch.bfloat16) in self.entry_points

    def q4_matmul(self, x: torch.Tensor, w: Q4Tiles) -> torch.Tensor:
        """x [..., k] bf16 @ w.T -> [..., n] bf16, summed in fp32; at most Q4_MAX_ROWS rows."""
        rows = x.numel() // w.k
        if x.dtype != torch.bfloat16 or x.shape[-1] != w.k or rows > Q4_MAX_ROWS or not self.has_q4:
            raise ValueError("q4_matmul takes up to 64 bf16 rows of the weight's width")
        flat = x.reshape(rows, w.k).contiguous()
        out = torch.empty(*x.shape[:-1], w.n, dtype=x.dtype, device=x.device)
        failed = self.entry_points["q4_matmul", torch.bfloat16](
            w.nibbles.data_ptr(), w.scales.data_ptr(), flat.data_ptr(), out.data_ptr(), rows, w.n, w.k
        )
        if failed:
            raise ValueError("q4_matmul: a shape that does not tile")
        return out

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        start: torch.Tensor,
        end: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q [B, H, D] (heads and dims contiguous; rows may be strided), one layer's caches
        [slots, NK, max_len, D] with row b in slot b, start/end int64 [B]: row b attends to
        positions start[b] <= p < end[b] -> [B, H * D]."""
        b, h, d = q.shape
        slots, nk, max_len, _ = k_cache.shape
        if not (q.stride(2) == 1 and q.stride(1) == d and k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("decode attention needs contiguous heads and caches")
        if b > slots or start.dtype != torch.int64 or end.dtype != torch.int64 or not end.is_contiguous():
            raise ValueError("decode attention: bad rows or positions")
        start = start.contiguous()
        out = torch.empty(b, h * d, dtype=q.dtype, device=q.device)
        failed = self.entry_points["decode_attention", q.dtype](
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), start.data_ptr(), end.data_ptr(),
            out.data_ptr(), b, h, nk, d, max_len, scale,
        )  # fmt: skip
        if failed:
            raise ValueError("decode attention: positions outside the cache")
        return out

    def rope_store(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: torch.Tensor,
        heads: int,
    ) -> torch.Tensor:
        """A decode step's fused q/k/v rows [B, (heads + 2 NK) * D] (rows may be strided) ->
        q with RoPE [B, heads, D]; k with RoPE and v written into slot b of the caches [slots,
        NK, max_len, D] at positions[b]. cos, sin: [B, D]."""
        b = qkv.shape[0]
        slots, nk, max_len, d = k_cache.shape
        if qkv.stride(-1) != 1 or qkv.shape[-1] != (heads + 2 * nk) * d or b > slots:
            raise ValueError("rope_store needs contiguous q/k/v rows that match the cache")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("rope_store needs contiguous caches")
        cos, sin, positions = cos.contiguous(), sin.contiguous(), positions.contiguous()
        if cos.shape != (b, d) or sin.shape != (b, d) or positions.dtype != torch.int64:
            raise ValueError("rope_store: bad cos, sin or positions")
        q = torch.empty(b, heads, d, dtype=qkv.dtype, device=qkv.device)
        failed = self.entry_points["rope_store", qkv.dtype](
            qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), positions.data_ptr(), b, heads, nk, d, max_len,
        )  # fmt: skip
        if failed:
            raise ValueError("rope_store: a position outside the cache, or an odd head size")
        return q

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension of a contiguous x, as transformers' MistralRMSNorm."""
        n = x.shape[-1]
        if not (x.is_contiguous() and weight.is_contiguous() and weight.shape == (n,) and weight.dtype == x.dtype):
            raise ValueError("rms_norm needs contiguous rows and a matching weight")
        out = torch.empty_like(x)
        self.entry_points["rms_norm", x.dtype](x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2n] (gate, then up) -> [..., n]: F.silu(gate) * up."""
        if not gate_up.is_contiguous() or gate_up.shape[-1] % 2:
            raise ValueError("silu_mul needs contiguous rows of gate and up")
        n = gate_up.shape[-1] // 2
        out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
        self.entry_points["silu_mul", gate_up.dtype](gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n)
        return out


def _bind(lib: ctypes.CDLL) -> dict[tuple[str, torch.dtype], Any]:
    """Each entry point with its argument types, by (kernel, dtype)."""
    p, i, n, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    signatures = {
        "decode_attention": [p, n, p, p, p, p, p, i, i, i, i, n, f],
        "rms_norm": [p, p, p, i, i, f],
        "silu_mul": [p, p, i, i],
        "rope_store": [p, n, p, p, p, p, p, p, i, i, i, i, n],
    }
    entry_points = {}
    for dtype, suffix in SUFFIX.items():
        for name, argtypes in signatures.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = argtypes
            fn.restype = i
            entry_points[name, dtype] = fn
    lib.q4_matmul_available.restype = i
    if lib.q4_matmul_available():
        fn = lib.q4_matmul_bf16
        fn.argtypes = [p, p, p, p, i, i, i]
        fn.restype = i
        entry_points["q4_matmul", torch.bfloat16] = fn
    return entry_points


def _enable_amx(lib: ctypes.CDLL) -> bool:
    """Whether q4_matmul runs on AMX tiles: built where the compiler targets AMX, and only
    once Linux has granted this process the tile state (it does on request)."""
    lib.q4_amx_init.restype = ctypes.c_int
    return bool(lib.q4_matmul_available()) and lib.q4_amx_init() == 0


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.allclose(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]))


def self_check(kernels: NativeKernels) -> bool:
    """Each kernel against torch, in both dtypes: attention over rows of different lengths
    (one of a single key) and grouped heads, RoPE and the cache write, norms and SiLU
    of values across the activations' range, and q4_matmul against the dequantized product."""
    g = torch.Generator().manual_seed(0)
    if kernels.has_q4:
        nibbles = torch.randint(0, 16, (32, 64), generator=g)
        # d and m as the GGUF stores them (fp16 values)
        scale = (torch.rand(32, 2, generator=g) * 0.02).half().float()
        low = (-torch.rand(32, 2, generator=g) * 0.1).half().float()
        tiles = pack_q4(nibbles, scale, low)
        x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
        w = (nibbles.float().view(32, 2, 32) * scale[..., None] + low[..., None]).view(32, 64)
        if tiles is None or not _close(kernels.q4_matmul(x, tiles), x.float() @ w.T, torch.bfloat16):
            return False
    for dtype in SUFFIX:
        rows, nk, group, d, max_len = 3, 2, 3, 64, 40
        k = torch.randn(rows + 1, nk, max_len, d, generator=g).to(dtype)
        v = torch.randn(rows + 1, nk, max_len, d, generator=g).to(dtype)
        q = torch.randn(rows, nk * group, d, generator=g).to(dtype)
        start, end = torch.tensor([0, 0, 5]), torch.tensor([1, 33, 40])
        got = kernels.decode_attention(q, k, v, start, end, 0.125).view(rows, nk, group, d)
        for r in range(rows):
            s, e = int(start[r]), int(end[r])
            want = F.scaled_dot_product_attention(
                q[r].view(nk, group, d).float(), k[r, :, s:e].float(), v[r, :, s:e].float(), scale=0.125
            )
            if not _close(got[r], want, dtype):
                return False
        heads, positions = nk * group, torch.tensor([0, 17, 39])
        qkv = torch.randn(rows, 1, (heads + 2 * nk) * d, generator=g).to(dtype)[:, 0]
        cos, sin = torch.randn(rows, d, generator=g).to(dtype), torch.randn(rows, d, generator=g).to(dtype)
        q = kernels.rope_store(qkv, cos, sin, k, v, positions, heads)
        x = qkv.float().view(rows, heads + 2 * nk, d)
        turned = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1)
        roped = x * cos.float()[:, None] + turned * sin.float()[:, None]
        rows_at = torch.arange(rows)
        if not (
            _close(q, roped[:, :heads], dtype)
            and _close(k[rows_at, :, positions], roped[:, heads : heads + nk], dtype)
            and torch.equal(v[rows_at, :, positions], qkv.view(rows, heads + 2 * nk, d)[:, heads + nk :])
        ):
            return False
        x = (torch.randn(5, 96, generator=g) * 4).to(dtype)
        w = torch.rand(96, generator=g).to(dtype)
        want = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        gu = (torch.randn(5, 2 * 96, generator=g) * 6).to(dtype)
        if not (
            _close(kernels.rms_norm(x, w, 1e-5), want, dtype)
            and _close(kernels.silu_mul(gu), F.silu(gu[:, :96]) * gu[:, 96:], dtype)
        ):
            return False
    return True


@functools.cache  # one build and load per process
def load(device: torch.device, directory: Path, cpu_flags: frozenset[str]) -> NativeKernels | None:
    """The kernels for CPU tensors, built into (or found in) `directory`; None where there
    is no compiler, or the build or the self-check fails."""
    if device.type != "cpu":
        return None
    path = build(directory, cpu_flags)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        kernels = NativeKernels(_bind(lib), amx=_enable_amx(lib))
        ok = self_check(kernels)
    except (OSError, AttributeError, RuntimeError, ValueError) as e:
        log.warning("native kernels: none (%s did not load: %s)", path.name, e)
        return None
    if not ok:
        log.warning("native kernels: none (they disagreed with torch on the self-check)")
        return None
    return kernels
