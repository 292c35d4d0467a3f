/* CPU decode kernels of the built-in backend: Linear layers of a decode batch (1 to ~32 rows), the gated
 * feed-forward, RMSNorm, decode attention and a whole Llama layer, for fp32 and bf16 tensors. Built by
 * runner/cpu_kernels.py (gcc -O3 -march=native -fopenmp) and called through ctypes on contiguous torch tensors;
 * torch's own ops serve every other case.
 *
 * Why: at decode a Linear layer multiplies a few rows by a weight it must stream from memory once. torch 2.13 on
 * CPUs without bf16 instructions emulates the bf16 GEMM at ~10 GB/s with a time growing with the rows, and each
 * eager op costs microseconds of dispatch. These kernels stream each weight row once per call, convert bf16 to
 * fp32 in registers, and fuse what sits between two Linear layers.
 *
 * Numerics follow the eager model op by op: products accumulate in fp32; every value the eager model would round
 * to the model dtype is rounded here too (round to nearest even). Each output row is summed in the same order
 * whatever the number of rows, so a request gets the same bits alone or batched.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define XG_AVX2 1
#endif

enum { XG_F32 = 0, XG_BF16 = 1 };
enum { XG_SILU = 0, XG_RELU = 1, XG_GELU = 2, XG_GELU_TANH = 3 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The value the eager model holds after rounding v to the tensor dtype. */
static inline float round_to(float v, int dt) { return dt == XG_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float load_at(const void* p, int64_t i, int dt) {
    return dt == XG_BF16 ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

static inline void store_at(void* p, int64_t i, float v, int dt) {
    if (dt == XG_BF16) ((uint16_t*)p)[i] = f32_to_bf16(v);
    else ((float*)p)[i] = v;
}

/* Rows of x as fp32 ([M, K]): x itself when it is fp32 already, else into buf when n fits, else malloc'd. */
#define XG_STACK_FLOATS 16384
static float* as_f32(const void* x, int64_t n, int dt, float* buf) {
    if (dt == XG_F32) return (float*)x;
    float* out = n <= XG_STACK_FLOATS ? buf : (float*)malloc(sizeof(float) * (size_t)n);
    if (!out) return NULL;
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(((const uint16_t*)x)[i]);
    return out;
}

/* Register tiles of dot products: s[i][j] = x[i] . w[j] over K, for MR fp32 input rows and NR weight rows (dtype
 * dt). Every (i, j) sums the same way whatever the tile: two fp32 accumulators, one over the chunks of 8 at
 * k = 0, 16, 32, ... and one over those at k = 8, 24, ..., a last chunk of 8 into the first, the two added, a fixed
 * horizontal sum (reduce8), then the scalar tail. So the bits of an output depend on K only, never on how many
 * rows share the call, and one row still has two independent chains of FMAs. MR and NR are literal constants at
 * each call, so the loops unroll onto registers: tiles of up to 4 outputs keep both chains (8 accumulators) and
 * read the data once; larger ones (up to 12 outputs, 12 of AVX2's 16 registers) run the chains in two passes. */
#ifdef XG_AVX2
static inline __m256 load8(const void* w, int64_t k, int dt) {
    if (dt == XG_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)w + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float*)w + k);
}

/* The lane sums of eight accumulators, [sum(a), sum(b), ..., sum(h)], each as
 * ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)). A lane only ever meets lanes of its own accumulator, so the
 * unused slots of a partial set can hold anything. */
static inline __m256 reduce8(__m256 a, __m256 b, __m256 c, __m256 d, __m256 e, __m256 f, __m256 g, __m256 h) {
#define XG_HALVES(p, q) _mm256_add_ps(_mm256_permute2f128_ps(p, q, 0x20), _mm256_permute2f128_ps(p, q, 0x31))
    const __m256 ae = XG_HALVES(a, e), bf = XG_HALVES(b, f), cg = XG_HALVES(c, g), dh = XG_HALVES(d, h);
#undef XG_HALVES
    /* per 128-bit lane, X'j = Xj + Xj+4: [A'0+A'2, B'0+B'2, A'1+A'3, B'1+B'3] and the same for C, D */
    const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(ae, bf), _mm256_unpackhi_ps(ae, bf));
    const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(cg, dh), _mm256_unpackhi_ps(cg, dh));
    return _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
}

/* All-ones in lanes 0 .. n-1 (n may exceed 8): the valid lanes of a set of 8 that ends past the data. */
static inline __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* e^x, 8 lanes: n = round(x log2 e), r = x - n ln 2 (in two parts), a degree-6 polynomial (Cephes' expf
 * coefficients), times 2^n through the exponent bits; within 2 ulp of expf on [-87, 88]. Inputs are clamped to that
 * range: below, e^-87 (~1e-38) instead of smaller numbers, which neither a softmax's sum (it holds e^0 = 1) nor
 * silu (x / (1 + e^-x) -> x e^x, |x| e^-87 < 1e-36) can tell from them; above, e^88 (~1.7e38), after which silu's
 * x / (1 + e^-x) is -0 as with infinity. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static inline __attribute__((always_inline)) void tile(const int MR, const int NR, const float* const* x,
                                                       const void* const* w, int dt, int K, float* s) {
    int k = K & ~15; /* the end of the whole chunks of 16 */
#ifdef XG_AVX2
    /* one chunk of 8 at k0 into acc[c]; the asm barriers keep each loaded chunk in a register for all its fmas
     * (gcc would otherwise reload it as a memory operand of every fma, doubling the loads) */
#define XG_CHUNK(c, k0)                                                                       \
    { if (MR >= NR) { /* NR weight chunks held, one input chunk at a time */                   \
        __m256 wv[6];                                                                         \
        for (int j = 0; j < NR; j++) {                                                        \
            wv[j] = load8(w[j], (k0), dt);                                                    \
            if (MR > 1) __asm__("" : "+x"(wv[j]));                                            \
        }                                                                                     \
        for (int i = 0; i < MR; i++) {                                                        \
            __m256 xv = _mm256_loadu_ps(x[i] + (k0));                                         \
            if (NR > 1) __asm__("" : "+x"(xv));                                               \
            for (int j = 0; j < NR; j++) acc[c][i][j] = _mm256_fmadd_ps(xv, wv[j], acc[c][i][j]); \
        }                                                                                     \
    } else { /* MR input chunks held, one weight chunk at a time */                          \
        __m256 xv[4];                                                                         \
        for (int i = 0; i < MR; i++) {                                                        \
            xv[i] = _mm256_loadu_ps(x[i] + (k0));                                             \
            __asm__("" : "+x"(xv[i]));                                                        \
        }                                                                                     \
        for (int j = 0; j < NR; j++) {                                                        \
            __m256 wv = load8(w[j], (k0), dt);                                                \
            if (MR > 1) __asm__("" : "+x"(wv));                                               \
            for (int i = 0; i < MR; i++) acc[c][i][j] = _mm256_fmadd_ps(xv[i], wv, acc[c][i][j]); \
        }                                                                                     \
    } }
    __m256 v[16];
    if (MR * NR <= 4) { /* both chains in registers, interleaved: one pass over the data (streaming calls) */
        __m256 acc[2][4][6];
        for (int c = 0; c < 2; c++)
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) acc[c][i][j] = _mm256_setzero_ps();
        for (int k0 = 0; k0 < k; k0 += 16) {
            /* bf16 weights streamed from memory: prefetch 4 KB ahead (into the next rows: they lie back to back).
             * NOTE (2 AVX2 cores, SmolLM2's 151 weights at one row): 14.0-14.4 -> 17.1-17.7 GB/s; 512 B to 2 KB
             * ahead 15.9-16.8; fp32 weights stream at ~18 GB/s without it, and did not gain. */
            if (dt == XG_BF16)
                for (int j = 0; j < NR; j++) _mm_prefetch((const char*)w[j] + 2 * (int64_t)k0 + 4096, _MM_HINT_T0);
            XG_CHUNK(0, k0)
            XG_CHUNK(1, k0 + 8)
        }
        if (k + 8 <= K) XG_CHUNK(0, k)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) v[i * NR + j] = _mm256_add_ps(acc[0][i][j], acc[1][i][j]);
    } else { /* up to 12 accumulators: one chain at a time, two passes (the data is in cache by the second) */
        __m256 acc[1][4][6];
        for (int c = 0; c < 2; c++) {
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++) acc[0][i][j] = _mm256_setzero_ps();
            for (int k0 = 8 * c; k0 < k; k0 += 16) XG_CHUNK(0, k0)
            if (c == 0 && k + 8 <= K) XG_CHUNK(0, k)
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < NR; j++)
                    v[i * NR + j] = c == 0 ? acc[0][i][j] : _mm256_add_ps(v[i * NR + j], acc[0][i][j]);
        }
    }
#undef XG_CHUNK
    if (k + 8 <= K) k += 8;
    for (int i = MR * NR; i < 16; i++) v[i] = v[0];
    _mm256_storeu_ps(s, reduce8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]));
    if (MR * NR > 8) {
        float hi[8];
        _mm256_storeu_ps(hi, reduce8(v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]));
        for (int i = 8; i < MR * NR; i++) s[i] = hi[i - 8];
    }
#else
    k = 0;
    for (int i = 0; i < MR * NR; i++) s[i] = 0.f;
#endif
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float t = s[i * NR + j];
            for (int kk = k; kk < K; kk++) t = fmaf(x[i][kk], load_at(w[j], kk, dt), t); /* as panels.h */
            s[i * NR + j] = t;
        }
}

#include "panels.h"

/* Weight rows per block: the unit of work a thread takes, and what stays in cache while every input row passes. */
#define XG_NB 12

/* Calls of up to this many rows take the weight rows one at a time (tiles of 1..4 rows x 1 weight row, both chains
 * interleaved): one sequential stream through the weights, as memory-bound calls need. Larger calls take tiles of
 * 4x3, 3x4, 2x6 or 1x6 (fewer loads per fma, for weights in cache or reused across many rows).
 * NOTE (2 AVX2 cores, SmolLM2 bf16 and the fp32 `small` preset): 8 rows stream 25-35 % faster than tiled; 32 rows
 * tiled 15-20 % faster than streamed. */
#define XG_STREAM_ROWS 8

/* s[i * XG_NB + j] = x[m + i] . w[n0 + j] for i < mb (1..4) and j < nb (1..XG_NB), M the call's rows. A weight
 * row past nb repeats the tile's first (computed, dropped). */
static inline __attribute__((always_inline)) void block_dots(const float* x, int64_t m, int mb, const void* w,
                                                             int dt, int K, int64_t n0, int nb, int M, float* s) {
    const int64_t wrow = (int64_t)K * (dt == XG_BF16 ? 2 : 4);
    const int stream = M <= XG_STREAM_ROWS;
    const int NR = stream ? 1 : mb == 4 ? 3 : mb == 3 ? 4 : 6;
    const float* xs[4];
    for (int i = 0; i < mb; i++) xs[i] = x + (m + i) * (int64_t)K;
    for (int j0 = 0; j0 < nb; j0 += NR) {
        const void* ws[6];
        for (int j = 0; j < NR; j++) ws[j] = (const char*)w + (n0 + (j0 + j < nb ? j0 + j : j0)) * wrow;
        float t[16];
#define XG_TILES(DT)                                                   \
        switch (stream ? mb : 4 + mb) {                                \
            case 1: tile(1, 1, xs, ws, DT, K, t); break;               \
            case 2: tile(2, 1, xs, ws, DT, K, t); break;               \
            case 3: tile(3, 1, xs, ws, DT, K, t); break;               \
            case 4: tile(4, 1, xs, ws, DT, K, t); break;               \
            case 5: tile(1, 6, xs, ws, DT, K, t); break;               \
            case 6: tile(2, 6, xs, ws, DT, K, t); break;               \
            case 7: tile(3, 4, xs, ws, DT, K, t); break;               \
            default: tile(4, 3, xs, ws, DT, K, t);                     \
        }
        if (dt == XG_BF16) { XG_TILES(XG_BF16) } else { XG_TILES(XG_F32) }  /* literal dtypes: no branches */
#undef XG_TILES
        for (int i = 0; i < mb; i++)
            for (int j = 0; j < NR && j0 + j < nb; j++) s[i * XG_NB + j0 + j] = t[i * NR + j];
    }
}

/* Parallel only when the call is big enough to pay for the threads. */
#define XG_PAR_MIN_MACS 65536

/* y's rows m .. m + mb - 1, outputs n0 .. n0 + nb - 1, from the sums s[i * stride + j]: the bias added and the
 * Linear output rounded to the dtype, then the residual added and rounded again; dt a literal. */
static inline __attribute__((always_inline)) void finish_linear(const float* s, int stride, int64_t m, int mb,
                                                                int nb, const void* bias, const void* res, void* y,
                                                                const int dt, int N, int64_t n0) {
    for (int i = 0; i < mb; i++) {
        const int64_t o = (m + i) * (int64_t)N + n0;
        int j = 0;
#ifdef XG_AVX2
        if (dt == XG_F32) /* fp32 rounds nothing: the same adds on 8 lanes */
            for (; j + 8 <= nb; j += 8) {
                __m256 v = _mm256_loadu_ps(s + i * stride + j);
                if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps((const float*)bias + n0 + j));
                if (res) v = _mm256_add_ps(v, _mm256_loadu_ps((const float*)res + o + j));
                _mm256_storeu_ps((float*)y + o + j, v);
            }
#endif
        for (; j < nb; j++) {
            const float v = s[i * stride + j];
            const float r = round_to(bias ? v + load_at(bias, n0 + j, dt) : v, dt);
            store_at(y, o + j, res ? r + load_at(res, o + j, dt) : r, dt);
        }
    }
}

/* One block of xg_linear: weight rows n0 .. n0 + nb for every input row; dt a literal at each call. */
static inline __attribute__((always_inline)) void linear_block(const float* xf, const void* w, const void* bias,
                                                               const void* res, void* y, const int dt, int M,
                                                               int K, int N, int64_t n0, int nb) {
    for (int64_t m = 0; m < M; m += 4) {
        const int mb = M - m < 4 ? (int)(M - m) : 4;
        float s[4 * XG_NB];
        block_dots(xf, m, mb, w, dt, K, n0, nb, M, s);
        finish_linear(s, XG_NB, m, mb, nb, bias, res, y, dt, N, n0);
    }
}

#ifdef XG_AVX2
/* One panel of xg_linear: outputs n0 .. n0 + nb (n0 a multiple of XG_NR) for every input row. */
static inline __attribute__((always_inline)) void linear_panel(const float* xf, const void* wp, const void* bias,
                                                               const void* res, void* y, const int dt, int M,
                                                               int K, int N, int64_t n0, int nb) {
    const void* panel = panel_at(wp, dt, K, n0);
    for (int64_t m = 0; m < M; m += XG_MR) {
        const int mb = M - m < XG_MR ? (int)(M - m) : XG_MR;
        float s[XG_MR * XG_NR];
        panel_rows(dt, xf, m, mb, K, panel, s);
        finish_linear(s, XG_NR, m, mb, nb, bias, res, y, dt, N, n0);
    }
}
#endif

/* Whether a call of M rows takes the weights' panels (wp, xg_pack_panels) over its rows: from XG_STREAM_ROWS + 1
 * rows on, where the weights are reused from cache (the same bits either way). */
static inline int use_panels(const void* wp, int M) {
#ifdef XG_AVX2
    return wp != NULL && M > XG_STREAM_ROWS;
#else
    (void)wp, (void)M;
    return 0;
#endif
}

/* y[M, N] = res + (x[M, K] @ w[N, K]^T + bias): the Linear layer's output rounded to the dtype, then the
 * residual added and rounded again (as ``res + linear(x)``). wp (w's panels), bias and res may be NULL. */
int xg_linear(const void* x, const void* w, const void* wp, const void* bias, const void* res, void* y, int dt,
              int M, int K, int N) {
    float buf[XG_STACK_FLOATS];
    float* xf = as_f32(x, (int64_t)M * K, dt, buf);
    if (!xf) return 1;
    const int panels = use_panels(wp, M), width = panels ? XG_NR : XG_NB;
    const int64_t blocks = (N + width - 1) / width;
#pragma omp parallel for schedule(static) if ((int64_t)M * K * N >= XG_PAR_MIN_MACS)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * width;
        const int nb = N - n0 < width ? (int)(N - n0) : width;
#ifdef XG_AVX2
        if (panels) {
            if (dt == XG_BF16) linear_panel(xf, wp, bias, res, y, XG_BF16, M, K, N, n0, nb);
            else linear_panel(xf, wp, bias, res, y, XG_F32, M, K, N, n0, nb);
            continue;
        }
#endif
        if (dt == XG_BF16) linear_block(xf, w, bias, res, y, XG_BF16, M, K, N, n0, nb);
        else linear_block(xf, w, bias, res, y, XG_F32, M, K, N, n0, nb);
    }
    if (xf != x && xf != buf) free(xf);
    return 0;
}

static inline float activate(float v, int act) {
    switch (act) {
        case XG_SILU: return v / (1.f + expf(-v));
        case XG_RELU: return v > 0.f ? v : 0.f;
        case XG_GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
        default: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    }
}

/* Rows per pass of xg_gated over a weight block: the gate's outputs for all of them, then the up projection's,
 * so each weight block stays in L1 while the rows pass (interleaving the two halved the speed at 32 rows). */
#define XG_GATED_ROWS 32

/* y's rows m0 .. m1 - 1, outputs n0 .. n0 + nb - 1, from the gate's and the up projection's sums g and u
 * ([m1 - m0, stride] each; g is overwritten): act(g + b1) * (u + b3), each rounded as the eager ops round. */
static inline __attribute__((always_inline)) void finish_gated(float* g, const float* u, int stride, int64_t m0,
                                                               int64_t m1, int nb, const void* b1, const void* b3,
                                                               void* y, const int dt, int act, int N, int64_t n0) {
#ifdef XG_AVX2
    if (dt == XG_F32 && act == XG_SILU && !b1 && !b3) { /* silu(g) * u on 8 lanes; fp32 rounds nothing else */
        /* every element through exp8 (the last set masked), whatever the row count: the same bits batched */
        const int64_t count = (m1 - m0) * stride;
        for (int64_t i = 0; i < count; i += 8) {
            const __m256i mask = lanes_below((int)(count - i));
            const __m256 gv = _mm256_maskload_ps(g + i, mask);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            _mm256_maskstore_ps(g + i, mask, _mm256_mul_ps(s, _mm256_maskload_ps(u + i, mask)));
        }
        for (int64_t m = m0; m < m1; m++)
            memcpy((float*)y + m * (int64_t)N + n0, g + (m - m0) * stride, sizeof(float) * (size_t)nb);
        return;
    }
#endif
    for (int64_t m = m0; m < m1; m++)
        for (int j = 0; j < nb; j++) {
            const int64_t n = n0 + j, i = (m - m0) * stride + j;
            const float gv = round_to(b1 ? g[i] + load_at(b1, n, dt) : g[i], dt);
            const float uv = round_to(b3 ? u[i] + load_at(b3, n, dt) : u[i], dt);
            store_at(y, m * (int64_t)N + n, round_to(activate(gv, act), dt) * uv, dt);
        }
}

/* One block of xg_gated: weight rows n0 .. n0 + nb of w1 and w3 for every input row; dt a literal. With panels
 * (wp1 and wp3 not NULL), a block is one panel (n0 a multiple of XG_NR). */
static inline __attribute__((always_inline)) void gated_block(const float* xf, const void* w1, const void* wp1,
                                                              const void* b1, const void* w3, const void* wp3,
                                                              const void* b3, void* y, const int dt, int act, int M,
                                                              int K, int N, int64_t n0, int nb) {
    for (int64_t m0 = 0; m0 < M; m0 += XG_GATED_ROWS) {
        const int64_t m1 = M - m0 < XG_GATED_ROWS ? M : m0 + XG_GATED_ROWS;
        float g[XG_GATED_ROWS * XG_NR], u[XG_GATED_ROWS * XG_NR]; /* XG_NR >= XG_NB */
#ifdef XG_AVX2
        if (wp1) {
            const void *p1 = panel_at(wp1, dt, K, n0), *p3 = panel_at(wp3, dt, K, n0);
            for (int64_t m = m0; m < m1; m += XG_MR)
                panel_rows(dt, xf, m, m1 - m < XG_MR ? (int)(m1 - m) : XG_MR, K, p1, g + (m - m0) * XG_NR);
            for (int64_t m = m0; m < m1; m += XG_MR)
                panel_rows(dt, xf, m, m1 - m < XG_MR ? (int)(m1 - m) : XG_MR, K, p3, u + (m - m0) * XG_NR);
            finish_gated(g, u, XG_NR, m0, m1, nb, b1, b3, y, dt, act, N, n0);
            continue;
        }
#endif
        (void)wp3;
        for (int64_t m = m0; m < m1; m += 4)
            block_dots(xf, m, m1 - m < 4 ? (int)(m1 - m) : 4, w1, dt, K, n0, nb, M, g + (m - m0) * XG_NB);
        for (int64_t m = m0; m < m1; m += 4)
            block_dots(xf, m, m1 - m < 4 ? (int)(m1 - m) : 4, w3, dt, K, n0, nb, M, u + (m - m0) * XG_NB);
        finish_gated(g, u, XG_NB, m0, m1, nb, b1, b3, y, dt, act, N, n0);
    }
}

/* y[M, N] = act(x @ w1^T + b1) * (x @ w3^T + b3), each Linear output, the activation and the product rounded to
 * the dtype (the gated feed-forward's first half). The panels wp1, wp3 (both or neither) and b1, b3 may be NULL. */
int xg_gated(const void* x, const void* w1, const void* wp1, const void* b1, const void* w3, const void* wp3,
             const void* b3, void* y, int dt, int act, int M, int K, int N) {
    float buf[XG_STACK_FLOATS];
    float* xf = as_f32(x, (int64_t)M * K, dt, buf);
    if (!xf) return 1;
    const int panels = use_panels(wp1, M) && wp3, width = panels ? XG_NR : XG_NB;
    if (!panels) wp1 = wp3 = NULL;
    const int64_t blocks = (N + width - 1) / width;
#pragma omp parallel for schedule(static) if ((int64_t)M * K * N >= XG_PAR_MIN_MACS / 2)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * width;
        const int nb = N - n0 < width ? (int)(N - n0) : width;
        if (dt == XG_BF16) gated_block(xf, w1, wp1, b1, w3, wp3, b3, y, XG_BF16, act, M, K, N, n0, nb);
        else gated_block(xf, w1, wp1, b1, w3, wp3, b3, y, XG_F32, act, M, K, N, n0, nb);
    }
    if (xf != x && xf != buf) free(xf);
    return 0;
}

/* y[M, K] = w * rms_norm(x): normalised in fp32 and rounded to the dtype, then scaled by w and rounded again.
 * The sum of squares accumulates in double (4 lanes on AVX2): each square is exact there, and the sum's rounding
 * error stays far below fp32's, where the mean square is taken. */
int xg_rmsnorm(const void* x, const void* w, void* y, int dt, int M, int K, float eps) {
#pragma omp parallel for schedule(static) if ((int64_t)M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        const int64_t o = m * (int64_t)K;
        const char* xr = (const char*)x + o * (dt == XG_BF16 ? 2 : 4);
        int k = 0;
        double ss = 0.0;
#ifdef XG_AVX2
        __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
        for (; k + 8 <= K; k += 8) {
            const __m256 v = load8(xr, k, dt);
            const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            s0 = _mm256_fmadd_pd(lo, lo, s0);
            s1 = _mm256_fmadd_pd(hi, hi, s1);
        }
        double part[4];
        _mm256_storeu_pd(part, _mm256_add_pd(s0, s1));
        ss = (part[0] + part[2]) + (part[1] + part[3]);
#endif
        for (; k < K; k++) {
            const double v = load_at(xr, k, dt);
            ss += v * v;
        }
        const float r = 1.f / sqrtf((float)(ss / K) + eps);
        k = 0;
#ifdef XG_AVX2
        if (dt == XG_F32) { /* fp32 rounds nothing between the two products */
            const __m256 rv = _mm256_set1_ps(r);
            for (; k + 8 <= K; k += 8) {
                const __m256 xn = _mm256_mul_ps(_mm256_loadu_ps((const float*)xr + k), rv);
                _mm256_storeu_ps((float*)y + o + k, _mm256_mul_ps(_mm256_loadu_ps((const float*)w + k), xn));
            }
        }
#endif
        for (; k < K; k++) store_at(y, o + k, load_at(w, k, dt) * round_to(load_at(xr, k, dt) * r, dt), dt);
    }
    return 0;
}

#include "attention.h"

/* A whole Llama decoder layer's decode step for n rows (one rank: nothing to all-reduce), out = x +
 * attention(norm1(x)), then out += ffn(norm2(out)): the calls the layer makes one by one (xg_rmsnorm,
 * xg_linear, xg_attn_decode, xg_gated), in one call, so the same bits. Biases may be NULL. x and out [n, dim].
 * attend = 0 leaves the attention core out (its output reads as zeros; nothing written to the cache): the rest of
 * the layer, as the profiler times it. */
int xg_decode_layer(const void* x, void* out, const void* norm1, const void* wqkv, const void* bqkv,
                    const void* cos, const void* sin, int64_t cs_stride, const int64_t* pos, const int64_t* rows,
                    int64_t row0, float* kc, float* vc, int64_t max_len, const void* wo, const void* bo,
                    const void* norm2, const void* w1, const void* b1, const void* w3, const void* b3,
                    const void* w2, const void* b2, const void* const* panels, int dt, int act, int n, int dim,
                    int H, int Hkv, int D, int ffn, float eps, float scale, int attend) {
    const void* const none[5] = {NULL, NULL, NULL, NULL, NULL};
    const void* const* p = panels ? panels : none; /* wqkv, wo, w1, w3, w2 */
    const int64_t width = (int64_t)(H + 2 * Hkv) * D, esize = dt == XG_BF16 ? 2 : 4;
    char* buf = (char*)malloc((size_t)(n * (2 * (int64_t)dim + width + (int64_t)H * D + ffn) * esize));
    if (!buf) return 1;
    char* normed = buf;
    char* qkv = normed + n * (int64_t)dim * esize;
    char* att = qkv + n * width * esize;
    char* h = att + n * (int64_t)H * D * esize;
    char* g = h + n * (int64_t)dim * esize;
    int rc = xg_rmsnorm(x, norm1, normed, dt, n, dim, eps);
    rc |= xg_linear(normed, wqkv, p[0], bqkv, NULL, qkv, dt, n, dim, (int)width);
    if (attend)
        rc |= xg_attn_decode(qkv, cos, sin, cs_stride, pos, rows, row0, kc, vc, max_len, att, dt, n, H, Hkv, D, scale);
    else
        memset(att, 0, (size_t)(n * (int64_t)H * D * esize));
    rc |= xg_linear(att, wo, p[1], bo, x, h, dt, n, H * D, dim);
    rc |= xg_rmsnorm(h, norm2, normed, dt, n, dim, eps);
    rc |= xg_gated(normed, w1, p[2], b1, w3, p[3], b3, g, dt, act, n, dim, ffn);
    rc |= xg_linear(g, w2, p[4], b2, h, out, dt, n, ffn, dim);
    free(buf);
    return rc;
}

/* So the loader can check it has the build it expects. */
int xg_abi_version(void) { return 7; }

/* Calls of more rows than this take the weights' panels when given them (runner.cpu_kernels.STREAM_ROWS). */
int xg_stream_rows(void) { return XG_STREAM_ROWS; }
