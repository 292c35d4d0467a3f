/* Panels: a Linear weight [N, K] re-laid for batches of 9 to 64 rows (included by cpu_kernels.c, which defines the
 * helpers used here).
 *
 * The dot-product tiles of cpu_kernels.c read weight rows as torch stores them, which one row streaming through
 * memory needs; with many rows each tile pays a horizontal sum and a scalar epilogue per output, and at K = 256 ran
 * at 30-36 GFLOP/s of a core's ~89. Here every input row's value x[k] is broadcast against 16 consecutive outputs'
 * weights at k (an outer product), so the weights must lie k-major in panels of 16 outputs.
 *
 * The sums are those of the dot-product tiles, bit for bit: there an output's products fall into 16 partial sums
 * (8 lanes of two chains; partial p takes k = p, p + 16, p + 32, ... in order, and with a chunk of 8 left over,
 * partials 0..7 take one more), then v_l = P_l + P_l+8 and ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)),
 * then the last K % 8 products one by one. Here each partial is accumulated over its own k in the same order (a
 * pass per partial, 16 outputs per vector pair), and the partials meet in the same tree, 8 outputs per vector
 * add. So a request gets the same bits alone (streamed) or in a batch (panels).
 *
 * Layout of the panel of outputs n0 .. n0 + 15 (an output past N has zero weights): for p = 0 .. 15, for each k of
 * partial p in order, the 16 weights w[n0 + j][k]; then for each k of the last K % 8, the same. The model's dtype,
 * so a bf16 panel converts in registers as the tiles do. */

#define XG_NR 16 /* outputs per panel */
#define XG_MR 6  /* input rows per register tile: 12 accumulators, 2 weight vectors, 1 broadcast */

/* Products partial p (0..15) takes: one per whole chunk of 16, one more for p < 8 when a chunk of 8 is left. */
static inline int partial_len(int p, int K) { return (K >> 4) + (p < 8 && (K & ~15) + 8 <= K ? 1 : 0); }

/* The first k of the tail the tiles add one product at a time. */
static inline int tail_start(int K) { return (K & ~15) + ((K & ~15) + 8 <= K ? 8 : 0); }

/* The k of partial p's t-th product. */
static inline int partial_k(int p, int t, int K) { return t < (K >> 4) ? 16 * t + p : (K & ~15) + p; }

int64_t xg_panel_elems(int N, int K) { return (int64_t)((N + XG_NR - 1) / XG_NR) * XG_NR * K; }

/* One panel of xg_pack_panels, T the element type (uint16_t for bf16, uint32_t for fp32: the bits are copied). */
#define XG_PACK_PANEL(T)                                                                        \
    {                                                                                           \
        const T* src = (const T*)w;                                                             \
        T* o = (T*)out + b * XG_NR * (int64_t)K;                                                \
        for (int p = 0; p < 17; p++) /* the 16 partials, then the tail as a 17th */             \
            for (int t = 0; t < (p < 16 ? partial_len(p, K) : K - kt); t++, o += XG_NR) {       \
                const int k = p < 16 ? partial_k(p, t, K) : kt + t;                             \
                for (int j = 0; j < XG_NR; j++) o[j] = n0 + j < N ? src[(n0 + j) * K + k] : 0;  \
            }                                                                                   \
    }

/* out (xg_panel_elems(N, K) elements of w's dtype) = w [N, K] as panels. */
int xg_pack_panels(const void* w, int dt, int N, int K, void* out) {
    const int kt = tail_start(K);
    const int64_t panels = (N + XG_NR - 1) / XG_NR;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < panels; b++) {
        const int64_t n0 = b * XG_NR;
        if (dt == XG_BF16) XG_PACK_PANEL(uint16_t)
        else XG_PACK_PANEL(uint32_t)
    }
    return 0;
}
#undef XG_PACK_PANEL

#ifdef XG_AVX2
/* s[i * XG_NR + j] = x[i] . w[n0 + j] for MR rows of x (fp32, [MR, K]) and one panel; MR and dt literals. */
static inline __attribute__((always_inline)) void panel_tile(const int MR, const int dt, const float* x, int K,
                                                             const void* panel, float* s) {
    float part[16][XG_MR][XG_NR] __attribute__((aligned(32)));
    const int64_t es = dt == XG_BF16 ? 2 : 4;
    const char* wp = (const char*)panel;
    const int T = K >> 4, extra = (K & ~15) + 8 <= K;
    for (int p = 0; p < 16; p++) {
        __m256 acc[XG_MR][2];
        for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
#define XG_PRODUCT(xk)                                                          \
        {                                                                       \
            const __m256 w0 = load8(wp, 0, dt), w1 = load8(wp, 8, dt);          \
            for (int i = 0; i < MR; i++) {                                      \
                const __m256 b = _mm256_broadcast_ss((xk) + (int64_t)i * K);    \
                acc[i][0] = _mm256_fmadd_ps(b, w0, acc[i][0]);                  \
                acc[i][1] = _mm256_fmadd_ps(b, w1, acc[i][1]);                  \
            }                                                                   \
            wp += XG_NR * es;                                                   \
        }
        const float* xk = x + p;
        for (int t = 0; t < T; t++, xk += 16) XG_PRODUCT(xk)
        if (p < 8 && extra) XG_PRODUCT(x + 16 * T + p) /* partial_len's one more */
#undef XG_PRODUCT
        for (int i = 0; i < MR; i++) {
            _mm256_store_ps(part[p][i], acc[i][0]);
            _mm256_store_ps(part[p][i] + 8, acc[i][1]);
        }
    }
    const int kt = tail_start(K);
    for (int i = 0; i < MR; i++)
        for (int h = 0; h < 2; h++) {
            __m256 v[8];
            for (int l = 0; l < 8; l++)
                v[l] = _mm256_add_ps(_mm256_load_ps(part[l][i] + 8 * h), _mm256_load_ps(part[l + 8][i] + 8 * h));
            __m256 r = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[4]), _mm256_add_ps(v[2], v[6])),
                                     _mm256_add_ps(_mm256_add_ps(v[1], v[5]), _mm256_add_ps(v[3], v[7])));
            const char* wt = wp;
            for (int k = kt; k < K; k++, wt += XG_NR * es)
                r = _mm256_fmadd_ps(_mm256_broadcast_ss(x + (int64_t)i * K + k), load8(wt, 8 * h, dt), r);
            _mm256_storeu_ps(s + i * XG_NR + 8 * h, r);
        }
}

/* panel_tile for the rows m .. m + mb (mb 1..XG_MR) of x; dt a literal. */
static inline __attribute__((always_inline)) void panel_rows(const int dt, const float* x, int64_t m, int mb, int K,
                                                             const void* panel, float* s) {
    const float* xm = x + m * (int64_t)K;
    switch (mb) {
        case 1: panel_tile(1, dt, xm, K, panel, s); break;
        case 2: panel_tile(2, dt, xm, K, panel, s); break;
        case 3: panel_tile(3, dt, xm, K, panel, s); break;
        case 4: panel_tile(4, dt, xm, K, panel, s); break;
        case 5: panel_tile(5, dt, xm, K, panel, s); break;
        default: panel_tile(6, dt, xm, K, panel, s);
    }
}

/* The panel of outputs n0 (a multiple of XG_NR) .. of panels wp. */
static inline const void* panel_at(const void* wp, int dt, int K, int64_t n0) {
    return (const char*)wp + n0 * (int64_t)K * (dt == XG_BF16 ? 2 : 4);
}
#endif
