/* One pass over a KV chunk as it arrives: its CRC-32C, whether every value is finite, and its
 * rows scattered into the decode's paged pool (see kv_ingest.py, which checks every pointer and
 * size before calling). Reading the chunk once instead of three times (checksum, finiteness, copy)
 * is what makes the receiving side cheap. An fp8 chunk (e4m3, one float32 scale per layer,
 * key/value and kv head: kv_fp8.py) is dequantized into a float32 pool on the way, value = the
 * e4m3 value times its scale, the same float32 product torch computes.
 *
 * The chunk is [layers][2][kv_heads][tokens][head_dim] in C order; a pool layer is
 * [pool rows][kv_heads][head_dim]. The checksum runs as three interleaved streams over the
 * chunk's first, second and last third (one CRC instruction's latency is three of its issue
 * slots) and the three are combined at the end, so it equals the CRC-32C of the bytes in order.
 * Where the CPU multiplies carry-less on 512 bits (VPCLMULQDQ with AVX-512), the checksum folds
 * instead (`fold`): ~4x the CRC instruction's speed, so the pass runs at the speed of its memory
 * traffic (measured: 6.7-7.0 ms for 94 MB where the three streams took 10.7).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#define POLY 0x82F63B78u /* CRC-32C (Castagnoli), reflected */

#if defined(__SSE4_2__)
#include <nmmintrin.h>
static inline uint32_t crc_word(uint32_t crc, uint64_t word) { return (uint32_t)_mm_crc32_u64(crc, word); }
static inline uint32_t crc_byte(uint32_t crc, uint8_t byte) { return _mm_crc32_u8(crc, byte); }
#elif defined(__ARM_FEATURE_CRC32)
#include <arm_acle.h>
static inline uint32_t crc_word(uint32_t crc, uint64_t word) { return __crc32cd(crc, word); }
static inline uint32_t crc_byte(uint32_t crc, uint8_t byte) { return __crc32cb(crc, byte); }
#else
static uint32_t crc_table[256];
__attribute__((constructor)) static void fill_crc_table(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        crc_table[n] = c;
    }
}
static inline uint32_t crc_byte(uint32_t crc, uint8_t byte) { return crc_table[(crc ^ byte) & 0xff] ^ (crc >> 8); }
static inline uint32_t crc_word(uint32_t crc, uint64_t word) {
    for (int k = 0; k < 8; k++) crc = crc_byte(crc, (uint8_t)(word >> (8 * k)));
    return crc;
}
#endif

/* A row into the pool. Streaming stores where they can be used: the pool's rows are written once
 * here and read back by later steps, so pulling each destination line into the cache first (as a
 * plain store does) only doubles the memory traffic of a transfer much larger than the cache. */
static void store_row(uint8_t *target, const uint8_t *row, int64_t bytes) {
#if defined(__AVX__)
    if (((uintptr_t)target & 31) == 0 && (bytes & 31) == 0) {
        for (int64_t at = 0; at < bytes; at += 32)
            _mm256_stream_si256((__m256i *)(target + at), _mm256_loadu_si256((const __m256i *)(row + at)));
        return;
    }
#elif defined(__SSE2__)
    if (((uintptr_t)target & 15) == 0 && (bytes & 15) == 0) {
        for (int64_t at = 0; at < bytes; at += 16)
            _mm_stream_si128((__m128i *)(target + at), _mm_loadu_si128((const __m128i *)(row + at)));
        return;
    }
#endif
    memcpy(target, row, (size_t)bytes);
}

enum { KIND_FLOAT32 = 0, KIND_FLOAT16 = 1, KIND_BFLOAT16 = 2, KIND_FP8_TO_FLOAT32 = 3 };
#define MAX_FP8_ROW 1024 /* head_dim of an fp8 chunk (checked by the caller) */

static float fp8_values[256]; /* float8 e4m3fn: no infinity; S.1111.111 is NaN */
__attribute__((constructor)) static void fill_fp8_values(void) {
    for (int code = 0; code < 256; code++) {
        int exponent = (code >> 3) & 15, mantissa = code & 7;
        float magnitude = exponent == 0 ? (float)mantissa / 512.0f /* subnormal: m/8 * 2^-6 */
                                        : (1.0f + (float)mantissa / 8.0f) * __builtin_ldexpf(1.0f, exponent - 7);
        fp8_values[code] = code & 128 ? -magnitude : magnitude;
        if (exponent == 15 && mantissa == 7) { /* NaN with the payload torch gives it, sign kept */
            uint32_t bits = (code & 128 ? 0x80000000u : 0u) | 0x7ff00000u;
            memcpy(&fp8_values[code], &bits, sizeof bits);
        }
    }
}

/* Polynomial arithmetic modulo the CRC's, in its reflected bit order (zlib's crc32_combine_op):
 * appending n bytes to a message multiplies its CRC by x^(8n). A table of x^(2^k) makes a shift by
 * n bytes a few multiplications, ~1 us, where zlib's older matrix method took ~10. */
static uint32_t multiply_mod(uint32_t a, uint32_t b) {
    uint32_t mask = 1u << 31, product = 0;
    if (a == 0) return 0;
    for (;;) {
        if (a & mask) {
            product ^= b;
            if ((a & (mask - 1)) == 0) break;
        }
        mask >>= 1;
        b = b & 1 ? (b >> 1) ^ POLY : b >> 1;
    }
    return product;
}

static uint32_t x_to_2_to_the[32]; /* x^(2^k) modulo the polynomial */
static void fill_fold_keys(void);
__attribute__((constructor)) static void fill_powers(void) {
    uint32_t power = 1u << 30; /* x^1 */
    x_to_2_to_the[0] = power;
    for (int k = 1; k < 32; k++) x_to_2_to_the[k] = power = multiply_mod(power, power);
    fill_fold_keys();
}

/* CRC-32C of A followed by B, from CRC-32C(A), CRC-32C(B) and B's length. */
static inline uint32_t crc_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b) {
    uint32_t shift = 1u << 31; /* x^0 */
    for (unsigned k = 3; length_b; length_b >>= 1, k++) /* x^(8 * length_b) */
        if (length_b & 1) shift = multiply_mod(x_to_2_to_the[k & 31], shift);
    return multiply_mod(shift, crc_a) ^ crc_b;
}

static inline uint64_t load_word(const uint8_t *at) {
    uint64_t word;
    memcpy(&word, at, sizeof word);
    return word;
}

/* The running (not yet inverted) CRC of three rows at once. */
static inline void crc_rows3(uint32_t *crc, const uint8_t *a, const uint8_t *b, const uint8_t *c, int64_t bytes) {
    uint32_t x = crc[0], y = crc[1], z = crc[2];
    int64_t at = 0;
    for (; at + 8 <= bytes; at += 8) {
        x = crc_word(x, load_word(a + at));
        y = crc_word(y, load_word(b + at));
        z = crc_word(z, load_word(c + at));
    }
    for (; at < bytes; at++) {
        x = crc_byte(x, a[at]);
        y = crc_byte(y, b[at]);
        z = crc_byte(z, c[at]);
    }
    crc[0] = x, crc[1] = y, crc[2] = z;
}

static uint32_t crc_row(uint32_t crc, const uint8_t *row, int64_t bytes) {
    int64_t at = 0;
    for (; at + 8 <= bytes; at += 8) crc = crc_word(crc, load_word(row + at));
    for (; at < bytes; at++) crc = crc_byte(crc, row[at]);
    return crc;
}

/* The largest magnitude bit pattern of a row (sign cleared): a value is NaN or infinite exactly
 * when its pattern reaches the exponent's all-ones. Plain loops: the compiler vectorizes them. */
static uint32_t magnitude32(const uint8_t *row, int64_t bytes) {
    uint32_t most = 0;
    for (int64_t at = 0; at + 4 <= bytes; at += 4) {
        uint32_t word;
        memcpy(&word, row + at, sizeof word);
        word &= 0x7fffffffu;
        most = word > most ? word : most;
    }
    return most;
}

static uint32_t magnitude16(const uint8_t *row, int64_t bytes) {
    uint16_t most = 0;
    for (int64_t at = 0; at + 2 <= bytes; at += 2) {
        uint16_t word;
        memcpy(&word, row + at, sizeof word);
        word &= 0x7fffu;
        most = word > most ? word : most;
    }
    return most;
}

typedef struct Chunk Chunk;
static inline int64_t place_rows(Chunk *chunk, int64_t from, int64_t to);

#if defined(__AVX512F__) && defined(__VPCLMULQDQ__) && defined(__PCLMUL__) && defined(__SSE4_2__) && \
    !defined(KV_INGEST_NO_FOLD)
#define FOLD_CRC 1
/* CRC-32C by folding (Intel, "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ"):
 * four 512-bit accumulators take 256 bytes a step. Each 128-bit lane V is multiplied by x^D
 * modulo the polynomial, D the distance to the bytes it is added to: in the reflected bit order
 * a lane is x^64 * low + high, and a carry-less product carries one more factor x, so the keys
 * are x^(D+63) for the low half and x^(D-1) for the high one (each as the top 32 bits of its
 * half). At the end the accumulators fold into one 128-bit value congruent to the whole message,
 * whose CRC the CRC instruction takes from a zero state. */
#define FOLD_BYTES 256
/* x^n modulo the polynomial. */
static uint32_t x_power(uint64_t n) {
    uint32_t result = 1u << 31; /* x^0 */
    for (unsigned k = 0; n; n >>= 1, k++)
        if (n & 1) result = multiply_mod(x_to_2_to_the[k & 31], result);
    return result;
}

static uint64_t fold_keys[3][2]; /* D = 2048 (a step), 512 (between accumulators), 128 (lanes) */
static void fill_fold_keys(void) {
    const uint64_t distances[3] = {2048, 512, 128};
    for (int k = 0; k < 3; k++) {
        fold_keys[k][0] = (uint64_t)x_power(distances[k] + 63) << 32;
        fold_keys[k][1] = (uint64_t)x_power(distances[k] - 1) << 32;
    }
}

static inline __m512i times_key(__m512i lanes, __m512i key) {
    return _mm512_xor_si512(_mm512_clmulepi64_epi128(lanes, key, 0x00), _mm512_clmulepi64_epi128(lanes, key, 0x11));
}

static inline __m512i key512(int which) { return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)fold_keys[which])); }

/* The running CRC of `state` followed by the first `bytes` (a multiple of FOLD_BYTES, > 0) of
 * `at` (the chunk's source); each row whose bytes have been read is placed (place_row) at once. */
static uint32_t fold(uint32_t state, const uint8_t *at, int64_t bytes, Chunk *chunk, int64_t row_bytes) {
    __m512i lane[4], step = key512(0);
    for (int k = 0; k < 4; k++) lane[k] = _mm512_loadu_si512(at + 64 * k);
    lane[0] = _mm512_mask_xor_epi32(lane[0], 1, lane[0], _mm512_set1_epi32((int)state)); /* the state xors the first 4 bytes */
    int64_t placed = 0;
    for (int64_t done = FOLD_BYTES; done < bytes; done += FOLD_BYTES) {
        for (int k = 0; k < 4; k++)
            lane[k] = _mm512_xor_si512(times_key(lane[k], step), _mm512_loadu_si512(at + done + 64 * k));
        placed = place_rows(chunk, placed, done / row_bytes); /* rows just read, from L1: 20% faster than 4 KB later */
    }
    place_rows(chunk, placed, bytes / row_bytes);
    __m512i apart = key512(1);
    for (int k = 1; k < 4; k++) lane[k] = _mm512_xor_si512(times_key(lane[k - 1], apart), lane[k]);
    __m128i lanes = _mm_loadu_si128((const __m128i *)fold_keys[2]), value = _mm512_extracti32x4_epi32(lane[3], 0);
    __m128i parts[3] = {_mm512_extracti32x4_epi32(lane[3], 1), _mm512_extracti32x4_epi32(lane[3], 2),
                        _mm512_extracti32x4_epi32(lane[3], 3)};
    for (int k = 0; k < 3; k++)
        value = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(value, lanes, 0x00),
                                            _mm_clmulepi64_si128(value, lanes, 0x11)), parts[k]);
    uint32_t crc = (uint32_t)_mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(value));
    return (uint32_t)_mm_crc32_u64(crc, (uint64_t)_mm_extract_epi64(value, 1));
}
#else
static void fill_fold_keys(void) {}
#endif

/* Whether this build folds its checksum (1) or runs the CRC instruction or table (0). */
int kv_ingest_folds(void) {
#if defined(FOLD_CRC)
    return 1;
#else
    return 0;
#endif
}

struct Chunk {
    const uint8_t *source;
    int64_t heads, tokens, head_dim, row_bytes, target_row_bytes, row_stride; /* row_bytes: in the chunk */
    uint8_t *const *pools; /* per chunk layer: keys, values */
    const int64_t *rows;   /* per token: its pool row, or -1 (not written) */
    const float *scales;   /* fp8: per plane (layer, key/value, kv head) */
    int kind, check_finite;
    uint32_t magnitude;
};

static void fp8_row(float *values, const uint8_t *row, int64_t count, float scale) {
    for (int64_t at = 0; at < count; at++) values[at] = fp8_values[row[at]] * scale;
}

/* Row `index` of the chunk: copied (fp8: dequantized) into the pool unless skipped, and its
 * magnitude taken. */
static void place_row(Chunk *chunk, int64_t index) {
    int64_t plane = index / chunk->tokens, token = index % chunk->tokens;
    const uint8_t *row = chunk->source + index * chunk->row_bytes;
    float values[MAX_FP8_ROW] __attribute__((aligned(32)));
    if (chunk->kind == KIND_FP8_TO_FLOAT32) {
        fp8_row(values, row, chunk->head_dim, chunk->scales[plane]);
        row = (const uint8_t *)values;
    }
    if (chunk->check_finite) {
        uint32_t most = chunk->kind == KIND_FLOAT16 || chunk->kind == KIND_BFLOAT16
                            ? magnitude16(row, chunk->target_row_bytes)
                            : magnitude32(row, chunk->target_row_bytes);
        chunk->magnitude = most > chunk->magnitude ? most : chunk->magnitude;
    }
    int64_t pool_row = chunk->rows[token];
    if (pool_row < 0) return;
    uint8_t *target = chunk->pools[plane / chunk->heads] + pool_row * chunk->row_stride +
                      (plane % chunk->heads) * chunk->target_row_bytes;
    store_row(target, row, chunk->target_row_bytes);
}

/* Rows [from, to) of the chunk (place_row); returns `to`. */
static inline int64_t place_rows(Chunk *chunk, int64_t from, int64_t to) {
    for (int64_t index = from; index < to; index++) place_row(chunk, index);
    return to;
}

static uint32_t first_infinite(int kind) {
    return kind == KIND_FLOAT16 ? 0x7c00u : kind == KIND_BFLOAT16 ? 0x7f80u : 0x7f800000u;
}

static int64_t element_bytes(int kind) {
    return kind == KIND_FLOAT32 ? 4 : kind == KIND_FP8_TO_FLOAT32 ? 1 : 2;
}

/* The chunk [layers][2][heads][tokens][head_dim] into the pools (keys and values of each of its
 * layers, pool rows of heads * head_dim elements). Returns 0 when every value is finite (or
 * check_finite is 0), 1 when one is not, -1 for a kind or head_dim it does not take; *crc_out
 * receives the CRC-32C of the bytes before it (whose CRC-32C is crc_in) followed by the chunk's,
 * either way. */
int kv_ingest(const uint8_t *source, int64_t layers, int64_t heads, int64_t tokens, int64_t head_dim,
              uint8_t *const *pools, const int64_t *rows, const float *scales, int kind, int check_finite,
              uint32_t crc_in, uint32_t *crc_out) {
    if (kind < KIND_FLOAT32 || kind > KIND_FP8_TO_FLOAT32 || head_dim <= 0) return -1;
    if (kind == KIND_FP8_TO_FLOAT32 && (head_dim > MAX_FP8_ROW || scales == NULL)) return -1;
    int64_t row_bytes = head_dim * element_bytes(kind);
    int64_t target_row_bytes = head_dim * (kind == KIND_FP8_TO_FLOAT32 ? 4 : element_bytes(kind));
    Chunk chunk = {source, heads, tokens, head_dim, row_bytes, target_row_bytes, heads * target_row_bytes,
                   pools, rows, scales, kind, check_finite, 0};
    int64_t total = layers * 2 * heads * tokens;
#if defined(FOLD_CRC)
    int64_t bytes = total * row_bytes, folded = bytes / FOLD_BYTES * FOLD_BYTES;
    uint32_t state = ~crc_in; /* the running CRC of the bytes before */
    if (folded > 0) state = fold(state, source, folded, &chunk, row_bytes);
    *crc_out = ~crc_row(state, source + folded, bytes - folded);
    place_rows(&chunk, folded / row_bytes, total);
#else
    int64_t third = total / 3;
    uint32_t crc[3] = {0xffffffffu, 0xffffffffu, 0xffffffffu};
    for (int64_t index = 0; index < third; index++) {
        crc_rows3(crc, source + index * row_bytes, source + (third + index) * row_bytes,
                  source + (2 * third + index) * row_bytes, row_bytes);
        place_row(&chunk, index);
        place_row(&chunk, third + index);
        place_row(&chunk, 2 * third + index);
    }
    for (int64_t index = 3 * third; index < total; index++) { /* the last third's longer tail */
        crc[2] = crc_row(crc[2], source + index * row_bytes, row_bytes);
        place_row(&chunk, index);
    }
    uint64_t third_bytes = (uint64_t)(third * row_bytes), last_bytes = (uint64_t)((total - 2 * third) * row_bytes);
    uint32_t combined = crc_combine(~crc[0], ~crc[1], third_bytes);
    combined = crc_combine(combined, ~crc[2], last_bytes);
    *crc_out = crc_combine(crc_in, combined, third_bytes * 2 + last_bytes);
#endif
#if defined(__SSE2__)
    _mm_sfence(); /* the streamed rows are in memory before the caller reports the chunk stored */
#endif
    return check_finite && chunk.magnitude >= first_infinite(kind);
}
