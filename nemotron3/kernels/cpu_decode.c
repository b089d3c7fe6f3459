/* nemotron3 CPU kernels for the engine's decode and prefill (float32 math, OpenMP).
 *
 * Pieces of a forward that torch runs as dozens of ~1 us ops each (or as einsums over padded chunks), fused
 * into one call each:
 *   nm3_experts     routed LatentMoE experts for a few tokens: Σ_j w_j · down_e(relu(up_e x)²)
 *   nm3_route_experts  the router's top-k choice, then nm3_experts
 *   nm3_moe_dispatch / nm3_moe_combine  a prefill's routing and grouping of tokens by expert, and the weighted sum
 *                   of the experts' outputs (the expert GEMMs in between are MKL's)
 *   nm3_mamba_step  the Mamba-2 recurrence step between in_proj and out_proj, on pooled state slots
 *   nm3_decode_attention  one-query GQA attention for every decoding sequence, read through its block table
 *   nm3_add_rms_norm  the residual add and the next block's RMSNorm
 *   nm3_linear      y = x·Wᵀ (+ b) for a few rows, over the K-major storage the runner gives every Linear
 *   nm3_ssd_scan    the chunked SSD scan of one sequence's prefill
 *   nm3_mamba_prefill  a Mamba-2 layer's prefill between in_proj and out_proj: conv, SiLU, nm3_ssd_scan, gated norm
 *   nm3_prefill_attention  causal GQA attention of a prefill chunk over its keys (flash-style, blocked products)
 * The weight-streaming kernels (nm3_linear, nm3_experts, nm3_route_experts) read float32 or bfloat16 weights
 * (`w_bf16`), and nm3_decode_attention a float32 or bfloat16 K/V cache (`kv_bf16`): a bfloat16 is the upper half
 * of a float32, so widening it is a 16-bit shift and every product and sum stays float32. Activations, states
 * and outputs are always float32.
 * Every kernel takes the thread count (torch.get_num_threads(), so the engine thread of a server uses
 * the same count as the main thread). Built once per machine by nemotron3/kernels/native.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes. The library links the libgomp.so.1 that torch has already loaded, so both share one OpenMP pool
 * and torch.set_num_threads applies here too. The math mirrors nemotron3/model/moe.py and mamba2.py
 * exactly; tests/kernels/test_native.py checks both against float64 references.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* Flush-to-zero and denormals-are-zero for this thread between FTZ_BEGIN and FTZ_END (restored after, so
 * torch's threads keep their mode). Softmax and SSD decay weights reach 1e-38 and below; a float op on a
 * denormal costs ~100× a normal one (a prefill SSD scan ran 7× slower), while such terms are ≥ 2^-126 / 2^-24
 * below anything they are added to, so flushing them leaves every result the same to float32 precision. */
#if defined(__SSE__)
#include <xmmintrin.h>
#define FTZ_BEGIN unsigned int nm3_csr_ = _mm_getcsr(); _mm_setcsr(nm3_csr_ | 0x8040u);
#define FTZ_END _mm_setcsr(nm3_csr_);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif

/* Weight element i of a row that is float32, or bfloat16 when bf16 (a constant at every inlined call site,
 * so each caller compiles to one type's loads). */
static inline __attribute__((always_inline)) float w_at(const void *w, int64_t i, const int bf16) {
    if (!bf16) return ((const float *)w)[i];
    union { uint32_t u; float f; } v = {.u = (uint32_t)((const uint16_t *)w)[i] << 16};
    return v.f;
}

static inline __attribute__((always_inline)) const void *w_offset(const void *w, int64_t i, const int bf16) {
    return bf16 ? (const void *)((const uint16_t *)w + i) : (const void *)((const float *)w + i);
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* 16 weights from w + i widened to float32. */
static inline __attribute__((always_inline)) __m512 w_load(const void *w, int64_t i, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)w + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* w_load of the lanes in m only: the others read nothing and are 0. */
static inline __attribute__((always_inline)) __m512 w_load_mask(__mmask16 m, const void *w, int64_t i, const int bf16) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* out[v] = Σ_i a_i · b[v][i] for nb ≤ 4 vectors b[v]: one pass over `a` (a weight row, float32 or bfloat16)
 * feeds every token, with nb independent accumulator chains. dot_fixed is inlined with constant nb and bf16,
 * so the accumulators live in registers. */
static inline __attribute__((always_inline)) void dot_fixed(const void *a, const int bf16, const float *const *b,
                                                            const int nb, int64_t n, float *out) {
    __m512 acc[4];
    for (int v = 0; v < 4; v++) acc[v] = _mm512_setzero_ps();
    int64_t i = 0;
    if (nb == 1) { /* one token: split the row over 4 chains instead, then fold them */
        for (; i + 64 <= n; i += 64)
            for (int c = 0; c < 4; c++)
                acc[c] = _mm512_fmadd_ps(w_load(a, i + 16 * c, bf16), _mm512_loadu_ps(b[0] + i + 16 * c), acc[c]);
        acc[0] = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    }
    for (; i + 16 <= n; i += 16) {
        __m512 av = w_load(a, i, bf16);
        for (int v = 0; v < nb; v++) acc[v] = _mm512_fmadd_ps(av, _mm512_loadu_ps(b[v] + i), acc[v]);
    }
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        __m512 av = w_load_mask(m, a, i, bf16);
        for (int v = 0; v < nb; v++) acc[v] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, b[v] + i), acc[v]);
    }
    for (int v = 0; v < nb; v++) out[v] = _mm512_reduce_add_ps(acc[v]);
}
#else
static inline __attribute__((always_inline)) void dot_fixed(const void *a, const int bf16, const float *const *b,
                                                            const int nb, int64_t n, float *out) {
    float acc[4][8] = {{0}};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int v = 0; v < nb; v++)
            for (int j = 0; j < 8; j++) acc[v][j] += w_at(a, i + j, bf16) * b[v][i + j];
    for (int v = 0; v < nb; v++) {
        float s = 0.0f;
        for (int j = 0; j < 8; j++) s += acc[v][j];
        for (int64_t r = i; r < n; r++) s += w_at(a, r, bf16) * b[v][r];
        out[v] = s;
    }
}
#endif

/* dot_fixed for rows `a` of float32, or bfloat16 when bf16: one constant instantiation per (type, nb). */
static void dot_many(const void *a, int bf16, const float *const *b, int nb, int64_t n, float *out) {
    switch (nb + 4 * (bf16 != 0)) {
    case 1: dot_fixed(a, 0, b, 1, n, out); break;
    case 2: dot_fixed(a, 0, b, 2, n, out); break;
    case 3: dot_fixed(a, 0, b, 3, n, out); break;
    case 4: dot_fixed(a, 0, b, 4, n, out); break;
    case 5: dot_fixed(a, 1, b, 1, n, out); break;
    case 6: dot_fixed(a, 1, b, 2, n, out); break;
    case 7: dot_fixed(a, 1, b, 3, n, out); break;
    default: dot_fixed(a, 1, b, 4, n, out); break;
    }
}

/* x[i] ← exp(x[i] − m) for i < n; returns Σ x[i]. */
#if defined(__AVX512F__)
/* e^x for x ≤ 0 (softmax after subtracting the max): x = n·ln2 + r, |r| ≤ ln2/2, e^r by its degree-6 Taylor
 * polynomial (truncation r⁷/7! ≤ 1.2e-7 relative), scaled by 2^n. Inputs below −87 flush to e^−87 ≈ 1.6e-38. */
static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln 2 = hi + lo, hi exact */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606820309417e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* max(m, x[0], …, x[n−1]): 4 independent vector chains, not a scalar chain of n dependent maxes. */
static float max_of(const float *x, int64_t n, float m) {
    __m512 acc[4];
    for (int c = 0; c < 4; c++) acc[c] = _mm512_set1_ps(m);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int c = 0; c < 4; c++) acc[c] = _mm512_max_ps(acc[c], _mm512_loadu_ps(x + i + 16 * c));
    for (; i + 16 <= n; i += 16) acc[0] = _mm512_max_ps(acc[0], _mm512_loadu_ps(x + i));
    float r = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3])));
    for (; i < n; i++) r = x[i] > r ? x[i] : r;
    return r;
}

static float exp_sub_sum(float *x, int64_t n, float m) {
    __m512 mv = _mm512_set1_ps(m), acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    float s = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) s += (x[i] = expf(x[i] - m));
    return s;
}
#else
static float max_of(const float *x, int64_t n, float m) {
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static float exp_sub_sum(float *x, int64_t n, float m) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += (x[i] = expf(x[i] - m));
    return s;
}
#endif

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* F.softplus(v) with its default threshold 20 (linear above it). */
static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

#if defined(__AVX512F__)
/* out[r] = Σ_i a_r[i]·b[i] for the 4 rows a_r = a + r·n (float32, or bfloat16 when bf16): dot_fixed's one-token
 * sum for each row, in the same order (so bit-identical to it), with the 4 rows' 16 chains interleaved and
 * each load of b shared by the 4 rows. */
static inline __attribute__((always_inline)) void dot4_rows(const void *a, const int bf16, const float *b,
                                                            int64_t n, float *out) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int c = 0; c < 4; c++) {
            __m512 bv = _mm512_loadu_ps(b + i + 16 * c);
            for (int r = 0; r < 4; r++) acc[r][c] = _mm512_fmadd_ps(w_load(a, r * n + i + 16 * c, bf16), bv, acc[r][c]);
        }
    for (int r = 0; r < 4; r++)
        acc[r][0] = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
    for (; i + 16 <= n; i += 16) {
        __m512 bv = _mm512_loadu_ps(b + i);
        for (int r = 0; r < 4; r++) acc[r][0] = _mm512_fmadd_ps(w_load(a, r * n + i, bf16), bv, acc[r][0]);
    }
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        __m512 bv = _mm512_maskz_loadu_ps(m, b + i);
        for (int r = 0; r < 4; r++) acc[r][0] = _mm512_fmadd_ps(w_load_mask(m, a, r * n + i, bf16), bv, acc[r][0]);
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r][0]);
}
#endif

/* relu(v)² when relu2, else v. */
static inline float relu2_if(float v, int relu2) { return relu2 ? (v > 0.0f ? v * v : 0.0f) : v; }

/* dot_many for `nrows` consecutive matrix rows from `row` (cols apart) against the inputs of the pairs
 * [q_lo, q_hi) of one expert, results to dest[q·ld + i0 + r]. A lone pair (every decode token's expert at
 * batch 1) takes 4 rows per dot4_rows; more pairs share each row's loads across up to 4 of them. */
static inline void rows_times_pairs(const void *row, int bf16, int64_t nrows, int64_t cols, int64_t q_lo,
                                    int64_t q_hi, const float *in, int64_t in_stride, const int64_t *in_row,
                                    float *dest, int64_t ld, int64_t i0, int relu2) {
    int64_t r = 0;
#if defined(__AVX512F__)
    if (q_hi - q_lo == 1) {
        const float *x = in + (in_row ? in_row[q_lo] : q_lo) * in_stride;
        for (; r + 4 <= nrows; r += 4) {
            float v[4];
            if (bf16)
                dot4_rows(w_offset(row, r * cols, 1), 1, x, cols, v);
            else
                dot4_rows(w_offset(row, r * cols, 0), 0, x, cols, v);
            for (int j = 0; j < 4; j++) dest[q_lo * ld + i0 + r + j] = relu2_if(v[j], relu2);
        }
    }
#endif
    for (; r < nrows; r++)
        for (int64_t q0 = q_lo; q0 < q_hi; q0 += 4) {
            int nb = q_hi - q0 < 4 ? (int)(q_hi - q0) : 4;
            const float *vs[4];
            float v[4];
            for (int j = 0; j < nb; j++) vs[j] = in + (in_row ? in_row[q0 + j] : q0 + j) * in_stride;
            dot_many(w_offset(row, r * cols, bf16), bf16, vs, nb, cols, v);
            for (int j = 0; j < nb; j++) dest[(q0 + j) * ld + i0 + r] = relu2_if(v[j], relu2);
        }
}

#define EXPERT_ROW_BLOCK 4 /* matrix rows per work item of expert_rows */

/* For every active expert e and each of its `rows` matrix rows (mat [E, rows, cols], float32 or bfloat16 when
 * bf16): dot the row with the input vector of each (token, slot) pair q that chose e
 * (in + (in_row ? in_row[q] : q)·in_stride), and write the result (relu²'d if asked) to dest[q·rows + row].
 * An orphaned `omp for`: it splits the (expert, block of EXPERT_ROW_BLOCK rows) items over the enclosing
 * parallel region's threads, so each thread streams whole stretches of matrices. */
static void expert_rows(const void *mat, int bf16, int64_t rows, int64_t cols, const int64_t *active,
                        int64_t n_active, const int64_t *start, const float *in, int64_t in_stride,
                        const int64_t *in_row, float *dest, int relu2) {
    int64_t blocks = (rows + EXPERT_ROW_BLOCK - 1) / EXPERT_ROW_BLOCK; /* per expert */
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_active * blocks; b++) {
        int64_t e = active[b / blocks], i0 = b % blocks * EXPERT_ROW_BLOCK;
        int64_t n = rows - i0 < EXPERT_ROW_BLOCK ? rows - i0 : EXPERT_ROW_BLOCK;
        rows_times_pairs(w_offset(mat, (e * rows + i0) * cols, bf16), bf16, n, cols, start[e], start[e + 1], in,
                         in_stride, in_row, dest, rows, i0, relu2);
    }
}

/* Inside a parallel region, after each thread allocated its scratch: 1 on every thread if all of them got it,
 * else 0 on every thread (failed is shared, zero before the region), so the threads take, or skip, the
 * worksharing loops that follow together. Orphaned: the barrier binds to the caller's region. */
static int all_allocated(int ok, int *failed) {
    if (!ok) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int f;
#pragma omp atomic read
    f = *failed;
    return !f;
}

/* Stable counting sort of the P = T·k (token, slot) pairs by expert idx[p] ∈ [0, E): on return start[e] (E + 1
 * entries, zeroed by the caller) is where expert e's block of sorted positions begins (start[E] = P), where[p]
 * is pair p's sorted position and token[q] the token of the pair at position q. */
static void sort_by_expert(const int64_t *idx, int64_t P, int64_t k, int64_t E, int64_t *start, int64_t *where,
                           int64_t *token) {
    for (int64_t p = 0; p < P; p++) start[idx[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t p = 0; p < P; p++) { /* pairs keep token order within an expert */
        where[p] = start[idx[p]]++;
        token[where[p]] = p / k;
    }
    for (int64_t e = E; e > 0; e--) start[e] = start[e - 1]; /* each start[e] ran on to its block's end */
    start[0] = 0;
}

/* out[t] = Σ_{j<k} w[t, j] · ys[where[t·k + j]] for T tokens, the slots in order (rows of out ldo floats apart, of
 * ys L). An orphaned `omp for` over the tokens. */
static void weighted_rows(const float *ys, int64_t L, const int64_t *where, const float *w, int64_t T, int64_t k,
                          float *out, int64_t ldo) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * ldo;
        for (int64_t c = 0; c < L; c++) o[c] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const float *y = ys + where[t * k + j] * L, wj = w[t * k + j];
            for (int64_t c = 0; c < L; c++) o[c] += wj * y[c];
        }
    }
}

/* out[t] = Σ_{j<k} w[t,j] · down[e](relu(up[e] · x[t])²), e = idx[t,j].
 * x [T, L] (rows ldx floats apart); up [E, F, L]; down [E, L, F] (row-major, contiguous; float32, or bfloat16
 * when w_bf16); idx [T, k] int64; w [T, k]; out [T, L] (rows ldo floats apart).
 * The (token, slot) pairs are grouped by expert; phase 1 splits the (active expert, F row) pairs over the
 * threads, phase 2 the (active expert, L row) pairs, so each thread streams whole stretches of expert
 * matrices and each row is read once for all its tokens; phase 3 sums each token's k expert outputs in
 * slot order. Returns 0, -1 on an index outside [0, E), -2 if scratch allocation fails. */
int nm3_experts(const float *x, int64_t ldx, int64_t T, int64_t L, const void *up, const void *down, int w_bf16,
                int64_t E, int64_t F, const int64_t *idx, const float *w, int64_t k, float *out, int64_t ldo,
                int nthreads) {
    int64_t P = T * k;
    for (int64_t p = 0; p < P; p++)
        if (idx[p] < 0 || idx[p] >= E) return -1;
    size_t np = (size_t)(P > 0 ? P : 1);
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t)), *where = malloc(np * sizeof(int64_t));
    int64_t *token = malloc(np * sizeof(int64_t)), *active = malloc((size_t)E * sizeof(int64_t));
    float *h = malloc(np * (size_t)F * sizeof(float)), *ys = malloc(np * (size_t)L * sizeof(float));
    int rc = 0;
    if (!start || !where || !token || !active || !h || !ys) {
        rc = -2;
        goto done;
    }
    sort_by_expert(idx, P, k, E, start, where, token);
    int64_t n_active = 0;
    for (int64_t e = 0; e < E; e++)
        if (start[e + 1] > start[e]) active[n_active++] = e;

#pragma omp parallel num_threads(nthreads)
    {
        expert_rows(up, w_bf16, F, L, active, n_active, start, x, ldx, token, h, 1); /* h = relu(up · x)² */
        expert_rows(down, w_bf16, L, F, active, n_active, start, h, F, NULL, ys, 0); /* ys = down · h */
        weighted_rows(ys, L, where, w, T, k, out, ldo);
    }
done:
    free(start); free(where); free(token); free(active); free(h); free(ys);
    return rc;
}

/* The LatentMoE router (moe.py `route`, ungrouped: n_group = 1) for one token: score = sigmoid(logit); the top k of
 * score + bias[e] are chosen (the bias steers the choice only); weights = score / (Σ score + 1e-20 if norm) · scale.
 * idx[k] and w[k] receive the choice in slot order (descending score + bias); score, choice: scratch [E]. */
static void route_token(const float *logits, const float *bias, int64_t E, int64_t k, int norm, float scale,
                        int64_t *idx, float *w, float *score, float *choice) {
    for (int64_t e = 0; e < E; e++) {
        score[e] = 1.0f / (1.0f + expf(-logits[e]));
        choice[e] = score[e] + bias[e];
    }
    float total = 0.0f;
    for (int64_t j = 0; j < k; j++) { /* k passes of arg-max: k·E comparisons */
        int64_t best = 0;
        for (int64_t e = 1; e < E; e++)
            if (choice[e] > choice[best]) best = e;
        idx[j] = best;
        w[j] = score[best];
        total += score[best];
        choice[best] = -INFINITY;
    }
    float mul = norm ? scale / (total + 1e-20f) : scale;
    for (int64_t j = 0; j < k; j++) w[j] *= mul;
}

/* route_token for T tokens (logits rows `stride` floats apart), then nm3_experts, in one call. idx [T, k] int64 and
 * w [T, k] receive the choice. Returns nm3_experts' code. */
int nm3_route_experts(const float *logits, int64_t stride, const float *bias, int64_t k, int norm, float scale,
                      int64_t *idx, float *w, const float *x, int64_t ldx, int64_t T, int64_t L, const void *up,
                      const void *down, int w_bf16, int64_t E, int64_t F, float *out, int64_t ldo, int nthreads) {
    float *score = malloc((size_t)E * sizeof(float)), *choice = malloc((size_t)E * sizeof(float));
    if (!score || !choice) {
        free(score); free(choice);
        return -2;
    }
    for (int64_t t = 0; t < T; t++)
        route_token(logits + t * stride, bias, E, k, norm, scale, idx + t * k, w + t * k, score, choice);
    free(score); free(choice);
    return nm3_experts(x, ldx, T, L, up, down, w_bf16, E, F, idx, w, k, out, ldo, nthreads);
}

/* A prefill's MoE dispatch: route_token for T tokens in parallel, then the (token, slot) pairs counting-sorted by
 * expert and their input rows gathered in that order, so each expert's tokens are one contiguous block of xs for
 * its GEMMs. logits rows `stride` apart; x [T, L] rows ldx apart; xs [T·k, L]; counts [E] (tokens per expert);
 * where [T·k] (the sorted position of pair t·k + j); w [T, k] (routing weights). Returns 0, or -2 if scratch
 * allocation fails. */
int nm3_moe_dispatch(const float *logits, int64_t stride, const float *bias, int64_t k, int norm, float scale,
                     int64_t T, int64_t E, const float *x, int64_t ldx, int64_t L, float *xs, int64_t *counts,
                     int64_t *where, float *w, int nthreads) {
    int64_t P = T * k;
    size_t np = (size_t)(P > 0 ? P : 1);
    int64_t *idx = malloc(np * sizeof(int64_t)), *token = malloc(np * sizeof(int64_t));
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
    int failed = !idx || !token || !start;
#pragma omp parallel num_threads(nthreads)
    {
        float *score = malloc((size_t)E * sizeof(float)), *choice = malloc((size_t)E * sizeof(float));
        if (all_allocated(score && choice, &failed)) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++)
                route_token(logits + t * stride, bias, E, k, norm, scale, idx + t * k, w + t * k, score, choice);
#pragma omp single
            {
                sort_by_expert(idx, P, k, E, start, where, token);
                for (int64_t e = 0; e < E; e++) counts[e] = start[e + 1] - start[e];
            }
#pragma omp for schedule(static)
            for (int64_t q = 0; q < P; q++)
                for (int64_t c = 0; c < L; c++) xs[q * L + c] = x[token[q] * ldx + c];
        }
        free(score); free(choice);
    }
    free(idx); free(token); free(start);
    return failed ? -2 : 0;
}

/* A prefill's MoE combine: weighted_rows (each token's k expert outputs, in slot order) for T tokens. */
void nm3_moe_combine(const float *ys, int64_t L, const int64_t *where, const float *w, int64_t T, int64_t k,
                     float *out, int64_t ldo, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    weighted_rows(ys, L, where, w, T, k, out, ldo);
}

/* One row of the state: S ← decay·S + dx·B, returns S·C (n = N terms, vectorised across n). */
static inline float ssm_row(float *S, float decay, float dx, const float *B, const float *C, int64_t N) {
#if defined(__AVX512F__)
    __m512 dv = _mm512_set1_ps(decay), xv = _mm512_set1_ps(dx), acc = _mm512_setzero_ps();
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
        __m512 sv = _mm512_fmadd_ps(_mm512_loadu_ps(S + n), dv, _mm512_mul_ps(xv, _mm512_loadu_ps(B + n)));
        _mm512_storeu_ps(S + n, sv);
        acc = _mm512_fmadd_ps(sv, _mm512_loadu_ps(C + n), acc);
    }
    float y = _mm512_reduce_add_ps(acc);
#else
    float y = 0.0f;
    int64_t n = 0;
#endif
    for (; n < N; n++) {
        S[n] = S[n] * decay + dx * B[n];
        y += S[n] * C[n];
    }
    return y;
}

/* One Mamba-2 decode step for b sequences, each on its own state slot (research/architecture.md §5):
 *   conv: window = [conv_state | xbc]; u = silu(Σ_j w[c,j] window[c,j] + bias[c]); state ← window[1:]
 *   Δ = clamp(softplus(dt + dt_bias), lo, hi); S ← exp(Δ·A)·S + (Δ·x) ⊗ B; y = S·C + D·x   (A = −exp(A_log))
 *   out = norm_w ⊙ g / rms(g) per norm group, g = y ⊙ silu(z)
 * xbc [b, C], z [b, I], dt [b, nh]: rows `row_stride` floats apart (slices of one in_proj output row).
 * conv_pool [S, C, K-1], ssm_pool [S, nh, P, N] (float32, contiguous) are updated in place at slots[s].
 * u: scratch [b, C]; out: [b, I], I = nh·P; C = I + 2·G·N (x | B | C columns); head h reads group h/(nh/G). */
void nm3_mamba_step(int64_t b, const int64_t *slots, const float *xbc, const float *z, const float *dt,
                    int64_t row_stride, float *conv_pool, float *ssm_pool, const float *conv_w,
                    const float *conv_b, const float *dt_bias, const float *A_log, const float *D,
                    const float *norm_w, int64_t C, int64_t K, int64_t nh, int64_t P, int64_t N, int64_t G,
                    int64_t norm_groups, float dt_lo, float dt_hi, float eps, float *u, float *out, int nthreads) {
    int64_t I = nh * P, hpg = nh / G, gsize = I / norm_groups;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
#pragma omp for schedule(static)
        for (int64_t r = 0; r < b * C; r++) {
            int64_t s = r / C, c = r % C;
            float *win = conv_pool + (slots[s] * C + c) * (K - 1);
            const float *wc = conv_w + c * K;
            float xin = xbc[s * row_stride + c];
            float v = 0.0f;
            for (int64_t j = 0; j < K - 1; j++) v += wc[j] * win[j];
            v += wc[K - 1] * xin;
            if (conv_b) v += conv_b[c];
            for (int64_t j = 0; j + 1 < K - 1; j++) win[j] = win[j + 1];
            if (K > 1) win[K - 2] = xin;
            u[s * C + c] = silu(v);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < b * nh; r++) {
            int64_t s = r / nh, hd = r % nh, g = hd / hpg;
            float delta = softplus(dt[s * row_stride + hd] + dt_bias[hd]);
            delta = delta < dt_lo ? dt_lo : (delta > dt_hi ? dt_hi : delta);
            float decay = expf(delta * -expf(A_log[hd]));
            const float *us = u + s * C;
            const float *xh = us + hd * P, *Bg = us + I + g * N, *Cg = us + I + G * N + g * N;
            float *S = ssm_pool + (slots[s] * nh + hd) * P * N;
            for (int64_t p = 0; p < P; p++)
                out[s * I + hd * P + p] = ssm_row(S + p * N, decay, delta * xh[p], Bg, Cg, N) + D[hd] * xh[p];
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < b * norm_groups; r++) {
            int64_t s = r / norm_groups, off = s * I + (r % norm_groups) * gsize;
            const float *zs = z + s * row_stride + (r % norm_groups) * gsize;
            float ss = 0.0f;
            for (int64_t i = 0; i < gsize; i++) {
                float gv = out[off + i] * silu(zs[i]);
                out[off + i] = gv;
                ss += gv * gv;
            }
            float scale = 1.0f / sqrtf(ss / (float)gsize + eps);
            for (int64_t i = 0; i < gsize; i++) out[off + i] = norm_w[off - s * I + i] * (out[off + i] * scale);
        }
        FTZ_END
    }
}

#define ATT_TILE 64 /* keys per tile of the one-pass softmax: scores of a tile stay in L1 */
/* Tiles ahead whose K and V rows a tile's value loop prefetches (into L2, prefetcht1). Without it the hardware
 * prefetcher alone left a 32k-key decode (nemo50: 32 MB of fp32 K/V) at ~14 GB/s, the compute of a tile and the
 * fetch of the next one taking turns; with it, ~30 GB/s alone and 25-26 inside a step, near the DRAM read rate of
 * 2 threads here (1 to 6 tiles ahead measured alike; the whole next tile in one burst at a tile's start did not help). */
#define ATT_PREFETCH 2

/* rows[i] = pool row offset (elements) of key a + i, i < n, for a sequence's block table: no division per key. */
static inline void tile_rows(const int64_t *tab, int64_t bs, int64_t d, int64_t a, int64_t n, int64_t *rows) {
    for (int64_t i = 0, blk = a / bs, off = a % bs; i < n; i++) {
        rows[i] = (tab[blk] * bs + off) * d;
        if (++off == bs) {
            off = 0;
            blk++;
        }
    }
}

/* dst[0..n) = the bfloat16 row src widened to float32: a bf16 tile's keys, read by every query head of the KV
 * head, are converted once (the per-head conversions made the bf16 path compute-bound: 1.31 ms at 32k). */
static void widen_row(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, w_load(src, i, 1));
#endif
    for (; i < n; i++) dst[i] = w_at(src, i, 1);
}

#if defined(__AVX512F__)
/* The 16 horizontal sums of v[0..15] as one vector (lane i = Σ v[i]): a transpose-and-add tree of 45 shuffles
 * and adds instead of 16 separate reductions (~128 ops). */
static inline __m512 hsum16(const __m512 *v) {
    __m512 s[8], t[4];
    for (int k = 0; k < 8; k++) /* per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3] */
        s[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) /* per chunk: the chunk's sums of v[4k..4k+3] */
        t[k] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_f32x4(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#if defined(__AVX512F__)
/* out[0..15] = scale · q·key[r] for 16 keys, one transposed reduction. With `linear` (a constant at the call
 * site, as is d there) the keys sit at consecutive rows, key[r] = keys[0] + r·d (one pool block, or adjacent
 * ones), and every load is that one pointer plus an immediate offset; otherwise each key has its pointer. */
static inline __attribute__((always_inline)) void scores16(const float *q, const float *const *keys, const int linear,
                                                           const int64_t d, float scale, float *out) {
    __m512 v[16];
    for (int r = 0; r < 16; r++) v[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
        __m512 qc = _mm512_loadu_ps(q + c);
        for (int r = 0; r < 16; r++)
            v[r] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(linear ? keys[0] + r * d + c : keys[r] + c), v[r]);
    }
    _mm512_storeu_ps(out, _mm512_mul_ps(hsum16(v), _mm512_set1_ps(scale)));
}
#endif

/* out[i] = scale · q·key[i] for the n ≤ ATT_TILE float32 rows `keys` (d elements each). Groups of 16 keys one
 * transposed reduction each; groups that sit at consecutive rows (keys 0 and 15 are 15 rows apart: they span one
 * block or two adjacent ones, or a widened tile) of the common head sizes address them from one pointer. */
static inline __attribute__((always_inline)) void scores(const float *q, const float *const *keys, int64_t n,
                                                         int64_t d, float scale, float *out) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if (d % 16 == 0)
        for (; i + 16 <= n; i += 16) {
            int linear = keys[i + 15] == keys[i] + 15 * d;
            if (linear && d == 64)
                scores16(q, keys + i, 1, 64, scale, out + i);
            else if (linear && d == 128)
                scores16(q, keys + i, 1, 128, scale, out + i);
            else
                scores16(q, keys + i, 0, d, scale, out + i);
        }
#endif
    for (; i < n; i++) {
        const float *qs[1] = {q};
        float v;
        dot_many(keys[i], 0, qs, 1, d, &v);
        out[i] = v * scale;
    }
}

#if defined(__AVX512F__)
/* out[h·ATT_TILE + i] = scale · q_h·key_i for 4 query heads h (q_h = q + h·d) and keys i < n (n a multiple of 4),
 * key i at pool row rows[i] of kb (float32, or bfloat16 widened in registers). Each key vector is loaded (and
 * widened) once for the 4 heads: 4 keys × 4 heads of sums per transposed reduction, where scores16 loads every
 * key once per head from a widened copy. Each sum is formed and reduced as scores16 forms it (the same FMA chain
 * over c, the same hsum16 tree for every lane), so the scores are bit-identical to it. */
static inline __attribute__((always_inline)) void scores_4heads(const float *q, const void *kb, const int64_t *rows,
                                                                const int bf16, int64_t n, int64_t d, float scale,
                                                                float *out) {
    for (int64_t i = 0; i < n; i += 4) {
        __m512 v[16]; /* v[4h + r]: head h, key i + r */
        for (int x = 0; x < 16; x++) v[x] = _mm512_setzero_ps();
        for (int64_t c = 0; c < d; c += 16) {
            __m512 qh[4];
            for (int h = 0; h < 4; h++) qh[h] = _mm512_loadu_ps(q + h * d + c);
            for (int r = 0; r < 4; r++) {
                __m512 k = w_load(w_offset(kb, rows[i + r], bf16), c, bf16);
                for (int h = 0; h < 4; h++) v[4 * h + r] = _mm512_fmadd_ps(qh[h], k, v[4 * h + r]);
            }
        }
        __m512 sv = _mm512_mul_ps(hsum16(v), _mm512_set1_ps(scale));
        _mm_storeu_ps(out + i, _mm512_extractf32x4_ps(sv, 0));
        _mm_storeu_ps(out + ATT_TILE + i, _mm512_extractf32x4_ps(sv, 1));
        _mm_storeu_ps(out + 2 * ATT_TILE + i, _mm512_extractf32x4_ps(sv, 2));
        _mm_storeu_ps(out + 3 * ATT_TILE + i, _mm512_extractf32x4_ps(sv, 3));
    }
}
#endif

/* acc[j][c] += Σ_i p[j][i]·vals[i][c] (c < d) for nh ≤ 4 heads j, p[j] = p + j·ATT_TILE: each value row is
 * loaded once for every head, 64 columns (4 vectors) at a time, in address order; 4 heads × 4 vectors are 16
 * independent accumulator chains. Values float32, or bfloat16 when bf16. Inlined per type, and with constant
 * nh and nv (vectors per block) for the common 4 heads × 64 columns, so the key loop has no branches. */
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void weighted_block(const float *p, const int nh, const void *const *vals,
                                                                 const int bf16, int64_t n, int64_t c, const int nv,
                                                                 float *acc, int64_t d, const void *kb, const void *vb,
                                                                 const int64_t *ahead, int64_t n_ahead) {
    __m512 a[4][4];
    for (int j = 0; j < nh; j++)
        for (int v = 0; v < nv; v++) a[j][v] = _mm512_loadu_ps(acc + j * d + c + 16 * v);
    for (int64_t i = 0; i < n; i++) {
        if (i < n_ahead) { /* one K row and one V row of a tile ahead per key, between this tile's FMAs */
            const char *k = w_offset(kb, ahead[i], bf16), *v = w_offset(vb, ahead[i], bf16);
            for (int64_t b = 0; b < d * (bf16 ? 2 : 4); b += 64) {
                __builtin_prefetch(k + b, 0, 2);
                __builtin_prefetch(v + b, 0, 2);
            }
        }
        __m512 x[4];
        for (int v = 0; v < nv; v++) x[v] = w_load(vals[i], c + 16 * v, bf16);
        for (int j = 0; j < nh; j++) {
            __m512 w = _mm512_set1_ps(p[j * ATT_TILE + i]);
            for (int v = 0; v < nv; v++) a[j][v] = _mm512_fmadd_ps(w, x[v], a[j][v]);
        }
    }
    for (int j = 0; j < nh; j++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(acc + j * d + c + 16 * v, a[j][v]);
}
#endif

static inline __attribute__((always_inline)) void weighted_sum(const float *p, int64_t nh, const void *const *vals,
                                                               const int bf16, int64_t n, int64_t d, float *acc,
                                                               const void *kb, const void *vb, const int64_t *ahead,
                                                               int64_t n_ahead) {
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c + 64 <= d; c += 64, n_ahead = 0)
        switch (nh) {
        case 1: weighted_block(p, 1, vals, bf16, n, c, 4, acc, d, kb, vb, ahead, n_ahead); break;
        case 2: weighted_block(p, 2, vals, bf16, n, c, 4, acc, d, kb, vb, ahead, n_ahead); break;
        case 3: weighted_block(p, 3, vals, bf16, n, c, 4, acc, d, kb, vb, ahead, n_ahead); break;
        default: weighted_block(p, 4, vals, bf16, n, c, 4, acc, d, kb, vb, ahead, n_ahead); break;
        }
    for (; c + 16 <= d; c += 16, n_ahead = 0) /* other head counts, and column tails, one vector at a time */
        switch (nh) {
        case 1: weighted_block(p, 1, vals, bf16, n, c, 1, acc, d, kb, vb, ahead, n_ahead); break;
        case 2: weighted_block(p, 2, vals, bf16, n, c, 1, acc, d, kb, vb, ahead, n_ahead); break;
        case 3: weighted_block(p, 3, vals, bf16, n, c, 1, acc, d, kb, vb, ahead, n_ahead); break;
        default: weighted_block(p, 4, vals, bf16, n, c, 1, acc, d, kb, vb, ahead, n_ahead); break;
        }
#endif
    for (; c < d; c++)
        for (int64_t j = 0; j < nh; j++) {
            float s = acc[j * d + c];
            for (int64_t i = 0; i < n; i++) s += p[j * ATT_TILE + i] * w_at(vals[i], c, bf16);
            acc[j * d + c] = s;
        }
}

/* Attention of one KV head's g query heads over keys [t0, t1) of one sequence, in one pass over K and V
 * (online softmax, tile by tile): on return m[j] is the running max of head j's scaled scores, l[j] = Σ e^(s−m),
 * acc[j] = Σ e^(s−m)·v (unnormalised). Empty ranges leave m = −inf, l = 0, acc = 0. K/V float32, or bfloat16
 * when bf16 (inlined per type). */
static inline __attribute__((always_inline)) void attend_range(const float *qh, int64_t g, int64_t d, const void *kb,
                                                               const void *vb, const int bf16, const int64_t *tab,
                                                               int64_t bs, int64_t t0, int64_t t1, float scale,
                                                               float *m, float *l, float *acc) {
    float sc[g * ATT_TILE], kw[bf16 ? ATT_TILE * d : 1]; /* kw: the tile's keys as float32 */
    for (int64_t j = 0; j < g; j++) {
        m[j] = -INFINITY;
        l[j] = 0.0f;
    }
    for (int64_t c = 0; c < g * d; c++) acc[c] = 0.0f;
    for (int64_t a = t0; a < t1; a += ATT_TILE) {
        int64_t nt = t1 - a < ATT_TILE ? t1 - a : ATT_TILE;
        int64_t rows[ATT_TILE], ahead[ATT_TILE], a2 = a + ATT_PREFETCH * ATT_TILE;
        int64_t n_ahead = t1 - a2 < 0 ? 0 : (t1 - a2 < ATT_TILE ? t1 - a2 : ATT_TILE);
        tile_rows(tab, bs, d, a, nt, rows);
        tile_rows(tab, bs, d, a2, n_ahead, ahead);
        const float *keys[ATT_TILE];
        const void *vals[ATT_TILE];
        int64_t done = 0; /* keys scored by scores_4heads: a bf16 tile's whole 16-key groups, heads in fours */
#if defined(__AVX512F__)
        if (bf16 && g % 4 == 0 && d % 16 == 0) { /* (float32 keys: 1.1-1.2x slower than scores16's in L1/L2) */
            done = nt / 16 * 16;
            for (int64_t j = 0; j < g; j += 4) scores_4heads(qh + j * d, kb, rows, bf16, done, d, scale, sc + j * ATT_TILE);
        }
#endif
        for (int64_t i = 0; i < nt; i++) {
            if (i >= done) { /* bf16 keys widened once here, not once per query head */
                if (bf16) widen_row((const uint16_t *)kb + rows[i], kw + i * d, d);
                keys[i] = bf16 ? kw + i * d : (const float *)kb + rows[i];
            }
            vals[i] = w_offset(vb, rows[i], bf16);
        }
        if (done < nt)
            for (int64_t j = 0; j < g; j++) /* the tile's keys stay in L1 across the g heads */
                scores(qh + j * d, keys + done, nt - done, d, scale, sc + j * ATT_TILE + done);
        for (int64_t j = 0; j < g; j++) { /* rescale the running sums to the new max, add this tile's weights */
            float *row = sc + j * ATT_TILE, mt = max_of(row, nt, m[j]);
            float corr = expf(m[j] - mt); /* 0 on the first tile (m = −inf) */
            l[j] = l[j] * corr + exp_sub_sum(row, nt, mt);
            m[j] = mt;
            float *aj = acc + j * d;
            for (int64_t c = 0; c < d; c++) aj[c] *= corr;
        }
        for (int64_t j = 0; j < g; j += 4)
            weighted_sum(sc + j * ATT_TILE, g - j < 4 ? g - j : 4, vals, bf16, nt, d, acc + j * d, kb, vb, ahead,
                         j == 0 ? n_ahead : 0);
    }
}

/* out = softmax(q·Kᵀ·scale)·V for n decoding sequences, each one query row of nq heads, GQA (head j reads KV
 * head j / (nq/nkv)). q [n, nq, d] (sequences ldq floats apart, heads d apart); k_plane, v_plane [nkv, tokens, d],
 * the pool of one attention layer (float32,
 * or bfloat16 when kv_bf16: a bf16 K/V cache, widened as it is read); sequence
 * s has lens[s] keys at block ids tables[s][0 ...] (key t at row tables[s][t / bs]·bs + t % bs).
 * out [n, nq, d]. Work items are (sequence, KV head, key range): each reads its keys and values once for all
 * its query heads (attend_range). When there are fewer (sequence, KV head) pairs than threads, each sequence's
 * keys are split into `parts` ranges (split-K) and the partial softmax sums are merged:
 * out = Σ_p e^(m_p − M)·acc_p / Σ_p e^(m_p − M)·l_p, M = max_p m_p. Returns 0, or -2 if scratch fails. */
int nm3_decode_attention(int64_t n, const float *q, int64_t ldq, const void *k_plane, const void *v_plane,
                         int kv_bf16, int64_t tokens, const int64_t *const *tables, const int64_t *lens, int64_t bs,
                         int64_t nq, int64_t nkv, int64_t d, float scale, float *out, int nthreads) {
    int64_t g = nq / nkv, pairs = n * nkv, longest = 0;
    for (int64_t s = 0; s < n; s++) longest = lens[s] > longest ? lens[s] : longest;
    int64_t parts = 1;
    if (pairs < nthreads) { /* split-K: enough ranges for every thread, none shorter than 4 tiles */
        parts = (nthreads + pairs - 1) / pairs;
        int64_t most = longest / (4 * ATT_TILE);
        parts = parts < most ? parts : (most > 1 ? most : 1);
    }
    int64_t items = pairs * parts;
    float *part = malloc((size_t)items * (size_t)(g * (d + 2)) * sizeof(float)); /* per item: m[g] l[g] acc[g][d] */
    if (!part) return -2;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            int64_t pr = it / parts, p = it % parts, s = pr / nkv, hk = pr % nkv, L = lens[s];
            float *mine = part + it * g * (d + 2);
            const float *qh = q + s * ldq + hk * g * d;
            const void *kh = w_offset(k_plane, hk * tokens * d, kv_bf16), *vh = w_offset(v_plane, hk * tokens * d, kv_bf16);
            int64_t a = L * p / parts, b = L * (p + 1) / parts;
            if (kv_bf16)
                attend_range(qh, g, d, kh, vh, 1, tables[s], bs, a, b, scale, mine, mine + g, mine + 2 * g);
            else
                attend_range(qh, g, d, kh, vh, 0, tables[s], bs, a, b, scale, mine, mine + g, mine + 2 * g);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < pairs * g; r++) { /* merge the parts of (sequence, KV head, query head j) */
            int64_t pr = r / g, j = r % g, s = pr / nkv, hk = pr % nkv;
            const float *first = part + pr * parts * g * (d + 2);
            float M = -INFINITY, total = 0.0f;
            for (int64_t p = 0; p < parts; p++) {
                float mp = first[p * g * (d + 2) + j];
                M = mp > M ? mp : M;
            }
            float *o = out + (s * nq + hk * g + j) * d;
            for (int64_t c = 0; c < d; c++) o[c] = 0.0f;
            for (int64_t p = 0; p < parts; p++) {
                const float *pp = first + p * g * (d + 2);
                if (pp[j] == -INFINITY) continue; /* an empty range */
                float w = expf(pp[j] - M);
                total += w * pp[g + j];
                for (int64_t c = 0; c < d; c++) o[c] += w * pp[2 * g + j * d + c];
            }
            float inv = 1.0f / total;
            for (int64_t c = 0; c < d; c++) o[c] *= inv;
        }
        FTZ_END
    }
    free(part);
    return 0;
}

/* dst[r][c] = relu(src[r][c])² for rows × cols (rows lds and ldd floats apart): the MoE prefill's shared-expert
 * activation copied into the down projection's input in one pass, where copy, relu and square in place took
 * three over a strided slice (12.6 MB each at nemo300 @2048). Same values as torch.relu(x).square(), denormal
 * squares included (no flush-to-zero here). */
void nm3_relu2_rows(const float *src, int64_t lds, float *dst, int64_t ldd, int64_t rows, int64_t cols,
                    int nthreads) {
#pragma omp parallel for schedule(static) num_threads(rows > 1 ? nthreads : 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *a = src + r * lds;
        float *b = dst + r * ldd;
        int64_t c = 0;
#if defined(__AVX512F__)
        for (; c + 16 <= cols; c += 16) {
            __m512 v = _mm512_max_ps(_mm512_loadu_ps(a + c), _mm512_setzero_ps());
            _mm512_storeu_ps(b + c, _mm512_mul_ps(v, v));
        }
#endif
        for (; c < cols; c++) {
            float v = a[c] > 0.0f ? a[c] : 0.0f;
            b[c] = v * v;
        }
    }
}

/* h ← h + delta (the residual stream, in place; no add when delta is NULL); out = w ⊙ h / sqrt(mean(h²) + eps)
 * per row of H (RMSNorm, norm.py). h, delta, out: [rows, H] contiguous. */
void nm3_add_rms_norm(float *h, const float *delta, const float *w, float eps, int64_t rows, int64_t H, float *out,
                      int nthreads) {
#pragma omp parallel for schedule(static) num_threads(rows > 1 ? nthreads : 1)
    for (int64_t r = 0; r < rows; r++) {
        float *hr = h + r * H, *o = out + r * H;
        const float *dr = delta ? delta + r * H : NULL;
        float ss = 0.0f;
        for (int64_t i = 0; i < H; i++) {
            if (dr) hr[i] += dr[i];
            ss += hr[i] * hr[i];
        }
        float scale = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) o[i] = w[i] * (hr[i] * scale);
    }
}

#define LINEAR_GROUP 8 /* rows (tokens) that share one pass over the weights */

/* y[t][c0:c1] (+)= Σ_k x[t][k]·W[k][c0:c1] for t < nb ≤ LINEAR_GROUP: four W rows at a time, each 16-column strip of them
 * loaded once and applied to every token; y stays in L1/L2 while W streams from memory. Inlined per nb and
 * weight type (W float32, or bfloat16 when bf16). */
static inline __attribute__((always_inline)) void linear_strip(const float *x, const int nb, int64_t ldx,
                                                               const void *W, const int bf16, int64_t K, int64_t ldw,
                                                               int64_t c0, int64_t c1, float *y, int64_t ldy) {
    int64_t k = 0;
#if defined(__AVX512F__)
    for (; k + 4 <= K; k += 4) {
        const void *r0 = w_offset(W, k * ldw, bf16), *r1 = w_offset(r0, ldw, bf16);
        const void *r2 = w_offset(r1, ldw, bf16), *r3 = w_offset(r2, ldw, bf16);
        __m512 xs[LINEAR_GROUP][4];
        for (int t = 0; t < nb; t++)
            for (int i = 0; i < 4; i++) xs[t][i] = _mm512_set1_ps(x[t * ldx + k + i]);
        int64_t j = c0;
        for (; j + 16 <= c1; j += 16) {
            __m512 w0 = w_load(r0, j, bf16), w1 = w_load(r1, j, bf16);
            __m512 w2 = w_load(r2, j, bf16), w3 = w_load(r3, j, bf16);
            for (int t = 0; t < nb; t++) {
                float *yt = y + t * ldy + j;
                __m512 a = _mm512_fmadd_ps(xs[t][0], w0, _mm512_loadu_ps(yt));
                a = _mm512_fmadd_ps(xs[t][1], w1, a);
                a = _mm512_fmadd_ps(xs[t][2], w2, a);
                _mm512_storeu_ps(yt, _mm512_fmadd_ps(xs[t][3], w3, a));
            }
        }
        if (j < c1) {
            __mmask16 m = (__mmask16)((1u << (c1 - j)) - 1u);
            __m512 w0 = w_load_mask(m, r0, j, bf16), w1 = w_load_mask(m, r1, j, bf16);
            __m512 w2 = w_load_mask(m, r2, j, bf16), w3 = w_load_mask(m, r3, j, bf16);
            for (int t = 0; t < nb; t++) {
                float *yt = y + t * ldy + j;
                __m512 a = _mm512_fmadd_ps(xs[t][0], w0, _mm512_maskz_loadu_ps(m, yt));
                a = _mm512_fmadd_ps(xs[t][1], w1, a);
                a = _mm512_fmadd_ps(xs[t][2], w2, a);
                _mm512_mask_storeu_ps(yt, m, _mm512_fmadd_ps(xs[t][3], w3, a));
            }
        }
    }
#endif
    for (; k < K; k++) {
        const void *r = w_offset(W, k * ldw, bf16);
        for (int t = 0; t < nb; t++) {
            float xv = x[t * ldx + k], *yt = y + t * ldy;
            for (int64_t j = c0; j < c1; j++) yt[j] += xv * w_at(r, j, bf16);
        }
    }
}

#define LINEAR_BLOCK_BYTES (256 * 1024) /* weights of a block that more than LINEAR_GROUP rows share, in L2 */
#define LINEAR_BLOCK_COLS 512            /* its columns: a group's sums (8 × 512 floats) stay in L1 */

static void linear_group(const float *x, int64_t n, int64_t ldx, const void *W, int bf16, int64_t K, int64_t ldw,
                         int64_t c0, int64_t c1, float *y, int64_t ldy);

/* linear_group over columns [c0, c1) for n rows. Up to LINEAR_GROUP rows take one pass over the weights. More rows
 * go block by block (LINEAR_BLOCK_COLS columns × the W rows that fill LINEAR_BLOCK_BYTES): the first group of rows
 * reads a block from memory and the next groups find it in L2, so the weights are read from memory once. Each sum
 * still adds its k terms in increasing k: the result is the unblocked one, bit for bit. */
static void linear_rows(const float *x, int64_t n, int64_t ldx, const void *W, int bf16, int64_t K, int64_t ldw,
                        int64_t c0, int64_t c1, float *y, int64_t ldy) {
    if (n <= LINEAR_GROUP) {
        linear_group(x, n, ldx, W, bf16, K, ldw, c0, c1, y, ldy);
        return;
    }
    int64_t cols = c1 - c0 < LINEAR_BLOCK_COLS ? c1 - c0 : LINEAR_BLOCK_COLS;
    int64_t kb = LINEAR_BLOCK_BYTES / (cols * (bf16 ? 2 : 4)) / 4 * 4;
    kb = kb < 4 ? 4 : kb;
    for (int64_t b0 = c0; b0 < c1; b0 += cols) {
        int64_t b1 = b0 + cols < c1 ? b0 + cols : c1;
        for (int64_t k0 = 0; k0 < K; k0 += kb)
            linear_group(x + k0, n, ldx, w_offset(W, k0 * ldw, bf16), bf16, K - k0 < kb ? K - k0 : kb, ldw, b0, b1, y,
                         ldy);
    }
}

/* linear_strip for n rows in groups of up to LINEAR_GROUP, switched to the constant (nb, bf16) instantiation. */
static void linear_group(const float *x, int64_t n, int64_t ldx, const void *W, int bf16, int64_t K, int64_t ldw,
                         int64_t c0, int64_t c1, float *y, int64_t ldy) {
    for (int64_t t0 = 0; t0 < n; t0 += LINEAR_GROUP) {
        const float *xt = x + t0 * ldx;
        float *yt = y + t0 * ldy;
        int nb = n - t0 < LINEAR_GROUP ? (int)(n - t0) : LINEAR_GROUP;
        switch (nb + LINEAR_GROUP * (bf16 != 0)) {
        case 1: linear_strip(xt, 1, ldx, W, 0, K, ldw, c0, c1, yt, ldy); break;
        case 2: linear_strip(xt, 2, ldx, W, 0, K, ldw, c0, c1, yt, ldy); break;
        case 3: linear_strip(xt, 3, ldx, W, 0, K, ldw, c0, c1, yt, ldy); break;
        case 4: linear_strip(xt, 4, ldx, W, 0, K, ldw, c0, c1, yt, ldy); break;
        case 5: linear_strip(xt, 5, ldx, W, 0, K, ldw, c0, c1, yt, ldy); break;
        case 6: linear_strip(xt, 6, ldx, W, 0, K, ldw, c0, c1, yt, ldy); break;
        case 7: linear_strip(xt, 7, ldx, W, 0, K, ldw, c0, c1, yt, ldy); break;
        case 8: linear_strip(xt, 8, ldx, W, 0, K, ldw, c0, c1, yt, ldy); break;
        case 9: linear_strip(xt, 1, ldx, W, 1, K, ldw, c0, c1, yt, ldy); break;
        case 10: linear_strip(xt, 2, ldx, W, 1, K, ldw, c0, c1, yt, ldy); break;
        case 11: linear_strip(xt, 3, ldx, W, 1, K, ldw, c0, c1, yt, ldy); break;
        case 12: linear_strip(xt, 4, ldx, W, 1, K, ldw, c0, c1, yt, ldy); break;
        case 13: linear_strip(xt, 5, ldx, W, 1, K, ldw, c0, c1, yt, ldy); break;
        case 14: linear_strip(xt, 6, ldx, W, 1, K, ldw, c0, c1, yt, ldy); break;
        case 15: linear_strip(xt, 7, ldx, W, 1, K, ldw, c0, c1, yt, ldy); break;
        default: linear_strip(xt, 8, ldx, W, 1, K, ldw, c0, c1, yt, ldy); break;
        }
    }
}

/* y = x·Wᵀ + bias for n rows: x [n, K] (rows ldx apart), the weight [N, K] given as its K-major storage W
 * (row k holds column k of the weight: W[k·ldw + j] = weight[j][k]; ldw ≥ N, so a column slice of a fused
 * matrix works too; float32, or bfloat16 when w_bf16), bias [N] float32 or NULL, y [n, N] (rows ldy apart).
 * Every weight is read from memory once (linear_rows: one pass for up to LINEAR_GROUP rows, L2-sized blocks for
 * more). Wide matrices split their columns over the threads, each thread streaming its strip of every row. Narrow ones (a thread's strip under ksplit_bytes) split the rows instead:
 * each thread streams one contiguous block of W into its own partial y, and the partials are summed after;
 * short strided strips defeat the hardware prefetcher. Returns 0, or -2 if the partials cannot be allocated. */
int nm3_linear(const float *x, int64_t n, int64_t ldx, const void *W, int w_bf16, int64_t K, int64_t N,
               int64_t ldw, const float *bias, float *y, int64_t ldy, int64_t ksplit_bytes, int nthreads) {
    int64_t elt = w_bf16 ? 2 : 4;
    int ksplit = nthreads > 1 && N * elt / nthreads < ksplit_bytes && K >= 16 * nthreads;
    float *part = NULL;
    if (ksplit && !(part = malloc((size_t)(nthreads - 1) * (size_t)(n * N) * sizeof(float)))) return -2;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t T = omp_get_num_threads(), th = omp_get_thread_num(), strips = (N + 15) / 16;
        if (!ksplit || T == 1) {
            int64_t c0 = strips * th / T * 16, c1 = strips * (th + 1) / T * 16;
            c1 = c1 < N ? c1 : N;
            for (int64_t t = 0; t < n; t++)
                for (int64_t j = c0; j < c1; j++) y[t * ldy + j] = bias ? bias[j] : 0.0f;
            linear_rows(x, n, ldx, W, w_bf16, K, ldw, c0, c1, y, ldy);
        } else {
            int64_t k0 = K * th / T, k1 = K * (th + 1) / T, ld = th ? N : ldy;
            float *mine = th ? part + (th - 1) * n * N : y;
            for (int64_t t = 0; t < n; t++)
                for (int64_t j = 0; j < N; j++) mine[t * ld + j] = bias && !th ? bias[j] : 0.0f;
            linear_rows(x + k0, n, ldx, w_offset(W, k0 * ldw, w_bf16), w_bf16, k1 - k0, ldw, 0, N, mine, ld);
#pragma omp barrier
            int64_t c0 = N * th / T, c1 = N * (th + 1) / T;
            for (int64_t t = 0; t < n; t++)
                for (int64_t p = 0; p + 1 < T; p++) {
                    const float *src = part + p * n * N + t * N;
                    for (int64_t j = c0; j < c1; j++) y[t * ldy + j] += src[j];
                }
        }
    }
    free(part);
    return 0;
}

/* dst[c·ldd + r] = src[r·lds + c] for r < rows, c < cols: the transpose of a row-major block. Sixteen source rows
 * at a time, so the lines they span stay in L1 while each output row is written. */
static void transpose(const float *src, int64_t lds, int64_t rows, int64_t cols, float *dst, int64_t ldd) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c = 0; c < cols; c++)
            for (int64_t r = r0; r < rows && r < r0 + 16; r++) dst[c * ldd + r] = src[r * lds + c];
}

/* acc[r][c] += Σ_j a[r][j]·b[j][c] for mb ≤ 6 rows r, j < k, c < p (rows lda / ldb / ldacc floats apart); with
 * init, acc[r][c] = the sum (acc is not read). The mb rows share every load of b: 6 rows × 64 columns of sums
 * (24 zmm) stay in registers beside b's 4 and a broadcast, so FMAs, not loads, set the pace: one core runs 114
 * GFLOP/s (its FMA peak, Zen 4) at k = p = 64, where 4 rows (4 loads + 4 broadcasts per 16 FMAs) ran 93. Each
 * sum keeps its order in j whatever the blocking. Inlined per mb. */
static inline __attribute__((always_inline)) void mm_rows(float *acc, int64_t ldacc, const float *a, int64_t lda,
                                                          const float *b, int64_t ldb, const int mb, int64_t k,
                                                          int64_t p, const int init) {
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c + 64 <= p; c += 64) {
        __m512 s[6][4];
        for (int r = 0; r < mb; r++)
            for (int v = 0; v < 4; v++)
                s[r][v] = init ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + r * ldacc + c + 16 * v);
        for (int64_t j = 0; j < k; j++) {
            const float *bj = b + j * ldb + c;
            __m512 b0 = _mm512_loadu_ps(bj), b1 = _mm512_loadu_ps(bj + 16);
            __m512 b2 = _mm512_loadu_ps(bj + 32), b3 = _mm512_loadu_ps(bj + 48);
            for (int r = 0; r < mb; r++) {
                __m512 av = _mm512_set1_ps(a[r * lda + j]);
                s[r][0] = _mm512_fmadd_ps(av, b0, s[r][0]);
                s[r][1] = _mm512_fmadd_ps(av, b1, s[r][1]);
                s[r][2] = _mm512_fmadd_ps(av, b2, s[r][2]);
                s[r][3] = _mm512_fmadd_ps(av, b3, s[r][3]);
            }
        }
        for (int r = 0; r < mb; r++)
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc + r * ldacc + c + 16 * v, s[r][v]);
    }
    for (; c < p; c += 16) {
        __mmask16 m = p - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (p - c)) - 1u);
        __m512 s[6];
        for (int r = 0; r < mb; r++) s[r] = init ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, acc + r * ldacc + c);
        for (int64_t j = 0; j < k; j++) {
            __m512 bv = _mm512_maskz_loadu_ps(m, b + j * ldb + c);
            for (int r = 0; r < mb; r++) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + j]), bv, s[r]);
        }
        for (int r = 0; r < mb; r++) _mm512_mask_storeu_ps(acc + r * ldacc + c, m, s[r]);
    }
#else
    if (init)
        for (int r = 0; r < mb; r++)
            for (int64_t cc = 0; cc < p; cc++) acc[r * ldacc + cc] = 0.0f;
    for (int r = 0; r < mb; r++)
        for (int64_t j = 0; j < k; j++) {
            float w = a[r * lda + j];
            for (int64_t cc = 0; cc < p; cc++) acc[r * ldacc + cc] += w * b[j * ldb + cc];
        }
#endif
}

enum { MM_FULL, MM_TRI_A, MM_TRI_OUT };

/* acc [m, p] += a [m, k] · b [k, p] (init: acc = a · b) in blocks of 6 rows (mm_rows), the last 1-5 rows as
 * a block of up to 4 and one of the rest, so every block lies within one 6-row-aligned span. MM_TRI_A: a is lower-
 * triangular (a[r][j] = 0 for j > r, zeros stored up to the block's last row), so each block stops at its last row's
 * diagonal in k. MM_TRI_OUT: only acc[r][c ≤ r] is wanted, so each block stops there in p (the columns up to the
 * block's last row are written). */
static void mm_acc(float *acc, int64_t ldacc, const float *a, int64_t lda, const float *b, int64_t ldb, int64_t m,
                   int64_t k, int64_t p, int shape, int init) {
    for (int64_t r0 = 0; r0 < m;) {
        int mb = m - r0 >= 6 ? 6 : m - r0 < 4 ? (int)(m - r0) : 4;
        int64_t kk = shape == MM_TRI_A && r0 + mb < k ? r0 + mb : k;
        int64_t pp = shape == MM_TRI_OUT && r0 + mb < p ? r0 + mb : p;
        float *ar = acc + r0 * ldacc;
        const float *a0 = a + r0 * lda;
#define MM_ROWS(MB) \
    (init ? mm_rows(ar, ldacc, a0, lda, b, ldb, MB, kk, pp, 1) : mm_rows(ar, ldacc, a0, lda, b, ldb, MB, kk, pp, 0))
        switch (mb) {
        case 1: MM_ROWS(1); break;
        case 2: MM_ROWS(2); break;
        case 3: MM_ROWS(3); break;
        case 4: MM_ROWS(4); break;
        default: MM_ROWS(6); break;
        }
#undef MM_ROWS
        r0 += mb;
    }
}

#define PA_TOKENS 32 /* query tokens per work item of nm3_prefill_attention (× g heads = the block's rows) */
#define PA_KEYS 64   /* keys per block */

/* Causal GQA attention of a prefill chunk (flash-style: online softmax over key blocks, no T_q × T_k matrix).
 * Query token i of T_q sits at position off + i (off = T_k − T_q: the keys before the chunk) and sees keys
 * 0 … off + i. q [T_q, nq, d] (token rows ldq floats apart, heads d apart); k, v [nkv, T_k, d] (heads hs floats
 * apart, rows d apart); out [T_q, nq, d] (rows ldo apart); scale multiplies q·k. A work item is one KV head's g
 * query heads × PA_TOKENS tokens, so each key block is read once for all of them; S = Q·Kᵀ and O += P·V are
 * mm_acc products (Kᵀ of every head formed once up front). Visible scores only enter the softmax (masked
 * weights are exact zeros). Returns 0, or -2 if scratch allocation fails. */
int nm3_prefill_attention(int64_t Tq, int64_t Tk, const float *q, int64_t ldq, const float *k, const float *v,
                          int64_t hs, int64_t nq, int64_t nkv, int64_t d, float scale, float *out, int64_t ldo,
                          int nthreads) {
    int64_t g = nq / nkv, off = Tk - Tq, blocks = (Tq + PA_TOKENS - 1) / PA_TOKENS, R = g * PA_TOKENS;
    int64_t tiles = (Tk + PA_KEYS - 1) / PA_KEYS, tile = d * PA_KEYS;
    /* Kᵀ tile by tile, [nkv][tiles][d][PA_KEYS]: each tile's rows PA_KEYS floats apart. (Rows Tk floats apart, as
     * one [d][Tk] matrix per head, put a tile's d rows 8 KiB apart at Tk = 2048, all in the same four L1 sets,
     * and its products ran at half their rate.) */
    float *kt = malloc((size_t)(nkv * tiles * tile > 0 ? nkv * tiles * tile : 1) * sizeof(float));
    if (!kt) return -2;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
#pragma omp for schedule(static)
        for (int64_t r = 0; r < nkv * tiles; r++) { /* Kᵀ of head r / tiles, keys of tile r % tiles */
            int64_t hk = r / tiles, t0 = r % tiles * PA_KEYS, nt = Tk - t0 < PA_KEYS ? Tk - t0 : PA_KEYS;
            transpose(k + hk * hs + t0 * d, d, nt, d, kt + r * tile, PA_KEYS);
        }
        float *Q = malloc((size_t)(R * d) * sizeof(float)), *O = malloc((size_t)(R * d) * sizeof(float));
        float *S = malloc((size_t)(R * PA_KEYS) * sizeof(float)), *M = malloc((size_t)(2 * R) * sizeof(float));
        if (all_allocated(Q && O && S && M, &failed)) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < nkv * blocks; it++) { /* the longest (last) token blocks first */
                int64_t hk = it % nkv, t0 = (blocks - 1 - it / nkv) * PA_TOKENS;
                int64_t nt = Tq - t0 < PA_TOKENS ? Tq - t0 : PA_TOKENS, rows = g * nt; /* row j·nt + i */
                float *l = M + R;
                for (int64_t j = 0; j < g; j++)
                    for (int64_t i = 0; i < nt; i++) {
                        const float *src = q + (t0 + i) * ldq + (hk * g + j) * d;
                        for (int64_t c = 0; c < d; c++) Q[(j * nt + i) * d + c] = src[c] * scale;
                    }
                for (int64_t r = 0; r < rows; r++) {
                    M[r] = -INFINITY;
                    l[r] = 0.0f;
                }
                for (int64_t x = 0; x < rows * d; x++) O[x] = 0.0f;
                for (int64_t k0 = 0, kend = off + t0 + nt; k0 < kend; k0 += PA_KEYS) {
                    int64_t nk = kend - k0 < PA_KEYS ? kend - k0 : PA_KEYS;
                    mm_acc(S, PA_KEYS, Q, d, kt + (hk * tiles + k0 / PA_KEYS) * tile, PA_KEYS, rows, d, nk, MM_FULL, 1);
                    for (int64_t r = 0; r < rows; r++) {
                        float *sr = S + r * PA_KEYS;
                        int64_t vis = off + t0 + r % nt + 1 - k0; /* keys of this block that row r sees */
                        vis = vis < nk ? (vis > 0 ? vis : 0) : nk;
                        if (vis > 0) {
                            float mt = max_of(sr, vis, M[r]); /* corr: 0 on the first block, 1 if the max held */
                            float corr = mt == M[r] ? 1.0f : expf(M[r] - mt);
                            l[r] = l[r] * corr + exp_sub_sum(sr, vis, mt);
                            M[r] = mt;
                            if (corr != 1.0f)
                                for (int64_t c = 0; c < d; c++) O[r * d + c] *= corr;
                        }
                        for (int64_t c = vis; c < nk; c++) sr[c] = 0.0f;
                    }
                    mm_acc(O, d, S, PA_KEYS, v + hk * hs + k0 * d, d, rows, nk, d, MM_FULL, 0);
                }
                for (int64_t j = 0; j < g; j++)
                    for (int64_t i = 0; i < nt; i++) {
                        const float *src = O + (j * nt + i) * d;
                        float inv = 1.0f / l[j * nt + i], *dst = out + (t0 + i) * ldo + (hk * g + j) * d;
                        for (int64_t c = 0; c < d; c++) dst[c] = src[c] * inv;
                    }
            }
        }
        free(Q); free(O); free(S); free(M);
        FTZ_END
    }
    free(kt);
    return failed ? -2 : 0;
}

/* w[j] ← w[j]·e^(x[j]) for j < m, all x[j] ≤ 0 (vectorised exp where available). */
static void mul_exp_nonpos(float *w, const float *x, int64_t m) {
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= m; j += 16)
        _mm512_storeu_ps(w + j, _mm512_mul_ps(_mm512_loadu_ps(w + j), exp_nonpos(_mm512_loadu_ps(x + j))));
#endif
    for (; j < m; j++) w[j] *= expf(x[j]);
}

/* The chunked SSD scan (prefill) of one sequence, the math of mamba2.py `ssd_chunk_scan` without padding
 * (a short last chunk is the same as one padded with Δ = 0). Per chunk of Q tokens, s = cumsum(Δ·A_h):
 *   y_l = e^(s_l)·(S_in · C_l)  +  Σ_{j≤l} (C_l·B_j)·e^(s_l − s_j)·Δ_j x_j
 *   S_out = e^(s_last)·S_in + Σ_j B_j ⊗ e^(s_last − s_j)·Δ_j x_j
 * x [t, h, p] (token rows ldx floats apart), dt [t, h] (rows lddt apart; softplus'ed and clamped), A [h] (< 0),
 * B, C [t, g, n] (rows ldb / ldc apart; head hd reads group hd / (h/g)); state [h, p, n] is the entering
 * state and receives the final one; y [t, h, p] contiguous. Phase 1, per (chunk, group) in parallel: Bᵀ [n, Q]
 * and C·Bᵀ, shared by the group's heads. Phase 2 runs the heads in parallel, each carrying its state
 * (transposed, [n, p]) through the chunks in order: three blocked GEMMs per chunk (mm_acc). y NULL advances the
 * state only: of the three products just the state's is formed, and C·Bᵀ not at all. Returns 0, or -2 if scratch
 * allocation fails. */
int nm3_ssd_scan(int64_t t, int64_t h, int64_t p, int64_t g, int64_t n, int64_t Q, const float *x, int64_t ldx,
                 const float *dt, int64_t lddt, const float *A, const float *B, int64_t ldb, const float *C,
                 int64_t ldc, float *state, float *y, int nthreads) {
    int64_t nc = (t + Q - 1) / Q, hpg = h / g, blocks = nc * g > 0 ? nc * g : 1;
    float *cb = y ? malloc((size_t)(blocks * Q * Q) * sizeof(float)) : NULL; /* [chunk][group]: C·Bᵀ [Q][Q] (j ≤ l) */
    float *bt = malloc((size_t)(blocks * n * Q) * sizeof(float)); /* [chunk][group]: Bᵀ [n][Q] */
    if ((y && !cb) || !bt) {
        free(cb);
        free(bt);
        return -2;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < nc * g; r++) {
            int64_t c = r / g, gi = r % g, c0 = c * Q, q = t - c0 < Q ? t - c0 : Q;
            float *btr = bt + r * n * Q;
            transpose(B + c0 * ldb + gi * n, ldb, q, n, btr, Q);
            if (y) mm_acc(cb + r * Q * Q, Q, C + c0 * ldc + gi * n, ldc, btr, Q, q, n, q, MM_TRI_OUT, 1);
        }
        int64_t nQ = n > Q ? n : Q;
        float *ST = malloc((size_t)(n * p) * sizeof(float)); /* state, transposed [n][p] */
        float *X = malloc((size_t)(2 * Q * p) * sizeof(float)); /* Δ_j x_j [Q][p], then e^(s_last − s_j)·Δ_j x_j */
        float *M = malloc((size_t)(Q * nQ) * sizeof(float)); /* C·e^s [Q][n], then the mixing weights [Q][Q] */
        float *W = malloc((size_t)(3 * Q) * sizeof(float)); /* s | e^s | scratch */
        if (all_allocated(ST && X && M && W, &failed)) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t hd = 0; hd < h; hd++) {
                int64_t gi = hd / hpg, ldy = h * p;
                float a = A[hd], *S = state + hd * p * n, *s = W, *es = s + Q, *tmp = es + Q, *X2 = X + Q * p;
                transpose(S, n, p, n, ST, p);
                for (int64_t c = 0; c * Q < t; c++) {
                    int64_t c0 = c * Q, q = t - c0 < Q ? t - c0 : Q;
                    const float *cbc = cb + (c * g + gi) * Q * Q, *btc = bt + (c * g + gi) * n * Q;
                    float *yc = y ? y + (c0 * h + hd) * p : NULL; /* the chunk's first output row; rows ldy apart */
                    float acc = 0.0f;
                    for (int64_t l = 0; l < q; l++) {
                        float d = dt[(c0 + l) * lddt + hd];
                        acc += d * a;
                        s[l] = acc;
                        es[l] = expf(acc);
                        const float *xl = x + (c0 + l) * ldx + hd * p;
                        for (int64_t cc = 0; cc < p; cc++) X[l * p + cc] = d * xl[cc];
                    }
                    if (y) { /* the outputs (a states-only scan skips them) */
                        /* the entering state: y_l = e^(s_l)·(C_l · S) (the first write of y's rows) */
                        for (int64_t l = 0; l < q; l++) {
                            const float *Cl = C + (c0 + l) * ldc + gi * n;
                            for (int64_t k = 0; k < n; k++) M[l * n + k] = es[l] * Cl[k];
                        }
                        mm_acc(yc, ldy, M, n, ST, p, q, n, p, MM_FULL, 1);
                        /* intra-chunk: y_l += Σ_{j≤l} M[l][j]·X_j, M[l][j] = (C_l·B_j)·e^(s_l − s_j) (zero above the
                         * diagonal to the end of each 6-row-aligned span, which mm_acc reads) */
                        for (int64_t l = 0; l < q; l++) {
                            float *row = M + l * Q;
                            for (int64_t j = 0; j <= l; j++) {
                                row[j] = cbc[l * Q + j];
                                tmp[j] = s[l] - s[j]; /* ≤ 0: s falls as A < 0, Δ ≥ 0 */
                            }
                            mul_exp_nonpos(row, tmp, l + 1);
                            for (int64_t j = l + 1; j < q && j < (l / 6 + 1) * 6; j++) row[j] = 0.0f;
                        }
                        mm_acc(yc, ldy, M, Q, X, p, q, q, p, MM_TRI_A, 0);
                    }
                    /* S ← e^(s_last)·S + Bᵀ · X2, X2_j = e^(s_last − s_j)·X_j */
                    float last = s[q - 1], decay = expf(last);
                    for (int64_t j = 0; j < q; j++) tmp[j] = last - s[j];
                    for (int64_t j = 0; j < q; j++) es[j] = 1.0f;
                    mul_exp_nonpos(es, tmp, q); /* es[j] = e^(s_last − s_j) */
                    for (int64_t j = 0; j < q; j++)
                        for (int64_t cc = 0; cc < p; cc++) X2[j * p + cc] = es[j] * X[j * p + cc];
                    for (int64_t i = 0; i < n * p; i++) ST[i] *= decay;
                    mm_acc(ST, p, btc, Q, X2, p, n, q, p, MM_FULL, 0);
                }
                transpose(ST, p, n, p, S, n);
            }
        }
        free(ST); free(X); free(M); free(W);
        FTZ_END
    }
    free(cb);
    free(bt);
    return failed ? -2 : 0;
}

/* silu(v) = v·σ(v) for every element of a row, in place. σ comes from e = e^(−|v|) ≤ 1 (exp_nonpos): 1/(1+e)
 * for v ≥ 0, e/(1+e) below, so no exponent overflows. */
static void silu_row(float *v, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(v + i);
        __m512 e = exp_nonpos(_mm512_sub_ps(zero, _mm512_abs_ps(x)));
        __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
        __m512 sig = _mm512_mask_mul_ps(inv, _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), inv, e);
        _mm512_storeu_ps(v + i, _mm512_mul_ps(x, sig));
    }
#endif
    for (; i < n; i++) v[i] = silu(v[i]);
}

/* Σ v[i]² (16 lanes, then the rest). */
static float sum_sq(const float *v, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(v + i);
        acc = _mm512_fmadd_ps(x, x, acc);
    }
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s += v[i] * v[i];
    return s;
}

/* A Mamba2Mixer's prefill of one sequence between in_proj and out_proj (mamba2.py `mix`, decode=False):
 *   u = silu(causal depthwise conv of xbc, continuing from conv_state, + conv_b)   (x | B | C columns)
 *   Δ = clamp(softplus(dt + dt_bias), lo, hi);  y = SSD scan (nm3_ssd_scan) of x, Δ, A = −e^A_log, B, C
 *   out = norm_w ⊙ g / rms(g) per norm group,  g = (y + D·x) ⊙ silu(z)
 * proj [t, I + C + nh]: in_proj output rows (z | xbc | dt), ldp floats apart. conv_state [C, K−1] receives the
 * last K−1 inputs; ssm_state [nh, P, N] the final state; out [outs, I] the last `outs` tokens' outputs: outs = t
 * (all), 1 (the last token's, y = C_t·S_t + D·x_t from the final state after a states-only scan) or 0 (the states
 * only). z is read for the output rows only. The conv runs token-parallel over a transposed copy of the weights,
 * the element-wise passes once each over rows that stay in cache. Returns 0, -1 for outs not in {0, 1, t}, or
 * -2 if scratch allocation fails. */
int nm3_mamba_prefill(int64_t t, const float *proj, int64_t ldp, float *conv_state, float *ssm_state,
                      const float *conv_w, const float *conv_b, const float *dt_bias, const float *A_log,
                      const float *D, const float *norm_w, int64_t C, int64_t K, int64_t nh, int64_t P, int64_t N,
                      int64_t G, int64_t norm_groups, int64_t Q, float dt_lo, float dt_hi, float eps, float *out,
                      int64_t outs, int nthreads) {
    int64_t I = nh * P, gsize = I / norm_groups;
    if (outs != t && outs != 0 && outs != 1) return -1;
    float *u = malloc((size_t)(t * C) * sizeof(float)), *delta = malloc((size_t)(t * nh) * sizeof(float));
    float *wt = malloc((size_t)(K * C) * sizeof(float)), *pre = malloc((size_t)((K > 1 ? K - 1 : 1) * C) * sizeof(float));
    float *A = malloc((size_t)nh * sizeof(float));
    int rc = 0;
    if (!u || !delta || !wt || !pre || !A) {
        rc = -2;
        goto done;
    }
    transpose(conv_w, K, C, K, wt, C); /* weights [K][C] and the entering window [K−1][C]: channels contiguous */
    transpose(conv_state, K - 1, C, K - 1, pre, C);
    for (int64_t hd = 0; hd < nh; hd++) A[hd] = -expf(A_log[hd]);
    const float *xbc = proj + I, *dt = proj + I + C;
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
#pragma omp for schedule(static)
        for (int64_t i = 0; i < t; i++) {
            float *ui = u + i * C;
            for (int64_t c = 0; c < C; c++) ui[c] = conv_b ? conv_b[c] : 0.0f;
            for (int64_t j = 0; j < K; j++) {
                int64_t m = i - (K - 1) + j; /* input row m of the window: a token, or the entering state */
                const float *src = m >= 0 ? xbc + m * ldp : pre + (m + K - 1) * C, *w = wt + j * C;
                for (int64_t c = 0; c < C; c++) ui[c] += w[c] * src[c];
            }
            silu_row(ui, C);
            for (int64_t hd = 0; hd < nh; hd++) {
                float d = softplus(dt[i * ldp + hd] + dt_bias[hd]);
                delta[i * nh + hd] = d < dt_lo ? dt_lo : (d > dt_hi ? dt_hi : d);
            }
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++) /* the last K−1 inputs of the window become the state */
            for (int64_t j = 0; j + 1 < K; j++) {
                int64_t m = t - (K - 1) + j;
                conv_state[c * (K - 1) + j] = m >= 0 ? xbc[m * ldp + c] : pre[(m + K - 1) * C + c];
            }
        FTZ_END
    }
    rc = nm3_ssd_scan(t, nh, P, G, N, Q, u, C, delta, nh, A, u + I, C, u + I + G * N, C, ssm_state,
                      outs == t ? out : NULL, nthreads);
    if (rc != 0) goto done;
    if (outs == 1 && t > 1) { /* y_t = C_t · S_t per head (S [P][N], the final state) */
        const float *Ct = u + (t - 1) * C + I + G * N;
        for (int64_t hd = 0; hd < nh; hd++)
            for (int64_t p = 0; p < P; p++) {
                const float *S = ssm_state + (hd * P + p) * N, *Cg = Ct + hd / (nh / G) * N;
                float acc = 0.0f;
                for (int64_t k = 0; k < N; k++) acc += S[k] * Cg[k];
                out[hd * P + p] = acc;
            }
    }
#pragma omp parallel num_threads(nthreads)
    {
        FTZ_BEGIN
#pragma omp for schedule(static)
        for (int64_t i = 0; i < outs; i++) {
            float *yi = out + i * I;
            const float *xi = u + (t - outs + i) * C, *zi = proj + (t - outs + i) * ldp;
            float gate[gsize];
            for (int64_t hd = 0; hd < nh; hd++)
                for (int64_t p = 0; p < P; p++) yi[hd * P + p] += D[hd] * xi[hd * P + p];
            for (int64_t r = 0; r < norm_groups; r++) {
                float *g = yi + r * gsize;
                for (int64_t k = 0; k < gsize; k++) gate[k] = zi[r * gsize + k];
                silu_row(gate, gsize);
                for (int64_t k = 0; k < gsize; k++) g[k] *= gate[k];
                float scale = 1.0f / sqrtf(sum_sq(g, gsize) / (float)gsize + eps);
                for (int64_t k = 0; k < gsize; k++) g[k] = norm_w[r * gsize + k] * (g[k] * scale);
            }
        }
        FTZ_END
    }
done:
    free(u); free(delta); free(wt); free(pre); free(A);
    return rc;
}
