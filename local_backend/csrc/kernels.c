/* The local backend's decode kernels: attention, RMSNorm and SwiGLU's silu(gate) * up.
 *
 * Built at start by local_backend/native.py with the machine's C compiler and called
 * through ctypes with tensor pointers. Why: a decode step runs ~1,500 small ATen ops,
 * and the ones replaced here cost far more than their arithmetic (bench/NOTES.md).
 *
 * decode_attention_*: one query token per row, grouped heads. SDPA's CPU kernel pays a
 * oneDNN GEMM set-up for every (row, kv head) pair; here one pass converts a key or
 * value row once and reuses it for the G query heads that share it.
 *
 *   q:     row b, head h at q[b * q_row + h * D + d]  (heads of a row contiguous)
 *   k, v:  one layer of the KV cache, [slots, NK, max_len, D]; row b is slot b
 *   start, end: row b attends to positions start[b] <= p < end[b] (end > start)
 *   out:   [B, H, D] contiguous, H = NK * G
 *
 * Scores, softmax and the weighted sum are in fp32; the output is rounded to the input's
 * type (bf16: to nearest even). Inputs are finite (the runner's cache invariant).
 * Parallel over (row, kv head) with OpenMP: the same libgomp, and so the same thread
 * count, as torch in the calling thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

static inline float bf16_load(uint16_t h) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)h << 16;
    return x.f;
}

static inline uint16_t bf16_store(float f) {
    union { uint32_t u; float f; } x;
    x.f = f;
    return (uint16_t)((x.u + 0x7FFFu + ((x.u >> 16) & 1u)) >> 16);
}

/* 64-byte aligned scratch. The vectorised loops then start at the same alignment for every
 * row in every batch, so a row's sums run in the same order wherever it sits: greedy
 * output must not depend on a request's neighbours. */
static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* exp for the softmax and SiLU, Cephes' expf (about 1 ulp): x = k ln2 + r, e^r by a
 * polynomial, 2^k by the exponent bits. Ours rather than libm's so that the loops
 * vectorise without -ffast-math, which would link crtfastmath and turn on
 * flush-to-zero for the whole process that loads us. Inputs are clamped to where the
 * result stays a normal float. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float k = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    union { uint32_t u; float f; } two_k;
    two_k.u = (uint32_t)((int)k + 127) << 23;
    return (p * r * r + r + 1.0f) * two_k.f;
}

/* Denormals as zero, flushed to zero, while a kernel runs, in each thread that runs it
 * (MXCSR is per thread; the caller's mode is restored on the way out). Why: on Intel
 * cores an FP instruction that meets a denormal takes a microcode assist of ~100 cycles,
 * and vectorised code meets them in lanes whose results it then discards (the clamp
 * branches of exp_f32, if-converted). Measured on a Sapphire Rapids VM: silu_mul over
 * [16, 2 x 1536] bf16 took 249 us, 17 us with DAZ, with inputs that hold no denormal at
 * all (AMD's Zen 4 takes no such assist). The kernels' inputs are activations, where a
 * denormal is noise below bf16's and fp32's resolution of anything it is added to. */
#if defined(__SSE__)
#include <xmmintrin.h>
#define DENORMALS_OFF() const unsigned int saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ | 0x8040u)
#define DENORMALS_RESTORE() _mm_setcsr(saved_csr_)
#else
#define DENORMALS_OFF() do { } while (0)
#define DENORMALS_RESTORE() do { } while (0)
#endif

static inline float f32_load(float f) { return f; }
static inline float f32_store(float f) { return f; }

/* One (row, kv head) pair: its G query heads over keys [0, L) of kb / vb, into outp.
 * DIM > 0 makes the head size a compile-time constant (64 and 128, the common ones), so
 * a head's accumulator lives in registers; DIM == 0 is the generic path (D <= 256). */
#define ATTEND(NAME, T, LOAD, STORE, DIM)                                                        \
    static void NAME(const T *qrow, const T *kb, const T *vb, long L, int G, int Dr,             \
                     float scale, float *s, float *qf, T *outp)                                  \
    {                                                                                            \
        const int D = (DIM) > 0 ? (DIM) : Dr;                                                    \
        for (int g = 0; g < G; g++)                                                              \
            for (int d = 0; d < D; d++) qf[g * D + d] = LOAD(qrow[g * D + d]) * scale;          \
        long j = 0;                                                                              \
        for (; j + 4 <= L; j += 4) { /* scores, 4 keys at a time: independent sums */           \
            const T *k0 = kb + j * D;                                                            \
            /* K and V come cold from memory (a step reads every layer's): ask for the keys   \
             * 16 ahead, and for these keys' values, which the weighted sum reads next. */     \
            for (int c = 0; c < 4 * D * (int)sizeof(T); c += 64) {                               \
                __builtin_prefetch((const char *)(k0 + 16 * D) + c);                             \
                __builtin_prefetch((const char *)(vb + j * D) + c);                              \
            }                                                                                    \
            for (int g = 0; g < G; g++) {                                                        \
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;                                \
                for (int d = 0; d < D; d++) {                                                    \
                    const float x = qf[g * D + d];                                               \
                    a0 += x * LOAD(k0[d]);                                                       \
                    a1 += x * LOAD(k0[D + d]);                                                   \
                    a2 += x * LOAD(k0[2 * D + d]);                                               \
                    a3 += x * LOAD(k0[3 * D + d]);                                               \
                }                                                                                \
                s[g * L + j] = a0;                                                               \
                s[g * L + j + 1] = a1;                                                           \
                s[g * L + j + 2] = a2;                                                           \
                s[g * L + j + 3] = a3;                                                           \
            }                                                                                    \
        }                                                                                        \
        for (; j < L; j++) /* the last keys, one at a time */                                   \
            for (int g = 0; g < G; g++) {                                                        \
                float dot = 0.0f;                                                                \
                for (int d = 0; d < D; d++) dot += qf[g * D + d] * LOAD(kb[j * D + d]);          \
                s[g * L + j] = dot;                                                              \
            }                                                                                    \
        for (int g = 0; g < G; g++) { /* softmax, then the weighted values */                   \
            float *sg = s + g * L, mx = sg[0], sum = 0.0f;                                       \
            for (long i = 1; i < L; i++) mx = sg[i] > mx ? sg[i] : mx;                           \
            for (long i = 0; i < L; i++) { sg[i] = exp_f32(sg[i] - mx); sum += sg[i]; }             \
            const float inv = 1.0f / sum;                                                        \
            float acc[(DIM) > 0 ? (DIM) : 256] __attribute__((aligned(64)));                     \
            for (int d = 0; d < D; d++) acc[d] = 0.0f;                                           \
            for (long i = 0; i < L; i++) {                                                       \
                const float p = sg[i] * inv;                                                     \
                for (int d = 0; d < D; d++) acc[d] += p * LOAD(vb[i * D + d]);                   \
            }                                                                                    \
            for (int d = 0; d < D; d++) outp[g * D + d] = STORE(acc[d]);                         \
        }                                                                                        \
    }

#define DECODE_ATTENTION(NAME, T, LOAD, STORE)                                                   \
    ATTEND(NAME##_64, T, LOAD, STORE, 64)                                                        \
    ATTEND(NAME##_128, T, LOAD, STORE, 128)                                                      \
    ATTEND(NAME##_any, T, LOAD, STORE, 0)                                                        \
    int NAME(const T *q, long q_row, const T *k, const T *v, const int64_t *start,               \
             const int64_t *end, T *out, int B, int H, int NK, int D, long max_len, float scale)  \
    {                                                                                            \
        if (B <= 0 || NK <= 0 || H % NK != 0 || D <= 0 || D > 256) return 1;                     \
        const int G = H / NK;                                                                    \
        int failed = 0;                                                                          \
        _Pragma("omp parallel for collapse(2) schedule(static) reduction(|:failed)")             \
        for (int b = 0; b < B; b++)                                                              \
            for (int kh = 0; kh < NK; kh++) {                                                    \
                const long s0 = start[b], L = end[b] - start[b];                                 \
                if (s0 < 0 || L <= 0 || end[b] > max_len) { failed = 1; continue; }              \
                const T *kb = k + ((long)(b * NK + kh) * max_len + s0) * D;                      \
                const T *vb = v + ((long)(b * NK + kh) * max_len + s0) * D;                      \
                const T *qrow = q + b * q_row + kh * G * D;                                      \
                T *outp = out + ((long)b * H + kh * G) * D;                                      \
                float *s = alloc64(sizeof(float) * (size_t)(G * L));                             \
                float *qf = alloc64(sizeof(float) * (size_t)(G * D));                            \
                if (!s || !qf) { free(s); free(qf); failed = 1; continue; }                      \
                if (D == 64) NAME##_64(qrow, kb, vb, L, G, D, scale, s, qf, outp);               \
                else if (D == 128) NAME##_128(qrow, kb, vb, L, G, D, scale, s, qf, outp);        \
                else NAME##_any(qrow, kb, vb, L, G, D, scale, s, qf, outp);                      \
                free(s);                                                                         \
                free(qf);                                                                        \
            }                                                                                    \
        return failed;                                                                           \
    }

DECODE_ATTENTION(decode_attention_bf16, uint16_t, bf16_load, bf16_store)
DECODE_ATTENTION(decode_attention_f32, float, f32_load, f32_store)

/* RMSNorm of [rows, n]: x * rsqrt(mean(x^2) + eps) * w, the sum in fp32. bf16 rounds
 * the normalised row to bf16 before the weight multiplies it, as transformers'
 * MistralRMSNorm does. */
#define RMS_NORM(NAME, T, LOAD, STORE)                                                           \
    int NAME(const T *x, const T *w, T *out, int rows, int n, float eps)                         \
    {                                                                                            \
        for (int r = 0; r < rows; r++) {                                                         \
            const T *xr = x + (long)r * n;                                                       \
            float ss = 0.0f;                                                                     \
            for (int i = 0; i < n; i++) { const float v = LOAD(xr[i]); ss += v * v; }            \
            const float inv = 1.0f / sqrtf(ss / (float)n + eps);                                 \
            for (int i = 0; i < n; i++)                                                          \
                out[(long)r * n + i] = STORE(LOAD(STORE(LOAD(xr[i]) * inv)) * LOAD(w[i]));       \
        }                                                                                        \
        return 0;                                                                                \
    }

/* SwiGLU's product of a fused gate/up row [rows, 2n] -> [rows, n]: silu(gate) * up, with
 * silu rounded to the type first, as torch's F.silu(gate) * up rounds it. */
#define SILU_MUL(NAME, T, LOAD, STORE)                                                           \
    int NAME(const T *gu, T *out, int rows, int n)                                               \
    {                                                                                            \
        DENORMALS_OFF();                                                                         \
        for (int r = 0; r < rows; r++) {                                                         \
            const T *g = gu + (long)r * 2 * n, *u = g + n;                                       \
            for (int i = 0; i < n; i++) {                                                        \
                const float a = LOAD(g[i]);                                                      \
                out[(long)r * n + i] = STORE(LOAD(STORE(a / (1.0f + exp_f32(-a)))) * LOAD(u[i]));   \
            }                                                                                    \
        }                                                                                        \
        DENORMALS_RESTORE();                                                                     \
        return 0;                                                                                \
    }

/* RoPE and the KV cache write of a decode step: row b's fused q/k/v projection (q heads,
 * then k heads, then v heads, each D wide, at qkv[b * qkv_row]) -> q rotated into q_out
 * [B, H, D]; k rotated and v copied into slot b of one layer's caches [slots, NK,
 * max_len, D] at position pos[b]. cos and sin are [B, D] (the model's rotary module's,
 * per row); rotation as transformers' rotate_half: x * cos + (-x2, x1) * sin, in fp32,
 * rounded once. */
#define ROPE_STORE(NAME, T, LOAD, STORE)                                                         \
    int NAME(const T *qkv, long qkv_row, const T *cos, const T *sin, T *q_out, T *k, T *v,       \
             const int64_t *pos, int B, int H, int NK, int D, long max_len)                       \
    {                                                                                            \
        const int half = D / 2;                                                                  \
        if (D % 2) return 1;                                                                     \
        for (int b = 0; b < B; b++)                                                              \
            if (pos[b] < 0 || pos[b] >= max_len) return 1;                                       \
        for (int b = 0; b < B; b++) {                                                            \
            const T *row = qkv + b * qkv_row, *c = cos + (long)b * D, *sn = sin + (long)b * D;   \
            for (int h = 0; h < H + NK; h++) {                                                   \
                const T *x = row + (long)h * D;                                                  \
                T *dst = h < H ? q_out + ((long)b * H + h) * D                                   \
                               : k + (((long)b * NK + (h - H)) * max_len + pos[b]) * D;          \
                for (int d = 0; d < half; d++)                                                   \
                    dst[d] = STORE(LOAD(x[d]) * LOAD(c[d]) - LOAD(x[d + half]) * LOAD(sn[d]));   \
                for (int d = half; d < D; d++)                                                   \
                    dst[d] = STORE(LOAD(x[d]) * LOAD(c[d]) + LOAD(x[d - half]) * LOAD(sn[d]));   \
            }                                                                                    \
            for (int kh = 0; kh < NK; kh++) {                                                    \
                const T *x = row + (long)(H + NK + kh) * D;                                      \
                T *dst = v + (((long)b * NK + kh) * max_len + pos[b]) * D;                       \
                for (int d = 0; d < D; d++) dst[d] = x[d];                                       \
            }                                                                                    \
        }                                                                                        \
        return 0;                                                                                \
    }

ROPE_STORE(rope_store_bf16, uint16_t, bf16_load, bf16_store)
ROPE_STORE(rope_store_f32, float, f32_load, f32_store)
RMS_NORM(rms_norm_bf16, uint16_t, bf16_load, bf16_store)
RMS_NORM(rms_norm_f32, float, f32_load, f32_store)
SILU_MUL(silu_mul_bf16, uint16_t, bf16_load, bf16_store)
SILU_MUL(silu_mul_f32, float, f32_load, f32_store)

/* q4_matmul_bf16: y [M, N] = x [M, K] @ W^T for W in the GGUF's own Q4_1 blocks (w = d q + m,
 * 32 weights a block), bf16 x and y, fp32 sums. At 16 rows the GEMM reads 5 bits a weight
 * instead of oneDNN's 16, and each block's weights are unpacked once for all rows.
 *
 * Layout (native.pack_q4): the N outputs in tiles of 16 (one 512-bit register of fp32
 * lanes); per tile and block of 32 inputs, 16 pairs of inputs (k, k+1), each 16 bytes:
 * byte j = q[n + j, k] | q[n + j, k + 1] << 4. A byte becomes one 32-bit lane of two bf16
 * values 1 + q / 16 (0x3F80 | q << 3: exact), so one VDPBF16PS adds x[k] (1 + q[k] / 16) +
 * x[k + 1] (1 + q[k + 1] / 16) for 16 outputs. Per block, with S that sum and X the sum of
 * the block's x: sum x q = 16 (S - X), so y += 16 d (S - X) + m X. Scales: fp16 16 d (exact)
 * and m, [tile, block, 2, 16].
 *
 * Every row runs the same instructions whatever M is and wherever it sits, so a row's
 * output does not depend on the batch. Only where the compiler targets AVX512-BF16
 * (-march=native on such a CPU); q4_matmul_available() says whether it did. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

int q4_matmul_available(void) { return 1; }

/* Byte b = lo | hi << 4 -> the lane (0x3F80 | lo << 3) | (0x3F80 | hi << 4 + 3) << 16.
 * b * (2^15 + 2^3) is b << 15 | b << 3 (the two copies do not overlap, so no carries):
 * the low nibble lands at bits 3-6 and the high one at bits 19-22, and one ternary-logic
 * op keeps those and sets the exponents: 3 instructions for 32 weights, where shifting
 * and masking each nibble took 7. */
static inline __m512i q4_lanes(const uint8_t *p) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i both = _mm512_mullo_epi32(v, _mm512_set1_epi32((1 << 15) | (1 << 3)));
    /* (both & 0x00780078) | 0x3F803F80: imm 0xEA is (A & B) | C for A, B, C. */
    return _mm512_ternarylogic_epi32(both, _mm512_set1_epi32(0x00780078), _mm512_set1_epi32(0x3F803F80), 0xEA);
}

/* A block's 16 pair-rows (256 bytes) -> W[0..15], one lane per output. */
static inline void q4_unpack(__m512i *W, const uint8_t *block) {
    for (int p = 0; p < 16; p++) W[p] = q4_lanes(block + p * 16);
}

/* One block's share of 16 outputs: acc + 16 d (S - X) + m X, with S the block's sum of
 * x (1 + q / 16) and X its sum of x (so sum x q = 16 (S - X)); d16 and mn its scales. */
static inline __m512 q4_accumulate(__m512 acc, __m512 d16, __m512 mn, __m512 S, float X) {
    const __m512 xs = _mm512_set1_ps(X);
    return _mm512_fmadd_ps(d16, _mm512_sub_ps(S, xs), _mm512_fmadd_ps(mn, xs, acc));
}

/* x[k], x[k + 1] in every 32-bit lane (memcpy: x need only be 2-byte aligned). */
static inline __m512bh x_pair(const uint16_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return (__m512bh)_mm512_set1_epi32((int)v);
}

#define Q4_MAX_ROWS 64

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
/* With AMX (Sapphire Rapids and later), one TDPBF16PS takes a block's S for 16 rows at
 * once: the unpacked W[0..15] are exactly the VNNI layout of a B tile (row p: the pair
 * k = 2p, 2p + 1 for each of the 16 outputs), and A is 16 rows of x's 32 values. Per
 * block, C starts at zero and goes to memory, where the AVX-512 epilogue scales it as
 * the path below does. Measured on a 2-core Sapphire Rapids VM (bench/NOTES.md), the 4
 * GEMMs of all 30 SmolLM2 layers: 22.4 -> 8.3 ms at 16 rows, 13.9 -> 7.0 at 8, 6.8 ->
 * 6.6 at 1; the per-row VDPBF16PS chains were the cost. Every M up to 16 runs this path
 * once it is on, so a row's output does not depend on its batch here either (the per-row sums run in AMX's order, not the
 * AVX-512 chains', so the two paths agree to rounding, not bit for bit). */
#include <sys/syscall.h>
#include <unistd.h>

static int amx_on;

/* Linux hands out AMX's tile state only to a process that asks for it. */
int q4_amx_init(void)
{
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 1;
    if (syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &bitmask) || !(bitmask & (1ul << 18))) return 1;
    amx_on = 1;
    return 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* acc[m] += a block's scaled sums, from its tile product S (M x 16 fp32). */
static inline void q4_block_amx(const float *S, const uint16_t *st, const float *xsum, int blocks, int kb, int M,
                                __m512 *acc)
{
    const __m512 d16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + kb * 32)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + kb * 32 + 16)));
    for (int m = 0; m < M; m++)
        acc[m] = q4_accumulate(acc[m], d16, mn, _mm512_load_ps(S + m * 16), xsum[m * blocks + kb]);
}

/* Tiles: 0 and 1 C (M x 16 fp32), 2 and 3 A (M x 32 bf16), 4 and 5 B (16 pairs x 16
 * outputs): two blocks at a time, so one block's tile product overlaps the other's
 * unpacking and epilogue (blocks = K / 32 is even for every layer; an odd last block
 * runs alone). */
static void q4_tiles_amx(const uint8_t *w, const uint16_t *scales, const uint16_t *x, uint16_t *y,
                         const float *xsum, int M, int N, int K, int t0, int t1)
{
    const int blocks = K / 32;
    tile_config cfg = {0};
    cfg.palette = 1;
    for (int i = 0; i < 4; i++) {
        cfg.rows[i] = (uint8_t)M;
        cfg.colsb[i] = 64;
    }
    cfg.rows[4] = cfg.rows[5] = 16;
    cfg.colsb[4] = cfg.colsb[5] = 64;
    _tile_loadconfig(&cfg); /* per thread, and per call: oneDNN's tiles may have run since */
    __m512i Wa[16] __attribute__((aligned(64))), Wb[16] __attribute__((aligned(64)));
    float Sa[16 * 16] __attribute__((aligned(64))), Sb[16 * 16] __attribute__((aligned(64)));
    for (int t = t0; t < t1; t++) {
        __m512 acc[16];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        const uint8_t *wt = w + (size_t)t * blocks * 256;
        const uint16_t *st = scales + (size_t)t * blocks * 32;
        int kb = 0;
        for (; kb + 2 <= blocks; kb += 2) {
            q4_unpack(Wa, wt + (size_t)kb * 256);
            _tile_zero(0);
            _tile_loadd(2, x + kb * 32, (long)K * 2);
            _tile_loadd(4, Wa, 64);
            _tile_dpbf16ps(0, 2, 4);
            q4_unpack(Wb, wt + (size_t)(kb + 1) * 256);
            _tile_zero(1);
            _tile_loadd(3, x + (kb + 1) * 32, (long)K * 2);
            _tile_loadd(5, Wb, 64);
            _tile_dpbf16ps(1, 3, 5);
            _tile_stored(0, Sa, 64);
            _tile_stored(1, Sb, 64);
            q4_block_amx(Sa, st, xsum, blocks, kb, M, acc);
            q4_block_amx(Sb, st, xsum, blocks, kb + 1, M, acc);
        }
        if (kb < blocks) {
            q4_unpack(Wa, wt + (size_t)kb * 256);
            _tile_zero(0);
            _tile_loadd(2, x + kb * 32, (long)K * 2);
            _tile_loadd(4, Wa, 64);
            _tile_dpbf16ps(0, 2, 4);
            _tile_stored(0, Sa, 64);
            q4_block_amx(Sa, st, xsum, blocks, kb, M, acc);
        }
        for (int m = 0; m < M; m++)
            _mm256_storeu_si256((__m256i *)(y + (long)m * N + t * 16), (__m256i)_mm512_cvtneps_pbh(acc[m]));
    }
    _tile_release();
}

#else
int q4_amx_init(void) { return 1; }
#endif

int q4_matmul_bf16(const uint8_t *w, const uint16_t *scales, const uint16_t *x, uint16_t *y, int M, int N, int K)
{
    if (M <= 0 || M > Q4_MAX_ROWS || N <= 0 || N % 16 || K <= 0 || K % 32) return 1;
    const int tiles = N / 16, blocks = K / 32;
    float *xsum = alloc64(sizeof(float) * (size_t)M * (size_t)blocks);
    if (!xsum) return 1;
    for (int m = 0; m < M; m++)
        for (int kb = 0; kb < blocks; kb++) {
            float s = 0.0f;
            for (int i = 0; i < 32; i++) s += bf16_load(x[(long)m * K + kb * 32 + i]);
            xsum[m * blocks + kb] = s;
        }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
    if (amx_on && M <= 16) {
        _Pragma("omp parallel")
        {
            const int nt = omp_get_num_threads(), id = omp_get_thread_num();
            const int per = (tiles + nt - 1) / nt, t0 = id * per, t1 = t0 + per < tiles ? t0 + per : tiles;
            if (t0 < t1) q4_tiles_amx(w, scales, x, y, xsum, M, N, K, t0, t1);
        }
        free(xsum);
        return 0;
    }
#endif
    _Pragma("omp parallel for schedule(static)")
    for (int t = 0; t < tiles; t++) {
        __m512 acc[Q4_MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        const uint8_t *wt = w + (size_t)t * blocks * 256;
        const uint16_t *st = scales + (size_t)t * blocks * 32;
        for (int kb = 0; kb < blocks; kb++) {
            __m512i W[16];
            q4_unpack(W, wt + (size_t)kb * 256);
            const __m512 d16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + kb * 32)));
            const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(st + kb * 32 + 16)));
            for (int m = 0; m < M; m++) {
                const uint16_t *xp = x + (long)m * K + kb * 32;
                __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
                for (int p = 0; p < 16; p += 4) {
                    s0 = _mm512_dpbf16_ps(s0, x_pair(xp + 2 * p), (__m512bh)W[p]);
                    s1 = _mm512_dpbf16_ps(s1, x_pair(xp + 2 * p + 2), (__m512bh)W[p + 1]);
                    s2 = _mm512_dpbf16_ps(s2, x_pair(xp + 2 * p + 4), (__m512bh)W[p + 2]);
                    s3 = _mm512_dpbf16_ps(s3, x_pair(xp + 2 * p + 6), (__m512bh)W[p + 3]);
                }
                const __m512 S = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
                acc[m] = q4_accumulate(acc[m], d16, mn, S, xsum[m * blocks + kb]);
            }
        }
        for (int m = 0; m < M; m++)
            _mm256_storeu_si256((__m256i *)(y + (long)m * N + t * 16), (__m256i)_mm512_cvtneps_pbh(acc[m]));
    }
    free(xsum);
    return 0;
}
#else
int q4_matmul_available(void) { return 0; }
int q4_amx_init(void) { return 1; }

int q4_matmul_bf16(const uint8_t *w, const uint16_t *scales, const uint16_t *x, uint16_t *y, int M, int N, int K)
{
    (void)w; (void)scales; (void)x; (void)y; (void)M; (void)N; (void)K;
    return 1;
}
#endif
