/* Decode attention (included by cpu_kernels.c, which defines the helpers used here): each row's new query
 * attends to its own cache row's keys, grouped heads, RoPE and the KV-cache write in the same call. */

#ifdef XG_AVX2
/* One query head of a decode step over keys 0 .. L-1 of one cache row and KV head (D = 8 C; C a literal at each
 * call, so the chunks stay in registers): scores q . k_j
 * (each a sum over D/8 chunks, then reduce8 eight keys at a time), softmax in fp32, the weighted sum of the values;
 * acc [D] gets the unnormalised sum, the return value is the softmax's denominator. sc holds L + 8 floats. */
static inline __attribute__((always_inline)) float attend_head8(const int C, const float* q, const float* kd,
                                                                const float* vd, int64_t L, float scale, float* sc,
                                                                float* acc) {
    const int D = 8 * C;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < L; j0 += 8) {
        __m256 a[8];
        const int nk = L - j0 < 8 ? (int)(L - j0) : 8;
        for (int t = 0; t < 8; t++) {
            const float* kj = kd + (j0 + (t < nk ? t : 0)) * D; /* a partial set repeats key j0 (discarded) */
            __m256 s = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(kj));
            for (int c = 1; c < C; c++) s = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(kj + 8 * c), s);
            a[t] = s;
        }
        __m256 s8 = _mm256_mul_ps(reduce8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]), _mm256_set1_ps(scale));
        if (nk < 8) { /* unused slots (copies of key j0) must not count in the softmax: -inf */
            s8 = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s8, _mm256_castsi256_ps(lanes_below(nk)));
        }
        _mm256_storeu_ps(sc + j0, s8);
        vmax = _mm256_max_ps(vmax, s8);
    }
    float mx[8];
    _mm256_storeu_ps(mx, vmax);
    float m = mx[0];
    for (int t = 1; t < 8; t++) m = mx[t] > m ? mx[t] : m;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vz = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < L; j0 += 8) {
        /* A partial set's unused slots hold -inf, whose e^-87 (~1e-38) cannot change a sum that holds e^0 = 1 */
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j0), vm));
        _mm256_storeu_ps(sc + j0, e);
        vz = _mm256_add_ps(vz, e);
    }
    float zs[8];
    _mm256_storeu_ps(zs, vz);
    const float z = ((zs[0] + zs[4]) + (zs[2] + zs[6])) + ((zs[1] + zs[5]) + (zs[3] + zs[7]));
    __m256 o[16]; /* C <= 16 */
    for (int c = 0; c < C; c++) o[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; j++) {
        const __m256 w = _mm256_set1_ps(sc[j]);
        const float* vj = vd + j * D;
        for (int c = 0; c < C; c++) o[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8 * c), o[c]);
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(acc + 8 * c, o[c]);
    return z;
}

/* attend_head8 for head sizes 8, 16, 32, 64 and 128 (the caller checks D). */
static float attend_head(const float* q, const float* kd, const float* vd, int64_t L, int D, float scale, float* sc,
                         float* acc) {
    switch (D) {
        case 8: return attend_head8(1, q, kd, vd, L, scale, sc, acc);
        case 16: return attend_head8(2, q, kd, vd, L, scale, sc, acc);
        case 32: return attend_head8(4, q, kd, vd, L, scale, sc, acc);
        case 64: return attend_head8(8, q, kd, vd, L, scale, sc, acc);
        default: return attend_head8(16, q, kd, vd, L, scale, sc, acc);
    }
}
#endif

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
        float* buf = (float*)malloc(sizeof(float) * (size_t)(longest + 8 + 3 * D));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic) /* rows of different lengths: uneven tasks */
        for (int64_t t = 0; t < (int64_t)n * Hkv; t++) {
            if (!buf) continue;
            const int r = (int)(t / Hkv), g = (int)(t % Hkv);
            const int64_t p = pos[r], L = p + 1, row = rows ? rows[r] : row0 + r;
            float* sc = buf;               /* longest + 8 scores: the vector path writes whole sets of 8 */
            float* x = buf + longest + 8;  /* one head, as loaded */
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
#ifdef XG_AVX2
                if (D == 8 || D == 16 || D == 32 || D == 64 || D == 128) {
                    const float z = attend_head(xr, kd, vd, L, D, scale, sc, acc);
                    for (int d = 0; d < D; d++) store_at(out, (int64_t)r * H * D + (int64_t)q * D + d, acc[d] / z, dt);
                    continue;
                }
#endif
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
