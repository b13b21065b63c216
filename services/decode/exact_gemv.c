/* A batch of one's matrix-vector products, out[n] = sum_k w[n, k] * x[k], summed in the order
 * of the BLAS that torch's F.linear calls, so that the result is bit-identical to it, but read
 * at the speed of memory (exact_gemv.py says why and how that order was found and is checked).
 *
 * The order, per row (MKL's path on AMD EPYC, for rows 16 bytes apart: another stride starts the
 * sums elsewhere, and is refused), with a = the row's address mod 16 bytes:
 *   every product p_k rounded on its own (no fused multiply-add);
 *   the first q = 4 - a / 4 products summed in order: s0 = ((p_0 + p_1) + ...) + p_(q-1);
 *   then from k = q on (16-byte aligned), four running sums in index order,
 *     s_((k - q) mod 4) += p_k, over the largest multiple of 4 columns;
 *   out = (s0 + s2) + (s1 + s3), then the remaining columns' products added in order.
 * It computes rows in fours that way; the last n mod 4 rows of a matrix it sums otherwise, so those
 * shapes are refused here.
 * Built with -ffp-contract=off (exact_gemv.py) so the compiler never fuses a product into its sum.
 * ROWS rows run side by side (independent sums hide the adds' latency) while the next rows are
 * prefetched: one core reads the weights at ~35 GB/s where the BLAS's path read ~16 (on one
 * machine; on another 23 GB/s against 11.5, where the sequential-read ceiling was 25). */

#include <stdint.h>
#include <string.h>

#define ROWS 8           /* rows summed side by side */
#define PREFETCH_ROWS 16 /* how far ahead (in rows) the weights are prefetched */
#ifndef PREFETCH_LOCALITY /* __builtin_prefetch's: 0 (NTA) or 1 (T2); exact_gemv.py times both */
#define PREFETCH_LOCALITY 1
#endif

typedef float v4 __attribute__((vector_size(16)));

static inline v4 load4(const float *p) {
    v4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void rows_block(const float *w, const float *x, float *out,
                                                             int64_t k, int64_t ldw, int64_t q, int rows) {
    const int64_t body_end = q + (k - q) / 4 * 4;
    v4 sums[ROWS];
    for (int r = 0; r < rows; r++) {
        const float *row = w + r * ldw;
        float first = row[0] * x[0];
        for (int64_t i = 1; i < q; i++) first = first + row[i] * x[i];
        sums[r] = (v4){first, 0.0f, 0.0f, 0.0f};
    }
    for (int64_t i = q; i < body_end; i += 4) {
        if ((i - q) % 16 == 0) /* once per 64 bytes of each row; a prefetch past the end never faults */
            for (int r = 0; r < rows; r++) __builtin_prefetch(w + (r + PREFETCH_ROWS) * ldw + i, 0, PREFETCH_LOCALITY);
        v4 xs = load4(x + i);
        for (int r = 0; r < rows; r++) sums[r] = sums[r] + load4(w + r * ldw + i) * xs;
    }
    for (int r = 0; r < rows; r++) {
        const float *row = w + r * ldw;
        float total = (sums[r][0] + sums[r][2]) + (sums[r][1] + sums[r][3]);
        for (int64_t i = body_end; i < k; i++) total = total + row[i] * x[i];
        out[r] = total;
    }
}

/* out[0..n) for the row-major weights w[n][ldw] (their first k columns) and x[k]; -1 (computing
 * nothing) for n or ldw not a multiple of 4, k < 8 or rows not aligned to a float. */
int exact_gemv(const float *w, const float *x, float *out, int64_t n, int64_t k, int64_t ldw) {
    if (n < 0 || n % 4 || k < 8 || ldw < k || ldw % 4 || (uintptr_t)w % sizeof(float)) return -1;
    const int64_t q = 4 - (int64_t)((uintptr_t)w % 16) / 4; /* every row's, rows being 16 bytes apart */
    int64_t i = 0;
    for (; i + ROWS <= n; i += ROWS) rows_block(w + i * ldw, x, out + i, k, ldw, q, ROWS);
    for (; i < n; i++) rows_block(w + i * ldw, x, out + i, k, ldw, q, 1);
    return 0;
}
