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

#define _GNU_SOURCE /* CPU_SET, pthread_attr_setaffinity_np: the helpers' pinning (below) */
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

/* ---- Idle cores helping: the same sums, split between threads ----
 *
 * One core cannot read memory as fast as two (13 against 23 GB/s on a 2-core Zen box), nor
 * multiply as fast (a batched step's products are bound by arithmetic on some CPUs), and a decode
 * worker leaves the other cores of the machine idle between prompts. Helper threads, pinned to
 * those cores at SCHED_IDLE (they run only when nothing else wants the core: a prefill working
 * there takes it back at once), claim blocks of output columns of their parts of a product while
 * the caller computes its own part, then what is left of theirs. Two kinds of product: a batch of
 * one's (exact_gemv above: a block is BLOCK_ROWS of the weight's rows, one output each) and a
 * batched step's (panel_gemm.c's panel_gemm_columns, called through a pointer: a block is
 * `block_columns` output columns of every input row). Each output is summed by the same code
 * whichever thread takes it, so the bits are the single thread's.
 *
 * The caller never waits for a helper: a helper writes into its own scratch and marks the block
 * done; the caller, once the counters run out, copies the done blocks and computes itself every
 * block a helper claimed but has not finished (a helper preempted mid-block loses the race and its
 * late result is dropped). Helpers never write the caller's output, read only the weights (which
 * outlive the pool) and the pool's own copies of the job, and tag every claim with the job's
 * generation, so a helper still busy with an old job cannot mark a block of a new one. */

#if defined(__linux__) /* futexes, pinning and SCHED_IDLE; elsewhere no helpers start (the stubs at the end) */
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCK_ROWS 32         /* a batch of one's rows per claim: a multiple of ROWS */
#define MAX_HELPERS 8
#define SPIN_NS 2000000       /* a helper spins this long after a job before it sleeps on the futex */
#define WINDOW 64  /* products over which the helpers' share is judged (a step has ~120-200) */
#define REST 512   /* products the caller then computes alone if it was too small */
#define MIN_BLOCK_COLUMNS 8   /* the narrowest block a pool's state array is sized for */
#ifndef HELPER_POLICY
#define HELPER_POLICY SCHED_IDLE /* tests build one with SCHED_OTHER: helpers preempted mid-block all the time */
#endif
enum { CLAIMED = 1, DONE = 2, CALLER = 3 }; /* a block's state: generation << 8 | helper << 2 | this */

/* panel_gemm.c's panel_gemm_columns */
typedef int (*panel_columns)(const float *x, const float *panels, float *out, int64_t m, int64_t n, int64_t k,
                             int64_t kc, int64_t first, int64_t end);

/* One product: out[m][n] (rows n apart) from the weights w and the input rows x[m][k]. */
typedef struct {
    const float *w;       /* a batch of one's weights, or a weight's panels */
    panel_columns panels; /* NULL: a batch of one's product (m = 1) */
    int64_t m, n, k, ldw, q, kc, block_columns, blocks;
} job;

/* The rows split into one contiguous part per thread (the caller's first), each read in order
 * as one stream; the caller takes what is left of the helpers' parts once its own is done. */
typedef struct {
    _Alignas(64) _Atomic int64_t value; /* the part's next block: one cache line per part */
    _Atomic int64_t helped;             /* blocks of it its helper computed and the caller copied */
} counter;

typedef struct shared_gemv {
    _Atomic uint64_t generation; /* odd while the caller writes a job's fields (a sequence lock) */
    _Atomic uint32_t wake;       /* the futex word sleeping helpers wait on */
    counter next[MAX_HELPERS + 1]; /* per part (the caller's first), its next unclaimed block */
    _Atomic int sleepers, stop;
    _Atomic int started, refused; /* helpers running, and whether one was refused SCHED_IDLE */
    _Atomic int busy;            /* a caller's product is running (a second caller computes alone) */
    job job;                     /* read by helpers under the sequence lock */
    float *x;                    /* the job's input rows, copied (max_m * max_k values) */
    _Atomic uint64_t *state;     /* one per block */
    float *scratch;              /* max_m * max_n values per helper */
    int64_t max_m, max_n, max_k;
    int helpers;
    _Atomic int64_t taken, rests; /* blocks of the helpers' parts the caller computed itself; `judge`'s rests */
    int64_t window_products, window_blocks, window_copied, resting; /* `judge`'s, the caller's */
    int failed;                  /* the caller's compute of the current job failed (a kernel refused it) */
    pthread_t threads[MAX_HELPERS];
    int cores[MAX_HELPERS];
} shared_gemv;

typedef struct { shared_gemv *pool; int index; } helper_start;

void shared_gemv_stop(shared_gemv *pool);

static void rows_range(const float *w, const float *x, float *out, int64_t first, int64_t end, int64_t k,
                       int64_t ldw, int64_t q) {
    int64_t i = first;
    for (; i + ROWS <= end; i += ROWS) rows_block(w + i * ldw, x, out + i, k, ldw, q, ROWS);
    for (; i < end; i++) rows_block(w + i * ldw, x, out + i, k, ldw, q, 1);
}

/* Block `block` of the job's output, computed from x into dest (out's layout); nonzero where the
 * panel kernel refused it (never for a job shared_panels_run checked). */
static int compute(const job *j, const float *x, float *dest, int64_t block) {
    int64_t first = block * j->block_columns, end = first + j->block_columns < j->n ? first + j->block_columns : j->n;
    if (j->panels) return j->panels(x, j->w, dest, j->m, j->n, j->k, j->kc, first, end);
    rows_range(j->w, x, dest, first, end, j->k, j->ldw, j->q);
    return 0;
}

static int64_t part_start(int64_t blocks, int parts, int part) { return blocks * part / parts; }

/* The next unclaimed block of `part`, or -1 once it has none. */
static int64_t claim(shared_gemv *pool, int64_t blocks, int part) {
    int64_t end = part_start(blocks, pool->helpers + 1, part + 1);
    int64_t block = part_start(blocks, pool->helpers + 1, part) + atomic_fetch_add(&pool->next[part].value, 1);
    return block < end ? block : -1;
}

static uint64_t tag(uint64_t generation, int helper, int status) {
    return generation << 8 | (uint64_t)helper << 2 | (uint64_t)status;
}

static long futex(_Atomic uint32_t *word, int op, uint32_t value) {
    return syscall(SYS_futex, (uint32_t *)word, op, value, NULL, NULL, 0);
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    sched_yield();
#endif
}

static int64_t elapsed_ns(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000000000LL + (now.tv_nsec - since->tv_nsec);
}

/* The next job's (even) generation after `seen`, or 0 once the pool stops. */
static uint64_t await_job(shared_gemv *pool, uint64_t seen) {
    struct timespec since;
    clock_gettime(CLOCK_MONOTONIC, &since);
    for (unsigned spins = 1;; spins++) {
        if (atomic_load(&pool->stop)) return 0;
        uint64_t generation = atomic_load(&pool->generation);
        if (!(generation & 1) && generation != seen) return generation;
        if (spins % 256 || elapsed_ns(&since) < SPIN_NS) {
            relax();
            continue;
        }
        uint32_t word = atomic_load(&pool->wake);
        atomic_fetch_add(&pool->sleepers, 1);
        generation = atomic_load(&pool->generation);
        if (!atomic_load(&pool->stop) && ((generation & 1) || generation == seen))
            futex(&pool->wake, FUTEX_WAIT_PRIVATE, word);
        atomic_fetch_sub(&pool->sleepers, 1);
        clock_gettime(CLOCK_MONOTONIC, &since);
    }
}

static void help(shared_gemv *pool, int index, uint64_t generation) {
    const job snapshot = pool->job; /* valid if the generation is unchanged after it */
    atomic_thread_fence(memory_order_acquire); /* the reads above complete before the check below */
    if (atomic_load(&pool->generation) != generation) return;
    float *scratch = pool->scratch + (int64_t)index * pool->max_m * pool->max_n;
    for (;;) {
        int64_t block = claim(pool, snapshot.blocks, index + 1);
        if (block < 0 || atomic_load(&pool->generation) != generation) return;
        uint64_t state = atomic_load(&pool->state[block]);
        if (state >> 8 >= generation || !atomic_compare_exchange_strong(&pool->state[block], &state,
                                                                        tag(generation, index, CLAIMED)))
            continue; /* the caller took it */
        if (compute(&snapshot, pool->x, scratch, block)) continue; /* left claimed: the caller computes it */
        uint64_t claimed = tag(generation, index, CLAIMED);
        atomic_compare_exchange_strong(&pool->state[block], &claimed, tag(generation, index, DONE));
    }
}

static void *helper_main(void *argument) {
    helper_start start = *(helper_start *)argument;
    free(argument);
    struct sched_param priority = {0}; /* SCHED_IDLE's only one */
    if (pthread_setschedparam(pthread_self(), HELPER_POLICY, &priority)) atomic_store(&start.pool->refused, 1);
    atomic_fetch_add(&start.pool->started, 1);
    for (uint64_t generation = 0; (generation = await_job(start.pool, generation));)
        help(start.pool, start.index, generation);
    return NULL;
}

/* A pool of helpers, one pinned to each of `cores` (at most MAX_HELPERS) at SCHED_IDLE, for
 * products of up to max_m input rows, max_n outputs a row and max_k columns; NULL where memory, a
 * thread, a core's pinning or the policy is refused. */
shared_gemv *shared_gemv_start(const int *cores, int count, int64_t max_m, int64_t max_n, int64_t max_k) {
    if (count < 1 || count > MAX_HELPERS || max_m < 1 || max_n < 1 || max_k < 1) return NULL;
    shared_gemv *pool = aligned_alloc(64, (sizeof *pool + 63) / 64 * 64); /* the counters' cache lines */
    if (!pool) return NULL;
    memset(pool, 0, sizeof *pool);
    int64_t blocks = (max_n + MIN_BLOCK_COLUMNS - 1) / MIN_BLOCK_COLUMNS;
    pool->state = calloc((size_t)blocks, sizeof *pool->state);
    pool->x = calloc((size_t)(max_m * max_k), sizeof(float));
    pool->scratch = calloc((size_t)(max_m * max_n * count), sizeof(float));
    pool->max_m = max_m, pool->max_n = max_n, pool->max_k = max_k;
    atomic_store(&pool->generation, 2);
    for (int i = 0; pool->state && pool->x && pool->scratch && i < count; i++) {
        helper_start *start = malloc(sizeof *start);
        pthread_attr_t attributes;
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cores[i], &set);
        if (!start || pthread_attr_init(&attributes)) { free(start); break; }
        *start = (helper_start){pool, i};
        int refused = pthread_attr_setaffinity_np(&attributes, sizeof set, &set) ||
                      pthread_create(&pool->threads[i], &attributes, helper_main, start);
        pthread_attr_destroy(&attributes);
        if (refused) { free(start); break; }
        pool->cores[i] = cores[i];
        pool->helpers++;
    }
    /* each helper reports whether it took SCHED_IDLE (glibc's attributes refuse that policy) */
    for (int waited = 0; atomic_load(&pool->started) < pool->helpers && waited < 20000; waited++)
        nanosleep(&(struct timespec){0, 50000}, NULL); /* 1 s at most */
    if (pool->helpers == count && atomic_load(&pool->started) == count && !atomic_load(&pool->refused)) return pool;
    shared_gemv_stop(pool);
    return NULL;
}

void shared_gemv_stop(shared_gemv *pool) {
    while (atomic_exchange(&pool->busy, 1)) relax(); /* a caller's product in flight ends first */
    atomic_store(&pool->stop, 1);
    atomic_fetch_add(&pool->wake, 1);
    futex(&pool->wake, FUTEX_WAKE_PRIVATE, INT_MAX);
    for (int i = 0; i < pool->helpers; i++) pthread_join(pool->threads[i], NULL);
    free(pool->state), free(pool->x), free(pool->scratch), free(pool);
}

/* Publish a product to the helpers: its fields under the sequence lock, then a wake for sleepers. */
static void publish(shared_gemv *pool, const job *j, const float *x, uint64_t generation) {
    atomic_store(&pool->generation, generation - 1); /* odd: the fields are being written */
    atomic_thread_fence(memory_order_release);       /* ...after the odd generation is seen */
    pool->job = *j;
    memcpy(pool->x, x, (size_t)(j->m * j->k) * sizeof(float));
    for (int part = 0; part <= pool->helpers; part++) atomic_store(&pool->next[part].value, 0);
    atomic_store(&pool->generation, generation);
    atomic_store(&pool->wake, (uint32_t)generation);
    if (atomic_load(&pool->sleepers)) futex(&pool->wake, FUTEX_WAKE_PRIVATE, INT_MAX);
}

/* After the counters ran out: copy each block a helper finished, compute each it did not (a claim
 * it has not finished is taken from it). Returns how many blocks were copied. */
static int64_t finish(shared_gemv *pool, const job *j, const float *x, float *out, uint64_t generation) {
    int64_t copied = 0;
    for (int64_t block = 0; block < j->blocks; block++) {
        for (;;) {
            uint64_t state = atomic_load(&pool->state[block]);
            if (state == tag(generation, 0, CALLER)) break;
            if (state >> 8 == generation && (state & 3) == DONE) {
                int helper = (int)(state >> 2 & 63);
                const float *done = pool->scratch + helper * pool->max_m * pool->max_n;
                int64_t first = block * j->block_columns;
                int64_t end = first + j->block_columns < j->n ? first + j->block_columns : j->n;
                for (int64_t row = 0; row < j->m; row++)
                    memcpy(out + row * j->n + first, done + row * j->n + first, (size_t)(end - first) * sizeof(float));
                atomic_fetch_add_explicit(&pool->next[helper + 1].helped, 1, memory_order_relaxed);
                copied++;
                break;
            }
            if (atomic_compare_exchange_strong(&pool->state[block], &state, tag(generation, 0, CALLER))) {
                pool->failed |= compute(j, x, out, block) != 0;
                atomic_fetch_add_explicit(&pool->taken, 1, memory_order_relaxed);
                break;
            }
        }
    }
    return copied;
}

/* Whether the caller should compute alone for a while: over each WINDOW products, helpers that
 * finished under an eighth of their parts' blocks (their cores busy: a prefill working there) cost
 * wake-ups and blocks taken back for nothing, so the next REST products run alone (helpers sleep),
 * then the next window probes again. */
static void judge(shared_gemv *pool, int64_t parts_blocks, int64_t copied) {
    pool->window_blocks += parts_blocks, pool->window_copied += copied;
    if (++pool->window_products < WINDOW) return;
    if (pool->window_copied * 8 < pool->window_blocks) {
        pool->resting = REST;
        atomic_fetch_add_explicit(&pool->rests, 1, memory_order_relaxed);
    }
    pool->window_products = pool->window_blocks = pool->window_copied = 0;
}

/* Whether this caller may share the job now (it holds `busy` then): the pool is free, and not resting. */
static int share(shared_gemv *pool) {
    if (atomic_exchange(&pool->busy, 1)) return 0;
    if (pool->resting > 0) { /* `judge` found the helpers' cores busy */
        pool->resting--;
        atomic_store(&pool->busy, 0);
        return 0;
    }
    return 1;
}

/* The job computed by the caller and the helpers (the caller holds `busy`, released here);
 * nonzero where a block could not be computed. */
static int run_shared(shared_gemv *pool, const job *j, const float *x, float *out) {
    const uint64_t generation = atomic_load(&pool->generation) + 2;
    publish(pool, j, x, generation);
    pool->failed = 0;
    for (int part = 0; part <= pool->helpers; part++)
        for (int64_t block; (block = claim(pool, j->blocks, part)) >= 0;) {
            atomic_store(&pool->state[block], tag(generation, 0, CALLER));
            pool->failed |= compute(j, x, out, block) != 0;
            if (part > 0) atomic_fetch_add_explicit(&pool->taken, 1, memory_order_relaxed);
        }
    int64_t copied = finish(pool, j, x, out, generation);
    judge(pool, j->blocks - part_start(j->blocks, pool->helpers + 1, 1), copied);
    int failed = pool->failed;
    atomic_store(&pool->busy, 0);
    return failed ? -1 : 0;
}

/* exact_gemv's product, with the pool's helpers taking what blocks they can (one caller at a time:
 * a second, concurrent one computes alone). */
int shared_gemv_run(shared_gemv *pool, const float *w, const float *x, float *out, int64_t n, int64_t k,
                    int64_t ldw) {
    if (n > pool->max_n || k > pool->max_k || n < 2 * BLOCK_ROWS) return exact_gemv(w, x, out, n, k, ldw);
    if (n < 0 || n % 4 || k < 8 || ldw < k || ldw % 4 || (uintptr_t)w % sizeof(float)) return -1;
    if (!share(pool)) return exact_gemv(w, x, out, n, k, ldw);
    const job j = {w, NULL, 1, n, k, ldw, 4 - (int64_t)((uintptr_t)w % 16) / 4, 0, BLOCK_ROWS,
                   (n + BLOCK_ROWS - 1) / BLOCK_ROWS};
    return run_shared(pool, &j, x, out);
}

/* panel_gemm_columns (`columns`, from panel_gemm.c) over all of out[m][n], with the pool's helpers
 * taking blocks of `block_columns` columns (a multiple of the kernel's panel width); alone where
 * the product is larger than the pool's scratch or too small to split. */
int shared_panels_run(shared_gemv *pool, panel_columns columns, int64_t block_columns, const float *x,
                      const float *panels, float *out, int64_t m, int64_t n, int64_t k, int64_t kc) {
    if (block_columns < MIN_BLOCK_COLUMNS || m < 1 || n < 2 * block_columns || k < 1 || kc < 1 || m > pool->max_m ||
        n > pool->max_n || k > pool->max_k || columns(x, panels, out, m, n, k, kc, block_columns, block_columns) ||
        !share(pool)) /* (the empty range above: the kernel refuses blocks that do not start on a panel) */
        return columns(x, panels, out, m, n, k, kc, 0, n < 0 ? -1 : n);
    const job j = {panels, columns, m, n, k, 0, 0, kc, block_columns, (n + block_columns - 1) / block_columns};
    return run_shared(pool, &j, x, out);
}

/* Blocks of the helpers' parts so far: computed by a helper (and copied), and by the caller; and
 * how many times the caller went on alone for a while (`judge`). */
void shared_gemv_counts(const shared_gemv *pool, int64_t *helped, int64_t *taken, int64_t *rested) {
    *helped = 0;
    for (int part = 1; part <= pool->helpers; part++) *helped += atomic_load(&pool->next[part].helped);
    *taken = atomic_load_explicit(&pool->taken, memory_order_relaxed);
    *rested = atomic_load_explicit(&pool->rests, memory_order_relaxed);
}

#else /* no helpers here: a pool never starts, so the others are never called */
typedef struct shared_gemv shared_gemv;
typedef int (*panel_columns)(const float *x, const float *panels, float *out, int64_t m, int64_t n, int64_t k,
                             int64_t kc, int64_t first, int64_t end);

shared_gemv *shared_gemv_start(const int *cores, int count, int64_t max_m, int64_t max_n, int64_t max_k) {
    (void)cores, (void)count, (void)max_m, (void)max_n, (void)max_k;
    return 0;
}

int shared_gemv_run(shared_gemv *pool, const float *w, const float *x, float *out, int64_t n, int64_t k,
                    int64_t ldw) {
    (void)pool;
    return exact_gemv(w, x, out, n, k, ldw);
}

int shared_panels_run(shared_gemv *pool, panel_columns columns, int64_t block_columns, const float *x,
                      const float *panels, float *out, int64_t m, int64_t n, int64_t k, int64_t kc) {
    (void)pool, (void)block_columns;
    return columns(x, panels, out, m, n, k, kc, 0, n < 0 ? -1 : n);
}

void shared_gemv_stop(shared_gemv *pool) { (void)pool; }

void shared_gemv_counts(const shared_gemv *pool, int64_t *helped, int64_t *taken, int64_t *rested) {
    (void)pool;
    *helped = *taken = *rested = 0;
}
#endif
