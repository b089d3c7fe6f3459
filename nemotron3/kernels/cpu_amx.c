/* Float32 matrix products on Intel AMX tiles (bfloat16 inputs, float32 accumulation), or with AVX512-BF16 dot
 * products where the CPU has those but no AMX (AMD Zen 4, Intel Cooper Lake), for prefill GEMMs under torch's
 * reduced float32 matmul precisions (torch.set_float32_matmul_precision):
 *
 *   "high"    each float32 is split into a bfloat16 pair (round to nearest even), v = hi + lo + e with
 *             |e| ≤ 2^-16·|v|, and x·w = x_hi·w_hi + x_lo·w_hi + x_hi·w_lo: the dropped terms (lo·lo and
 *             the splits' remainders) are at most 3·2^-16 of |x|·|w|;
 *   "medium"  x_hi·w_hi alone (bfloat16 inputs).
 *
 * `products` (1, 2 or 3) counts the terms taken, in that order; a bfloat16 weight has no lo part, so its
 * products stop at 2 and "high" is then exact to the split of x. One TDPBF16PS multiplies a 16×32 bf16 tile of x
 * by a 32×16 tile of w into 16×16 float32 sums: 8192 multiply-adds per instruction against 16 per AVX-512 FMA;
 * one VDPBF16PS adds 16 pairs of bf16 products into 16 float32 sums: 32 multiply-adds, twice an FMA's.
 *
 * Layouts (K padded to 32, M and N to 32, with zeros): x's hi and lo parts are packed tile by tile,
 * [M/16][K/32][16 rows][32], so every tile load reads 1 KiB contiguously; w's parts in the "VNNI" order the
 * B operand wants, [N/16][K/32][16 k-pairs][16 columns][2], built from the engine's K-major weight storage
 * (two consecutive weight rows interleaved). The product runs in blocks of 32 rows × 32 columns (four
 * accumulator tiles, two x tiles, two w tiles: the eight tile registers), up to AMX_MC rows of x at a time so
 * their packed tiles stay in L2 while each thread streams its columns of w. Without AMX, the same packed operands
 * feed VDPBF16PS: a 32 × 32 block is four passes of 8 rows × 32 columns (16 accumulators), broadcasting one
 * (k, k+1) pair of x per row against a 64-byte row of the packed w, which is exactly the pairs layout it takes.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/mman.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define NM3_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define AMX_MC 256 /* at most this many rows of x per pass over a column chunk (fewer when K is large, below) */
#define AMX_NC 512 /* columns of W packed at a time (512·K·4 bytes) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#if defined(NM3_AMX)
/* Linux hands out the tile state only on request, once per process. 1 when AMX can run here. */
int nm3_amx_init(void) {
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return state;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void configure_tiles(void) { /* eight 16 × 64-byte tiles */
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}
#else
int nm3_amx_init(void) { return 0; }
#endif

/* 1: this build has the AVX512-BF16 products (nm3_matmul_bf16 runs without AMX too). */
int nm3_bf16_dot_available(void) { return 1; }

static int amx_allowed = 1;
/* Whether nm3_matmul_bf16 may use AMX where it runs (0: the AVX512-BF16 products; tests compare both). */
void nm3_bf16_allow_amx(int on) { amx_allowed = on; }

static inline __m512 bf16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The bf16 pair of 32 floats (a = 0..15, b = 16..31): hi = round-to-nearest-even, lo = the remainder's. As
 * 16-bit lanes in element order, which read as 32-bit lanes are the pairs (2p, 2p + 1). */
static inline void split32(__m512 a, __m512 b, __m512i *hi, __m512i *lo) {
    __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    __m512 ra = _mm512_sub_ps(a, bf16_to_f32(_mm512_castsi512_si256(h)));
    __m512 rb = _mm512_sub_ps(b, bf16_to_f32(_mm512_extracti64x4_epi64(h, 1)));
    *hi = h;
    *lo = (__m512i)_mm512_cvtne2ps_pbh(rb, ra);
}

static inline void split32_store(__m512 a, __m512 b, uint16_t *hi, uint16_t *lo) {
    __m512i h, l;
    split32(a, b, &h, &l);
    _mm512_storeu_si512(hi, h);
    _mm512_storeu_si512(lo, l);
}

/* r[i][j] ← r[j][i] for 16 rows of 16 32-bit lanes: four rounds that swap b × b blocks (b = 1, 2, 4, 8), each
 * row pair (r, r + b) with r & b = 0 exchanging the lanes c with c & b set. */
static void transpose16(__m512i *r) {
    for (int b = 1; b < 16; b *= 2) {
        int lo_idx[16], hi_idx[16];
        for (int c = 0; c < 16; c++) {
            lo_idx[c] = (c & b) ? 16 + c - b : c;
            hi_idx[c] = (c & b) ? 16 + c : c + b;
        }
        __m512i lo = _mm512_loadu_si512(lo_idx), hi = _mm512_loadu_si512(hi_idx);
        for (int i = 0; i < 16; i++)
            if (!(i & b)) {
                __m512i x = r[i], y = r[i + b];
                r[i] = _mm512_permutex2var_epi32(x, lo, y);
                r[i + b] = _mm512_permutex2var_epi32(x, hi, y);
            }
    }
}

static inline __mmask16 first(int64_t n) { return n >= 16 ? 0xffff : n > 0 ? (__mmask16)((1u << n) - 1) : 0; }

/* Up to 16 elements w[i ..] widened to float32 (float32, or bfloat16 when bf16): the first `left`, zeros after. */
static inline __m512 load16(const void *w, int bf16, int64_t i, int64_t left) {
    __mmask16 m = first(left);
    if (bf16) return bf16_to_f32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i));
    return _mm512_maskz_loadu_ps(m, (const float *)w + i);
}

/* x rows [M, K] (float32, rows ldx apart) into tile-packed hi/lo parts; rows ≥ M and columns ≥ K are zeros. */
static void pack_x(const float *x, int64_t M, int64_t ldx, int64_t K, int64_t Mp, int64_t nk, uint16_t *hi,
                   uint16_t *lo) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < Mp; m++)
        for (int64_t kb = 0; kb < nk; kb++) {
            int64_t k = kb * 32, left = m < M ? K - k : 0;
            size_t o = (size_t)((m / 16) * nk + kb) * 512 + (size_t)(m % 16) * 32;
            split32_store(load16(x, 0, m * ldx + k, left), load16(x, 0, m * ldx + k + 16, left - 16), hi + o, lo + o);
        }
}

/* The K-major weight (element (k, n) at w[k·ldw + n]) into VNNI-packed hi/lo parts: rows k and k+1 interleaved. */
static void pack_w(const void *w, int bf16, int64_t K, int64_t N, int64_t ldw, int64_t Np, int64_t nk, uint16_t *hi,
                   uint16_t *lo) {
    const __m512i even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i odd = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
#pragma omp for schedule(static)
    for (int64_t kp = 0; kp < nk * 16; kp++)
        for (int64_t n = 0; n < Np; n += 16) {
            int64_t k = 2 * kp; /* rows k and k + 1, columns n.. (zeros past K and N) */
            __m512 r0 = k < K ? load16(w, bf16, k * ldw + n, N - n) : _mm512_setzero_ps();
            __m512 r1 = k + 1 < K ? load16(w, bf16, (k + 1) * ldw + n, N - n) : _mm512_setzero_ps();
            size_t o = (size_t)((n / 16) * nk + kp / 16) * 512 + (size_t)(kp % 16) * 32;
            split32_store(_mm512_permutex2var_ps(r0, even, r1), _mm512_permutex2var_ps(r0, odd, r1), hi + o, lo + o);
        }
}

/* A row-major weight (element (k, n) at w[n·ldw + k], as nn.Linear and the stacked experts store it) into the
 * same VNNI-packed parts: per 16 rows × 32 k, the split rows read as 16 × 16 pairs, transposed. */
static void pack_w_rows(const void *w, int bf16, int64_t K, int64_t N, int64_t ldw, int64_t Np, int64_t nk,
                        uint16_t *hi, uint16_t *lo) {
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < (Np / 16) * nk; blk++) {
        int64_t nb = blk / nk, kb = blk % nk;
        __m512i h[16], l[16];
        for (int j = 0; j < 16; j++) {
            int64_t n = nb * 16 + j, k = kb * 32;
            if (n < N)
                split32(load16(w, bf16, n * ldw + k, K - k), load16(w, bf16, n * ldw + k + 16, K - k - 16), &h[j],
                        &l[j]);
            else
                h[j] = l[j] = _mm512_setzero_si512();
        }
        transpose16(h);
        transpose16(l);
        for (int p = 0; p < 16; p++) {
            _mm512_storeu_si512(hi + blk * 512 + p * 32, h[p]);
            _mm512_storeu_si512(lo + blk * 512 + p * 32, l[p]);
        }
    }
}

#if defined(NM3_AMX)
/* The 32 × 32 block at (m, n0) over all of K: products of the hi/lo tiles accumulated in tiles 0-3. Tile
 * registers are not renamed, so a load into a tile waits for every product still reading it: each load is
 * issued right after the last product that reads the tile's previous contents (the next k-step's tiles load
 * while this step's last products run; the final step reloads its own, harmlessly). Against loading all four
 * tiles at the top of each step: 1.1-1.3x on the products alone. */
static inline void block32(const uint16_t *xh, const uint16_t *xl, const uint16_t *wh, const uint16_t *wl, int64_t nk,
                           int products) {
    const int64_t t = nk * 512; /* elements between vertically (x) or horizontally (w) adjacent tiles */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, xh, 64);
    _tile_loadd(6, wh, 64);
    _tile_loadd(5, xh + t, 64);
    _tile_loadd(7, wh + t, 64);
    for (int64_t kb = 0; kb < nk; kb++) {
        const int64_t o = kb * 512, n = (kb + 1 < nk ? kb + 1 : kb) * 512;
        if (products == 3) { /* x_hi·w_hi, then x_hi·w_lo */
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            _tile_loadd(6, wl + o, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
            _tile_loadd(7, wl + t + o, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(4, xl + o, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_loadd(6, wh + o, 64);
            _tile_dpbf16ps(3, 5, 7);
            _tile_loadd(5, xl + t + o, 64);
            _tile_loadd(7, wh + t + o, 64);
        } else if (products == 2) { /* x_hi·w_hi */
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(4, xl + o, 64);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
            _tile_loadd(5, xl + t + o, 64);
        }
        /* the step's last products (x_lo·w_hi, or x_hi·w_hi alone), then the next step's tiles */
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(4, xh + n, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_loadd(6, wh + n, 64);
        _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(5, xh + t + n, 64);
        _tile_loadd(7, wh + t + n, 64);
    }
}

/* y[m, n] (rows ldy apart) = the block's sums (+ bias[n]), clipped to M × N. */
static void store32(float *y, int64_t ldy, int64_t m, int64_t n0, int64_t M, int64_t N, const float *bias) {
    float c[4][256];
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    for (int h = 0; h < 2; h++) { /* column halves: tiles h (rows 0-15) and 2 + h (rows 16-31) */
        int64_t n = n0 + 16 * h;
        __mmask16 mask = first(N - n);
        __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
        for (int r = 0; r < 32 && m + r < M; r++)
            _mm512_mask_storeu_ps(y + (m + r) * ldy + n, mask,
                                  _mm512_add_ps(_mm512_loadu_ps(c[(r / 16) * 2 + h] + (r % 16) * 16), b));
    }
}
#endif

/* The (k, k+1) bf16 pair at p, broadcast to the 16 lanes (VDPBF16PS's A operand). */
static inline __m512bh pair(const uint16_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return (__m512bh)_mm512_set1_epi32(v);
}

/* acc[r][h] += Σ over all K of x part a (8 rows, tile-packed) times w part b (two 16-column blocks t apart). */
static inline __attribute__((always_inline)) void dot8x32(__m512 acc[8][2], const uint16_t *a, const uint16_t *b,
                                                          int64_t nk, int64_t t) {
    for (int64_t kb = 0; kb < nk; kb++)
        for (int kp = 0; kp < 16; kp++) {
            const uint16_t *ak = a + kb * 512 + 2 * kp, *bk = b + kb * 512 + kp * 32;
            __m512bh b0 = (__m512bh)_mm512_loadu_si512(bk), b1 = (__m512bh)_mm512_loadu_si512(bk + t);
            for (int r = 0; r < 8; r++) {
                __m512bh ar = pair(ak + r * 32);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
            }
        }
}

/* y[m.., n0..] (rows ldy apart, clipped to M × N) = the 32 × 32 block of the packed x (its 16-row tiles from xh /
 * xl on) and w (its two 16-column blocks from wh / wl on) in `products` terms (+ bias), 8 rows at a time. */
static void block32_dot(const uint16_t *xh, const uint16_t *xl, const uint16_t *wh, const uint16_t *wl, int64_t nk,
                        int products, float *y, int64_t ldy, int64_t m, int64_t n0, int64_t M, int64_t N,
                        const float *bias) {
    const int64_t t = nk * 512;
    for (int64_t r0 = 0; r0 < 32 && m + r0 < M; r0 += 8) {
        const int64_t xo = (r0 / 16) * t + (r0 % 16) * 32; /* row r0 in its 16-row tile */
        __m512 acc[8][2];
        for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        dot8x32(acc, xh + xo, wh, nk, t);
        if (products >= 2) dot8x32(acc, xl + xo, wh, nk, t);
        if (products >= 3) dot8x32(acc, xh + xo, wl, nk, t);
        for (int h = 0; h < 2; h++) {
            int64_t n = n0 + 16 * h;
            __mmask16 mask = first(N - n);
            __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
            for (int r = 0; r < 8 && m + r0 + r < M; r++)
                _mm512_mask_storeu_ps(y + (m + r0 + r) * ldy + n, mask, _mm512_add_ps(acc[r][h], b));
        }
    }
}

/* This thread's scratch for the packed tiles, kept between calls and grown as needed, in 2 MiB pages: fresh
 * pages each call cost more than the packing, and with 4 KiB pages the tile streams miss the TLB (2 MiB pages:
 * 1.3x on the nemo300 in_proj product). Holds x's tiles and one column chunk of w's: 20 MB for nemo300's
 * largest prefill GEMM (2048 rows, K = 2048). NULL if it cannot be allocated. */
static uint16_t *scratch(size_t bytes) {
    static _Thread_local uint16_t *kept;
    static _Thread_local size_t size;
    const size_t page = (size_t)1 << 21;
    bytes = (bytes + page - 1) & ~(page - 1);
    if (bytes > size) {
        free(kept);
        kept = aligned_alloc(page, bytes);
        size = kept ? bytes : 0;
        if (kept) madvise(kept, bytes, MADV_HUGEPAGE);
    }
    return kept;
}

/* y [M, N] (rows ldy apart) = x [M, K] (rows ldx apart) · W + bias, W float32 (or bfloat16 when w_bf16),
 * K-major (element (k, n) at w[k·ldw + n]) or row-major when w_rows (at w[n·ldw + k]), in `products` bf16 terms
 * (see the top), on AMX tiles where they run, else with AVX512-BF16 dot products. x is packed once, W AMX_NC
 * columns at a time. Returns 0, or -2 when scratch cannot be allocated. */
int nm3_matmul_bf16(const float *x, int64_t M, int64_t ldx, int64_t K, const void *w, int w_bf16, int w_rows,
                    int64_t N, int64_t ldw, const float *bias, float *y, int64_t ldy, int products, int nthreads) {
    const int amx = amx_allowed && nm3_amx_init();
    if (w_bf16 && products > 2) products = 2; /* a bf16 weight's lo part is zero */
    int64_t nk = (K + 31) / 32, Mp = (M + 31) / 32 * 32;
    size_t xs = (size_t)Mp * nk * 32, ws = (size_t)AMX_NC * nk * 32;
    uint16_t *s = scratch((2 * xs + 2 * ws) * sizeof(uint16_t));
    if (!s) return -2;
    uint16_t *xh = s, *xl = s + xs, *wh = s + 2 * xs, *wl = s + 2 * xs + ws;
#pragma omp parallel num_threads(nthreads)
    {
        pack_x(x, M, ldx, K, Mp, nk, xh, xl);
#if defined(NM3_AMX)
        if (amx) configure_tiles();
#endif
        /* rows per pass: their packed hi+lo tiles (rows·K·4 bytes) take at most 1 MiB of the 2 MiB L2 */
        int64_t mrows = ((int64_t)1 << 20) / (nk * 32 * 4) / 32 * 32;
        mrows = mrows < 32 ? 32 : mrows > AMX_MC ? AMX_MC : mrows;
        for (int64_t nc = 0; nc < N; nc += AMX_NC) {
            int64_t cols = N - nc < AMX_NC ? N - nc : AMX_NC, blocks = (cols + 31) / 32;
            int64_t first_col = w_rows ? nc * ldw : nc; /* the chunk's first element */
            const void *wc = w_bf16 ? (const void *)((const uint16_t *)w + first_col)
                                    : (const void *)((const float *)w + first_col);
#pragma omp barrier /* every thread is done with the previous chunk's packed columns */
            if (w_rows)
                pack_w_rows(wc, w_bf16, K, cols, ldw, blocks * 32, nk, wh, wl);
            else
                pack_w(wc, w_bf16, K, cols, ldw, blocks * 32, nk, wh, wl);
            for (int64_t mc = 0; mc < Mp; mc += mrows) {
                int64_t me = mc + mrows < Mp ? mc + mrows : Mp;
#pragma omp for schedule(static) nowait
                for (int64_t nb = 0; nb < blocks; nb++) {
                    const uint16_t *bh = wh + nb * 2 * nk * 512, *bl = wl + nb * 2 * nk * 512;
                    for (int64_t m = mc; m < me; m += 32) {
                        const uint16_t *ah = xh + (m / 16) * nk * 512, *al = xl + (m / 16) * nk * 512;
#if defined(NM3_AMX)
                        if (amx) {
                            block32(ah, al, bh, bl, nk, products);
                            store32(y + nc, ldy, m, nb * 32, M, cols, bias ? bias + nc : NULL);
                            continue;
                        }
#endif
                        block32_dot(ah, al, bh, bl, nk, products, y + nc, ldy, m, nb * 32, M, cols,
                                    bias ? bias + nc : NULL);
                    }
                }
            }
        }
#if defined(NM3_AMX)
        if (amx) _tile_release();
#endif
    }
    return 0;
}

#else /* no AVX512-BF16 in this build: callers use torch's matmul */
int nm3_amx_init(void) { return 0; }
int nm3_bf16_dot_available(void) { return 0; }
void nm3_bf16_allow_amx(int on) { (void)on; }

int nm3_matmul_bf16(const float *x, int64_t M, int64_t ldx, int64_t K, const void *w, int w_bf16, int w_rows,
                    int64_t N, int64_t ldw, const float *bias, float *y, int64_t ldy, int products, int nthreads) {
    (void)x, (void)M, (void)ldx, (void)K, (void)w, (void)w_bf16, (void)w_rows, (void)N, (void)ldw, (void)bias, (void)y;
    (void)ldy;
    (void)products, (void)nthreads;
    return -1;
}
#endif
