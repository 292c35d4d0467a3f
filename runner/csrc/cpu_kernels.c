/* CPU decode kernels of the built-in backend: few-row Linear layers (GEMV-like), the gated feed-forward and
 * RMSNorm, for fp32 and bf16 tensors. Built by runner/cpu_kernels.py (gcc -O3 -march=native -fopenmp) and called
 * through ctypes on contiguous torch tensors; torch's own ops serve every other case.
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

/* Dot products of up to 4 fp32 rows x[r] (r < mb) with one weight row w (dtype dt) of length K, into s[r].
 * Per row: two accumulators over chunks of 16, then one chunk of 8, then the scalar tail, then a fixed pairwise
 * horizontal sum, so the order of additions depends on K only. */
#ifdef XG_AVX2
static inline __m256 load8(const void* w, int64_t k, int dt) {
    if (dt == XG_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)w + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float*)w + k);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void dot4(const float* const* x, int mb, const void* w, int dt, int K, float* s) {
    /* Named accumulators, so they stay in registers (arrays indexed by the runtime mb would be spilled). */
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    int k = 0;
    if (mb == 1) {
        for (; k + 16 <= K; k += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), load8(w, k, dt), a0);
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 8), load8(w, k + 8, dt), b0);
        }
    } else { /* 2-4 rows (x repeats a row to fill four) */
        for (; k + 16 <= K; k += 16) {
            __m256 w0 = load8(w, k, dt), w1 = load8(w, k + 8, dt);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), w0, a0);
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 8), w1, b0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), w0, a1);
            b1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 8), w1, b1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k), w0, a2);
            b2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k + 8), w1, b2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k), w0, a3);
            b3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k + 8), w1, b3);
        }
    }
    if (k + 8 <= K) {
        __m256 w0 = load8(w, k, dt);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), w0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), w0, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k), w0, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k), w0, a3);
        k += 8;
    }
    const __m256 acc[4] = {_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                           _mm256_add_ps(a3, b3)};
    for (int r = 0; r < mb; r++) {
        float t = hsum8(acc[r]);
        for (int kk = k; kk < K; kk++) t += x[r][kk] * load_at(w, kk, dt);
        s[r] = t;
    }
}
#else
static inline void dot4(const float* const* x, int mb, const void* w, int dt, int K, float* s) {
    for (int r = 0; r < mb; r++) {
        float t = 0.f;
        for (int k = 0; k < K; k++) t += x[r][k] * load_at(w, k, dt);
        s[r] = t;
    }
}
#endif

/* The rounded output of weight row n for input rows x[m .. m + mb): x @ w[n] (+ bias[n]), in the model dtype. */
static inline void linear_rows(const float* x, int64_t m, int mb, const void* w, const void* bias, int dt, int K,
                               int64_t n, float* s) {
    const float* xs[4];
    for (int r = 0; r < 4; r++) xs[r] = x + (m + (r < mb ? r : 0)) * (int64_t)K;
    dot4(xs, mb, (const char*)w + n * (int64_t)K * (dt == XG_BF16 ? 2 : 4), dt, K, s);
    for (int r = 0; r < mb; r++) s[r] = round_to(bias ? s[r] + load_at(bias, n, dt) : s[r], dt);
}

/* Parallel only when the call is big enough to pay for the threads. */
#define XG_PAR_MIN_MACS 65536

/* y[M, N] = res + (x[M, K] @ w[N, K]^T + bias): the Linear layer's output rounded to the dtype, then the
 * residual added and rounded again (as ``res + linear(x)``). bias and res may be NULL. */
int xg_linear(const void* x, const void* w, const void* bias, const void* res, void* y, int dt, int M, int K,
              int N) {
    float buf[XG_STACK_FLOATS];
    float* xf = as_f32(x, (int64_t)M * K, dt, buf);
    if (!xf) return 1;
#pragma omp parallel for schedule(static) if ((int64_t)M * K * N >= XG_PAR_MIN_MACS)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += 4) {
            int mb = M - m < 4 ? (int)(M - m) : 4;
            float s[4];
            linear_rows(xf, m, mb, w, bias, dt, K, n, s);
            for (int r = 0; r < mb; r++) {
                int64_t i = (m + r) * (int64_t)N + n;
                store_at(y, i, res ? s[r] + load_at(res, i, dt) : s[r], dt);
            }
        }
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

/* y[M, N] = act(x @ w1^T + b1) * (x @ w3^T + b3), each Linear output, the activation and the product rounded to
 * the dtype (the gated feed-forward's first half). b1 and b3 may be NULL. */
int xg_gated(const void* x, const void* w1, const void* b1, const void* w3, const void* b3, void* y, int dt,
             int act, int M, int K, int N) {
    float buf[XG_STACK_FLOATS];
    float* xf = as_f32(x, (int64_t)M * K, dt, buf);
    if (!xf) return 1;
#pragma omp parallel for schedule(static) if ((int64_t)M * K * N >= XG_PAR_MIN_MACS / 2)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += 4) {
            int mb = M - m < 4 ? (int)(M - m) : 4;
            float g[4], u[4];
            linear_rows(xf, m, mb, w1, b1, dt, K, n, g);
            linear_rows(xf, m, mb, w3, b3, dt, K, n, u);
            for (int r = 0; r < mb; r++)
                store_at(y, (m + r) * (int64_t)N + n, round_to(activate(g[r], act), dt) * u[r], dt);
        }
    }
    if (xf != x && xf != buf) free(xf);
    return 0;
}

/* y[M, K] = w * rms_norm(x): normalised in fp32 and rounded to the dtype, then scaled by w and rounded again. */
int xg_rmsnorm(const void* x, const void* w, void* y, int dt, int M, int K, float eps) {
#pragma omp parallel for schedule(static) if ((int64_t)M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        int64_t o = m * (int64_t)K;
        double ss = 0.0;
        for (int k = 0; k < K; k++) {
            float v = load_at(x, o + k, dt);
            ss += (double)v * v;
        }
        float r = 1.f / sqrtf((float)(ss / K) + eps);
        for (int k = 0; k < K; k++)
            store_at(y, o + k, load_at(w, k, dt) * round_to(load_at(x, o + k, dt) * r, dt), dt);
    }
    return 0;
}

/* One decode step of attention for n rows, each at its own position: RoPE on the new query and key (when cos is
 * given), the key and value written into the fp32 KV cache, then each query head attends to its KV head's keys
 * 0..pos (grouped heads: query head h reads KV head h / (H / Hkv)).
 *
 * qkv [n, (H + 2 Hkv) D] (dtype dt): queries, keys, values side by side, as the fused projection gives them.
 * cos, sin [*, D] (dt): the RoPE rows of each query's position, row r at r * cs_stride (0: one row for all);
 *   sin carries rotate_half's sign. NULL: no RoPE (learned positions).
 * pos [n]: positions; rows [n]: cache rows (NULL: rows row0 .. row0 + n - 1).
 * kc, vc: this layer's cache [max_rows, Hkv, max_len, D] (fp32).
 * out [n, H D] (dt): attention output, rounded to the dtype.
 * Numerics as the eager layer: RoPE's two products and their sum rounded to the dtype; scores, softmax and the
 * weighted sum in fp32. */
int xg_attn_decode(const void* qkv, const void* cos, const void* sin, int64_t cs_stride, const int64_t* pos,
                   const int64_t* rows, int64_t row0, float* kc, float* vc, int64_t max_len, void* out, int dt,
                   int n, int H, int Hkv, int D, float scale) {
    const int G = H / Hkv, half = D / 2;
    const int64_t width = (int64_t)(H + 2 * Hkv) * D;
    int64_t longest = 0;
    for (int r = 0; r < n; r++) longest = pos[r] + 1 > longest ? pos[r] + 1 : longest;
    int failed = 0;
#pragma omp parallel if ((int64_t)n * H * longest * D >= (1 << 15))
    {
        float* buf = (float*)malloc(sizeof(float) * (size_t)(longest + 3 * D));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < (int64_t)n * Hkv; t++) {
            if (!buf) continue;
            const int r = (int)(t / Hkv), g = (int)(t % Hkv);
            const int64_t p = pos[r], L = p + 1, row = rows ? rows[r] : row0 + r;
            float* sc = buf;
            float* x = buf + longest;  /* one head, as loaded */
            float* xr = x + D;         /* the head after RoPE */
            float* acc = xr + D;
            const int64_t base = (int64_t)r * width;
            float* kd = kc + ((row * Hkv + g) * max_len) * D;
            float* vd = vc + ((row * Hkv + g) * max_len) * D;
            /* rotate one head of qkv at offset `off` into xr */
#define XG_ROPE(off)                                                                                  \
            for (int d = 0; d < D; d++) x[d] = load_at(qkv, base + (off) + d, dt);                   \
            if (cos) {                                                                                \
                for (int d = 0; d < D; d++) {                                                         \
                    float c = load_at(cos, r * cs_stride + d, dt), s = load_at(sin, r * cs_stride + d, dt); \
                    float rolled = x[d < half ? d + half : d - half];                                 \
                    xr[d] = round_to(round_to(x[d] * c, dt) + round_to(rolled * s, dt), dt);          \
                }                                                                                     \
            } else                                                                                    \
                memcpy(xr, x, sizeof(float) * (size_t)D);
            XG_ROPE((int64_t)(H + g) * D)
            memcpy(kd + p * D, xr, sizeof(float) * (size_t)D);
            for (int d = 0; d < D; d++) vd[p * D + d] = load_at(qkv, base + (int64_t)(H + Hkv + g) * D + d, dt);
            for (int q = g * G; q < (g + 1) * G; q++) {
                XG_ROPE((int64_t)q * D)
                float m = -INFINITY;
                for (int64_t j = 0; j < L; j++) {
                    const float* kj = kd + j * D;
                    float s = 0.f;
#pragma omp simd reduction(+ : s)
                    for (int d = 0; d < D; d++) s += xr[d] * kj[d];
                    sc[j] = s * scale;
                    m = sc[j] > m ? sc[j] : m;
                }
                float z = 0.f;
                for (int64_t j = 0; j < L; j++) {
                    sc[j] = expf(sc[j] - m);
                    z += sc[j];
                }
                for (int d = 0; d < D; d++) acc[d] = 0.f;
                for (int64_t j = 0; j < L; j++) {
                    const float* vj = vd + j * D;
                    const float w = sc[j];
#pragma omp simd
                    for (int d = 0; d < D; d++) acc[d] += w * vj[d];
                }
                for (int d = 0; d < D; d++) store_at(out, (int64_t)r * H * D + (int64_t)q * D + d, acc[d] / z, dt);
            }
#undef XG_ROPE
        }
        free(buf);
    }
    return failed;
}

/* A whole Llama decoder layer's decode step for n rows (one rank: nothing to all-reduce), out = x +
 * attention(norm1(x)), then out += ffn(norm2(out)): the calls the layer makes one by one (xg_rmsnorm,
 * xg_linear, xg_attn_decode, xg_gated), in one call, so the same bits. Biases may be NULL. x and out [n, dim].
 * attend = 0 leaves the attention core out (its output reads as zeros; nothing written to the cache): the rest of
 * the layer, as the profiler times it. */
int xg_decode_layer(const void* x, void* out, const void* norm1, const void* wqkv, const void* bqkv,
                    const void* cos, const void* sin, int64_t cs_stride, const int64_t* pos, const int64_t* rows,
                    int64_t row0, float* kc, float* vc, int64_t max_len, const void* wo, const void* bo,
                    const void* norm2, const void* w1, const void* b1, const void* w3, const void* b3,
                    const void* w2, const void* b2, int dt, int act, int n, int dim, int H, int Hkv, int D,
                    int ffn, float eps, float scale, int attend) {
    const int64_t width = (int64_t)(H + 2 * Hkv) * D, esize = dt == XG_BF16 ? 2 : 4;
    char* buf = (char*)malloc((size_t)(n * (2 * (int64_t)dim + width + (int64_t)H * D + ffn) * esize));
    if (!buf) return 1;
    char* normed = buf;
    char* qkv = normed + n * (int64_t)dim * esize;
    char* att = qkv + n * width * esize;
    char* h = att + n * (int64_t)H * D * esize;
    char* g = h + n * (int64_t)dim * esize;
    int rc = xg_rmsnorm(x, norm1, normed, dt, n, dim, eps);
    rc |= xg_linear(normed, wqkv, bqkv, NULL, qkv, dt, n, dim, (int)width);
    if (attend)
        rc |= xg_attn_decode(qkv, cos, sin, cs_stride, pos, rows, row0, kc, vc, max_len, att, dt, n, H, Hkv, D, scale);
    else
        memset(att, 0, (size_t)(n * (int64_t)H * D * esize));
    rc |= xg_linear(att, wo, bo, x, h, dt, n, H * D, dim);
    rc |= xg_rmsnorm(h, norm2, normed, dt, n, dim, eps);
    rc |= xg_gated(normed, w1, b1, w3, b3, g, dt, act, n, dim, ffn);
    rc |= xg_linear(g, w2, b2, h, out, dt, n, ffn, dim);
    free(buf);
    return rc;
}

/* So the loader can check it has the build it expects. */
int xg_abi_version(void) { return 4; }
