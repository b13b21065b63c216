/* A decode step's matrix products for a few rows, out[m][n] = sum_k x[m][k] * w[n][k], reading
 * each weight once from memory (panel_products.py says why and where it is used).
 *
 * The weight is stored in panels of NP output columns, each laid out k by k
 * (panels[p][k][c] = w[p * NP + c][k], the last panel zero-padded), so one panel streams through
 * memory in order and the next panels are prefetched while this one is computed. Up to MR input
 * rows at a time: each k broadcasts an input value and adds its products with the panel's NP
 * weights into 2 x MR vector sums (an outer product: no sum across lanes at the end). The
 * panel, ~37 KB for 576 inputs, is read from cache again for each further MR rows. */

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8 /* AVX2, or what the compiler makes of 32-byte vectors elsewhere */
#endif
#define NP (2 * LANES) /* output columns a panel holds */
#define MR 6           /* input rows computed together: 2 x MR sums + 2 weights fit AVX2's 16 registers */
#ifndef PREFETCH_PANELS
#define PREFETCH_PANELS 2 /* how far ahead (in panels) the weights are prefetched */
#endif

typedef float vec __attribute__((vector_size(LANES * 4)));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* rows x[0..rows) (row stride ldx) times k values of one panel into out (row stride ldo), its first
 * `columns`: stored, or added to what out holds (`add`: the sums of a later block of k, as a BLAS
 * that splits k adds them) */
static inline __attribute__((always_inline)) void rows_block(const float *x, int64_t ldx, const float *panel,
                                                             const float *ahead, float *out, int64_t k,
                                                             int64_t ldo, int rows, int columns, int add) {
    vec sums[MR][2];
    for (int r = 0; r < MR; r++) sums[r][0] = sums[r][1] = (vec){0};
    for (int64_t i = 0; i < k; i++) {
        if (ahead) { /* the panel PREFETCH_PANELS on, same offset: each 64-byte line of this k's NP weights */
            __builtin_prefetch(ahead + i * NP, 0, 1);
            if (NP > 16) __builtin_prefetch(ahead + i * NP + 16, 0, 1);
        }
        vec w0 = load(panel + i * NP), w1 = load(panel + i * NP + LANES);
        for (int r = 0; r < MR; r++)
            if (r < rows) {
                const float xr = x[r * ldx + i]; /* broadcast by the vector-scalar product */
                sums[r][0] += w0 * xr;
                sums[r][1] += w1 * xr;
            }
    }
    for (int r = 0; r < rows; r++) {
        float *o = out + r * ldo;
        if (columns == NP) {
            store(o, add ? load(o) + sums[r][0] : sums[r][0]);
            store(o + LANES, add ? load(o + LANES) + sums[r][1] : sums[r][1]);
        } else {
            float full[NP];
            store(full, sums[r][0]);
            store(full + LANES, sums[r][1]);
            for (int c = 0; c < columns; c++) o[c] = add ? o[c] + full[c] : full[c];
        }
    }
}

/* rows x[0..rows) times one panel, k split in blocks of kc */
static inline __attribute__((always_inline)) void rows_blocks(const float *x, const float *panel, const float *ahead,
                                                              float *out, int64_t k, int64_t kc, int64_t ldo,
                                                              int rows, int columns) {
    for (int64_t k0 = 0; k0 < k; k0 += kc) {
        const int64_t length = k - k0 < kc ? k - k0 : kc;
        rows_block(x + k0, k, panel + k0 * NP, ahead ? ahead + k0 * NP : 0, out, length, ldo, rows, columns,
                   k0 > 0);
    }
}

int panel_width(void) { return NP; }

/* Columns [first, end) of out[m][n] (rows m, n contiguous) for x[m][k] and the panels of a weight
 * with n rows and k columns, each sum taken over k in blocks of kc (kc >= k: one sum in order,
 * from the first k on; otherwise each block's sum in order, and the blocks' sums added in order);
 * -1 (computing nothing) for a negative size, a kc below 1, or a range that does not start and
 * end on a panel's edge (or n) or lies outside [0, n). Each output is summed the same whatever range it is computed in:
 * the decode's helper threads (exact_gemv.c) take ranges of a product's panels. */
int panel_gemm_columns(const float *x, const float *panels, float *out, int64_t m, int64_t n, int64_t k,
                       int64_t kc, int64_t first, int64_t end) {
    if (m < 0 || n < 0 || k < 0 || kc < 1 || first < 0 || first % NP || end < first || end > n ||
        (end % NP && end != n))
        return -1;
    if (m == 0 || first == end) return 0; /* nothing to write (and empty tensors may have no address) */
    if (k == 0) {
        for (int64_t row = 0; row < m; row++) memset(out + row * n + first, 0, (size_t)(end - first) * sizeof(float));
        return 0;
    }
    const int64_t last = (end + NP - 1) / NP, count = (n + NP - 1) / NP;
    for (int64_t p = first / NP; p < last; p++) {
        const float *panel = panels + p * k * NP;
        /* past the range too: a thread's ranges follow one another (exact_gemv.c's parts) */
        const float *ahead = p + PREFETCH_PANELS < count ? panel + PREFETCH_PANELS * k * NP : 0;
        const int columns = n - p * NP < NP ? (int)(n - p * NP) : NP;
        for (int64_t row = 0; row < m; row += MR) {
            const int rows = m - row < MR ? (int)(m - row) : MR;
            const float *hint = row == 0 ? ahead : 0; /* once per panel */
            float *o = out + row * n + p * NP;
            const float *xs = x + row * k;
            switch (rows) { /* a constant row count each: the compiler keeps the sums in registers */
            case MR: rows_blocks(xs, panel, hint, o, k, kc, n, MR, columns); break;
            case 5: rows_blocks(xs, panel, hint, o, k, kc, n, 5, columns); break;
            case 4: rows_blocks(xs, panel, hint, o, k, kc, n, 4, columns); break;
            case 3: rows_blocks(xs, panel, hint, o, k, kc, n, 3, columns); break;
            case 2: rows_blocks(xs, panel, hint, o, k, kc, n, 2, columns); break;
            default: rows_blocks(xs, panel, hint, o, k, kc, n, 1, columns); break;
            }
        }
    }
    return 0;
}

/* All of out[m][n]: panel_gemm_columns over [0, n). */
int panel_gemm_blocked(const float *x, const float *panels, float *out, int64_t m, int64_t n, int64_t k,
                       int64_t kc) {
    return n < 0 ? -1 : panel_gemm_columns(x, panels, out, m, n, k, kc, 0, n);
}
