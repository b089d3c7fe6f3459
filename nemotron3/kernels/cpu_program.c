/* A whole decode step as one C call: the CPU counterpart of replaying a captured CUDA graph.
 *
 * nemotron3/engine/decode_program.py lays a model's decode step out once as a flat list of ops over fixed
 * buffers (its weights, the cache pools, its own activation rows); nm3_run_program replays that list for n
 * decode rows, calling the kernels of cpu_decode.c in the order the Python runner would. What changes from
 * step to step (token ids, state slots, K/V write positions, block tables, key counts) lives in arrays the
 * ops point at, which Python fills before each call. The per-op Python and dispatch cost (~1 ms a step for
 * nemo50's 8 layers: ~280 torch ops and ~30 ctypes calls) becomes one call.
 *
 * Each op is OP_WIDTH int64 slots: a[0] is the kind, the rest its arguments as listed at the op below;
 * pointers are addresses, floats are the bits of a double. The math is cpu_decode.c's, so a program step
 * computes what the runner's native path computes (tests/engine/test_decode_program.py).
 */
#include <stdint.h>
#include <string.h>

#define OP_WIDTH 32

enum { OP_EMBED = 1, OP_NORM, OP_LINEAR, OP_RELU2, OP_MAMBA, OP_KV_WRITE, OP_ATTENTION, OP_ROUTE_EXPERTS, OP_ADD };

/* cpu_decode.c */
int nm3_route_experts(const float *logits, int64_t stride, const float *bias, int64_t k, int norm, float scale,
                      int64_t *idx, float *w, const float *x, int64_t ldx, int64_t T, int64_t L, const void *up,
                      const void *down, int w_bf16, int64_t E, int64_t F, float *out, int64_t ldo, int nthreads);
void nm3_mamba_step(int64_t b, const int64_t *slots, const float *xbc, const float *z, const float *dt,
                    int64_t row_stride, float *conv_pool, float *ssm_pool, const float *conv_w,
                    const float *conv_b, const float *dt_bias, const float *A_log, const float *D,
                    const float *norm_w, int64_t C, int64_t K, int64_t nh, int64_t P, int64_t N, int64_t G,
                    int64_t norm_groups, float dt_lo, float dt_hi, float eps, float *u, float *out, int nthreads);
int nm3_decode_attention(int64_t n, const float *q, int64_t ldq, const void *k_plane, const void *v_plane,
                         int kv_bf16, int64_t tokens, const int64_t *const *tables, const int64_t *lens, int64_t bs,
                         int64_t nq, int64_t nkv, int64_t d, float scale, float *out, int nthreads);
void nm3_add_rms_norm(float *h, const float *delta, const float *w, float eps, int64_t rows, int64_t H, float *out,
                      int nthreads);
int nm3_linear(const float *x, int64_t n, int64_t ldx, const void *W, int w_bf16, int64_t K, int64_t N,
               int64_t ldw, const float *bias, float *y, int64_t ldy, int64_t ksplit_bytes, int nthreads);

static inline void *ptr(int64_t a) { return (void *)(intptr_t)a; }

static inline float real(int64_t bits) {
    double v;
    memcpy(&v, &bits, sizeof v);
    return (float)v;
}

/* float32 → bfloat16, rounding to nearest even as torch's .to(torch.bfloat16) does (NaN stays a quiet NaN). */
static inline uint16_t to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* K and V of n rows into one layer's pool planes [nkv, tokens, d] at pool rows pos[r]; the row's V follows its
 * K (nkv·d floats later) in src, as the fused qkv projection lays them out. */
static void kv_write(const float *src, int64_t ld, const int64_t *pos, void *k_plane, void *v_plane, int bf16,
                     int64_t tokens, int64_t nkv, int64_t d, int64_t n) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t h = 0; h < nkv; h++) {
            const float *k = src + r * ld + h * d, *v = k + nkv * d;
            int64_t at = (h * tokens + pos[r]) * d;
            if (bf16) {
                uint16_t *kd = (uint16_t *)k_plane + at, *vd = (uint16_t *)v_plane + at;
                for (int64_t c = 0; c < d; c++) {
                    kd[c] = to_bf16(k[c]);
                    vd[c] = to_bf16(v[c]);
                }
            } else {
                memcpy((float *)k_plane + at, k, (size_t)d * sizeof(float));
                memcpy((float *)v_plane + at, v, (size_t)d * sizeof(float));
            }
        }
}

/* Run ops[0 .. n_ops) for n rows. An OP_LINEAR whose output address is 0 writes to `out` (the step's logits).
 * Returns 0; -1 for a token id outside the embedding table; -2 when a kernel's scratch allocation failed. */
int nm3_run_program(const int64_t *ops, int64_t n_ops, int64_t n, float *out, int nthreads) {
    for (int64_t i = 0; i < n_ops; i++) {
        const int64_t *a = ops + i * OP_WIDTH;
        int rc = 0;
        switch (a[0]) {
        case OP_EMBED: { /* table, H, ids, dest, vocab: dest[r] = table[ids[r]] */
            const float *table = ptr(a[1]);
            const int64_t *ids = ptr(a[3]);
            float *dest = ptr(a[4]);
            for (int64_t r = 0; r < n; r++) {
                if (ids[r] < 0 || ids[r] >= a[5]) return -1;
                memcpy(dest + r * a[2], table + ids[r] * a[2], (size_t)a[2] * sizeof(float));
            }
            break;
        }
        case OP_NORM: /* h, delta (0: none), w, eps, H, dest: h += delta; dest = RMSNorm(h) */
            nm3_add_rms_norm(ptr(a[1]), ptr(a[2]), ptr(a[3]), real(a[4]), n, a[5], ptr(a[6]), nthreads);
            break;
        case OP_LINEAR: /* x, ldx, W, bf16, K, N, ldw, bias, y (0: out), ldy, ksplit_bytes */
            rc = nm3_linear(ptr(a[1]), n, a[2], ptr(a[3]), (int)a[4], a[5], a[6], a[7], ptr(a[8]),
                            a[9] ? ptr(a[9]) : out, a[10], a[11], nthreads);
            break;
        case OP_RELU2: { /* src, lds, cols, dest, ldd: dest = relu(src)² */
            const float *src = ptr(a[1]);
            float *dest = ptr(a[4]);
            for (int64_t r = 0; r < n; r++)
                for (int64_t c = 0; c < a[3]; c++) {
                    float v = src[r * a[2] + c];
                    dest[r * a[5] + c] = v > 0.0f ? v * v : 0.0f;
                }
            break;
        }
        case OP_MAMBA: { /* slots, proj, ldp, I, C, conv_pool, ssm_pool, conv_w, conv_b, dt_bias, A_log, D, norm_w,
                          * K, nh, P, N, G, norm_groups, dt_lo, dt_hi, eps, u, dest; proj rows are z | xbc | dt */
            const float *proj = ptr(a[2]);
            nm3_mamba_step(n, ptr(a[1]), proj + a[4], proj, proj + a[4] + a[5], a[3], ptr(a[6]), ptr(a[7]),
                           ptr(a[8]), ptr(a[9]), ptr(a[10]), ptr(a[11]), ptr(a[12]), ptr(a[13]), a[5], a[14],
                           a[15], a[16], a[17], a[18], a[19], real(a[20]), real(a[21]), real(a[22]), ptr(a[23]),
                           ptr(a[24]), nthreads);
            break;
        }
        case OP_KV_WRITE: /* src, ld, positions, k_plane, v_plane, bf16, tokens, nkv, d */
            kv_write(ptr(a[1]), a[2], ptr(a[3]), ptr(a[4]), ptr(a[5]), (int)a[6], a[7], a[8], a[9], n);
            break;
        case OP_ATTENTION: /* q, ldq, k_plane, v_plane, bf16, tokens, tables, lens, bs, nq, nkv, d, scale, dest */
            rc = nm3_decode_attention(n, ptr(a[1]), a[2], ptr(a[3]), ptr(a[4]), (int)a[5], a[6], ptr(a[7]),
                                      ptr(a[8]), a[9], a[10], a[11], a[12], real(a[13]), ptr(a[14]), nthreads);
            break;
        case OP_ROUTE_EXPERTS: /* logits, stride, bias, k, norm, scale, idx, w, x, ldx, L, up, down, bf16, E, F,
                                * dest, ldd */
            rc = nm3_route_experts(ptr(a[1]), a[2], ptr(a[3]), a[4], (int)a[5], real(a[6]), ptr(a[7]), ptr(a[8]),
                                   ptr(a[9]), a[10], n, a[11], ptr(a[12]), ptr(a[13]), (int)a[14], a[15], a[16],
                                   ptr(a[17]), a[18], nthreads);
            break;
        case OP_ADD: { /* dest, ldd, src, lds, cols: dest += src */
            float *dest = ptr(a[1]);
            const float *src = ptr(a[3]);
            for (int64_t r = 0; r < n; r++)
                for (int64_t c = 0; c < a[5]; c++) dest[r * a[2] + c] += src[r * a[4] + c];
            break;
        }
        default:
            return -3;
        }
        if (rc != 0) return rc;
    }
    return 0;
}
