/* Decode attention over the paged KV pool, one query token per sequence (float32).

   For every sequence b and query head h (kv head h / group, grouped-query attention):
     out[b, h] = softmax(scale * q[b, h] . K[t]) . V[t] over its tokens t < lengths[b],
   token t lying in row t % block_size of block tables[b * width + t / block_size] of the pool,
   whose layout is [num_blocks, block_size, kv_heads, HEAD_DIM] (services/decode/pool.py). Keys and
   values are read where they are: nothing is gathered. Scores are kept per query head, the softmax
   is exact (max subtracted, exp by Cephes' polynomial, within 2 ulp), sums in float32.

   Built by services/decode/native_attention.py with the C compiler of the machine it runs on
   (-O3 -march=native -DHEAD_DIM=...), and called through ctypes (which releases the GIL).
   Returns 0, or a negative code for inputs it refuses (nothing is read outside the pool):
     -1 no memory, -2 a length outside [1, width * block_size], -3 a block outside the pool,
     -4 a shape it does not support. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<the model's head dim>"
#endif
#define LANES 8
#if HEAD_DIM % LANES != 0
#error "HEAD_DIM must be a multiple of 8"
#endif
#define VECS (HEAD_DIM / LANES)
#define MAX_GROUP 16

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
static inline vf choose(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline float total(vf v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* exp(x) for x <= 0, lane by lane (Cephes' expf polynomial, within 2 ulp); NaN stays NaN. */
static inline vf exp_nonpositive(vf x) {
    x = choose(x < splat(-87.0f), splat(-87.0f), x);
    vf n = x * splat(1.44269504088896341f) + splat(0.5f);
    vi whole = __builtin_convertvector(n, vi);  /* truncates toward zero */
    whole -= (vi)(__builtin_convertvector(whole, vf) > n) & 1;  /* floor */
    n = __builtin_convertvector(whole, vf);
    const vf r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    const vf y = p * r * r + r + splat(1.0f);
    vi bits = (whole + 127) << 23;
    vf scale; memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static void attend_group(const float *restrict query, int64_t group, const float *restrict pool_k,
                         const float *restrict pool_v, const int64_t *table, int64_t length, int64_t block_size,
                         int64_t row, int64_t block, float scale, float *restrict scores, int64_t stride,
                         float *restrict output) {
    vf q[MAX_GROUP][VECS];
    for (int64_t g = 0; g < group; g++)
        for (int j = 0; j < VECS; j++) q[g][j] = load(query + g * HEAD_DIM + j * LANES) * splat(scale);
    float top[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) top[g] = -INFINITY;
    for (int64_t t = 0, i = 0; t < length; i++) {
        const float *keys = pool_k + table[i] * block;
        const int64_t rows = length - t < block_size ? length - t : block_size;
        for (int64_t r = 0; r < rows; r++, t++) {
            vf k[VECS];
            for (int j = 0; j < VECS; j++) k[j] = load(keys + r * row + j * LANES);
            for (int64_t g = 0; g < group; g++) {
                vf acc = q[g][0] * k[0];
                for (int j = 1; j < VECS; j++) acc += q[g][j] * k[j];
                const float s = total(acc);
                scores[g * stride + t] = s;
                top[g] = s > top[g] ? s : top[g];
            }
        }
    }
    float inverse[MAX_GROUP];
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * stride;
        vf sum = splat(0.0f);
        int64_t t = 0;
        for (; t + LANES <= length; t += LANES) {
            const vf e = exp_nonpositive(load(s + t) - splat(top[g]));
            store(s + t, e);
            sum += e;
        }
        float rest = total(sum);
        for (; t < length; t++) {
            vf one = splat(0.0f); one[0] = s[t] - top[g];
            s[t] = exp_nonpositive(one)[0];
            rest += s[t];
        }
        inverse[g] = 1.0f / rest;
    }
    for (int64_t g = 0; g < group; g++) {
        vf acc[VECS];
        for (int j = 0; j < VECS; j++) acc[j] = splat(0.0f);
        const float *s = scores + g * stride;
        for (int64_t t = 0, i = 0; t < length; i++) {
            const float *values = pool_v + table[i] * block;
            const int64_t rows = length - t < block_size ? length - t : block_size;
            for (int64_t r = 0; r < rows; r++, t++) {
                const vf p = splat(s[t]);
                for (int j = 0; j < VECS; j++) acc[j] += p * load(values + r * row + j * LANES);
            }
        }
        for (int j = 0; j < VECS; j++) store(output + g * HEAD_DIM + j * LANES, acc[j] * splat(inverse[g]));
    }
}

int paged_decode_attention(const float *q, const float *pool_k, const float *pool_v, const int64_t *tables,
                           const int64_t *lengths, float *out, int64_t batch, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t block_size, int64_t width, int64_t num_blocks, float scale) {
    if (head_dim != HEAD_DIM || kv_heads < 1 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP
        || block_size < 1 || width < 1) return -4;
    const int64_t group = heads / kv_heads, row = kv_heads * HEAD_DIM, block = block_size * row;
    const int64_t capacity = width * block_size;
    float *scores = malloc(sizeof(float) * group * capacity);
    if (scores == NULL) return -1;
    int status = 0;
    for (int64_t b = 0; b < batch && status == 0; b++) {
        const int64_t length = lengths[b], *table = tables + b * width;
        if (length < 1 || length > capacity) { status = -2; break; }
        for (int64_t i = 0; i < (length + block_size - 1) / block_size; i++)
            if (table[i] < 0 || table[i] >= num_blocks) status = -3;
        for (int64_t h = 0; h < kv_heads && status == 0; h++)
            attend_group(q + (b * heads + h * group) * HEAD_DIM, group, pool_k + h * HEAD_DIM, pool_v + h * HEAD_DIM,
                         table, length, block_size, row, block, scale, scores, capacity,
                         out + (b * heads + h * group) * HEAD_DIM);
    }
    free(scores);
    return status;
}
