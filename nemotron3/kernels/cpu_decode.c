/* nemotron3 CPU decode kernels (float32, OpenMP).
 *
 * Two steps of a decode forward that torch runs as dozens of ~1 us ops each, fused into one call:
 *   nm3_experts     routed LatentMoE experts for a few tokens: Σ_j w_j · down_e(relu(up_e x)²)
 *   nm3_mamba_step  the Mamba-2 recurrence step between in_proj and out_proj, on pooled state slots
 * Built once per machine by nemotron3/kernels/native.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes. The library links the libgomp.so.1 that torch has already loaded, so both share one OpenMP pool
 * and torch.set_num_threads applies here too. The math mirrors nemotron3/model/moe.py and mamba2.py
 * exactly; tests/kernels/test_native.py checks both against float64 references.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Σ a_i b_i with 16 independent partial sums: the compiler vectorises it without -ffast-math. */
static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* F.softplus(v) with its default threshold 20 (linear above it). */
static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

/* out[t] = Σ_{j<k} w[t,j] · down[e](relu(up[e] · x[t])²), e = idx[t,j].
 * x [T, L]; up [E, F, L]; down [E, L, F] (row-major, contiguous); idx [T, k] int64; w [T, k]; out [T, L].
 * Every expert row is read once per call: phase 1 splits the (active expert, F row) pairs over threads,
 * phase 2 the L output rows (each thread owns its rows, so no atomics). Returns 0, or -1 on a bad index. */
int nm3_experts(const float *x, int64_t T, int64_t L, const float *up, const float *down, int64_t E, int64_t F,
                const int64_t *idx, const float *w, int64_t k, float *out) {
    int64_t P = T * k;
    for (int64_t p = 0; p < P; p++)
        if (idx[p] < 0 || idx[p] >= E) return -1;
    int64_t *start = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *order = malloc((size_t)(P > 0 ? P : 1) * sizeof(int64_t));
    int64_t *active = malloc((size_t)E * sizeof(int64_t));
    float *h = malloc((size_t)(P > 0 ? P : 1) * (size_t)F * sizeof(float));
    if (!start || !order || !active || !h) {
        free(start); free(order); free(active); free(h);
        return -2;
    }
    /* counting sort of the (token, slot) pairs by expert, stable (the order moe.py's argsort gives) */
    for (int64_t p = 0; p < P; p++) start[idx[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    int64_t *fill = calloc((size_t)E, sizeof(int64_t));
    if (!fill) {
        free(start); free(order); free(active); free(h);
        return -2;
    }
    for (int64_t p = 0; p < P; p++) order[start[idx[p]] + fill[idx[p]]++] = p;
    free(fill);
    int64_t n_active = 0;
    for (int64_t e = 0; e < E; e++)
        if (start[e + 1] > start[e]) active[n_active++] = e;

#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n_active * F; r++) {
            int64_t e = active[r / F], f = r % F;
            const float *row = up + (e * F + f) * L;
            for (int64_t q = start[e]; q < start[e + 1]; q++) {
                float v = dot(row, x + (order[q] / k) * L, L);
                v = v > 0.0f ? v : 0.0f;
                h[q * F + f] = v * v;
            }
        }
#pragma omp for schedule(static)
        for (int64_t l = 0; l < L; l++) {
            for (int64_t t = 0; t < T; t++) out[t * L + l] = 0.0f;
            for (int64_t a = 0; a < n_active; a++) {
                int64_t e = active[a];
                const float *row = down + (e * L + l) * F;
                for (int64_t q = start[e]; q < start[e + 1]; q++) {
                    int64_t p = order[q];
                    out[(p / k) * L + l] += w[p] * dot(row, h + q * F, F);
                }
            }
        }
    }
    free(start); free(order); free(active); free(h);
    return 0;
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
                    int64_t norm_groups, float dt_lo, float dt_hi, float eps, float *u, float *out) {
    int64_t I = nh * P, hpg = nh / G, gsize = I / norm_groups;
#pragma omp parallel
    {
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
            for (int64_t p = 0; p < P; p++) {
                float dx = delta * xh[p], acc = 0.0f;
                float *Sp = S + p * N;
                for (int64_t n = 0; n < N; n++) {
                    Sp[n] = Sp[n] * decay + dx * Bg[n];
                    acc += Sp[n] * Cg[n];
                }
                out[s * I + hd * P + p] = acc + D[hd] * xh[p];
            }
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
    }
}
