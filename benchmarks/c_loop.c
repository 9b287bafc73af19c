/* The "C loop" peer of benchmarks/update_kernels.py: the simplest fast update
 * loop a person would write by hand, so the benchmark can say how far this
 * machine's memory lets any update go.
 *
 * It does less than an update must: every owned position is applied alone,
 * in place (no dedup, so a repeated id is updated once per position; no
 * journal, so nothing can be undone; no finite checks). What it keeps is
 * what every correct multi-threaded update pays: each thread owns the ids
 * the same multiplicative hash as ekko's partitions gives it (so no two
 * threads touch one row), reads the gradient row of each owned position,
 * and reads and writes the table row and its rowwise state, asking for the
 * rows AHEAD owned positions early.
 *
 * Built by update_kernels.py with the system C compiler (-O3 -march=native),
 * given the owner hash (one definition: llvm_abi.OWNER_HASH, OWNER_SHIFT),
 * once per row width: DIM is a compile-time constant, as it is in ekko's
 * kernels (a run-time width measured 105 against 90 ms, Zipf 4M x 64, one
 * thread).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#if !defined(OWNER_HASH) || !defined(OWNER_SHIFT)
#error "build with -DOWNER_HASH and -DOWNER_SHIFT of compiler/backend/llvm_abi.py"
#endif
#define BLOCK 4096
#define AHEAD 16
#define MAX_THREADS 64
#define LANES 16 /* independent partial sums: one vector, no serial add chain */
#ifndef DIM
#error "build with -DDIM=<row width>"
#endif

typedef struct {
    const int64_t *ids;
    const float *grads;
    float *table;
    float *state; /* NULL: plain SGD */
    int64_t n;
    int part, nparts;
    float lr, eps;
} job_t;

static int owner(int64_t id, int nparts) {
    return (int)((((uint64_t)id * OWNER_HASH) >> OWNER_SHIFT) % (uint64_t)nparts);
}

static void ask_for_row(const job_t *j, int64_t id) {
    const char *row = (const char *)(j->table + id * DIM);
    for (int64_t at = 0; at < 4 * DIM; at += 64)
        __builtin_prefetch(row + at, 1, 3);
    if (j->state)
        __builtin_prefetch(j->state + id, 1, 3);
}

static float sum_of_squares(const float *g) {
    float part[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= DIM; k += LANES)
        for (int l = 0; l < LANES; l++)
            part[l] += g[k + l] * g[k + l];
    for (; k < DIM; k++)
        part[0] += g[k] * g[k];
    float sq = 0.0f;
    for (int l = 0; l < LANES; l++)
        sq += part[l];
    return sq;
}

static void apply(const job_t *j, int64_t i) {
    int64_t id = j->ids[i];
    float *restrict row = j->table + id * DIM;
    const float *restrict g = j->grads + i * DIM;
    float m = j->lr;
    if (j->state) { /* rowwise Adagrad, as FBGEMM defines it */
        float s = j->state[id] + sum_of_squares(g) / (float)DIM;
        j->state[id] = s;
        m = j->lr / (sqrtf(s) + j->eps);
    }
    for (int64_t k = 0; k < DIM; k++)
        row[k] -= m * g[k];
}

static void *run(void *arg) {
    const job_t *j = arg;
    int64_t own[BLOCK];
    for (int64_t lo = 0; lo < j->n; lo += BLOCK) {
        int64_t hi = lo + BLOCK < j->n ? lo + BLOCK : j->n, cnt = 0;
        for (int64_t i = lo; i < hi; i++) { /* branch-free compaction */
            own[cnt] = i;
            cnt += owner(j->ids[i], j->nparts) == j->part;
        }
        for (int64_t t = 0; t < cnt; t++) {
            if (t + AHEAD < cnt)
                ask_for_row(j, j->ids[own[t + AHEAD]]);
            apply(j, own[t]);
        }
    }
    return 0;
}

/* Apply n gradient rows of DIM floats to table (and state) on nthreads threads;
 * 0 on success, -1 when dim is not the DIM it was built for. */
int c_loop_update(const int64_t *ids, const float *grads, float *table, float *state,
                  int64_t n, int64_t dim, int nthreads, float lr, float eps) {
    if (dim != DIM || nthreads < 1 || nthreads > MAX_THREADS)
        return -1;
    job_t jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    for (int p = 0; p < nthreads; p++)
        jobs[p] = (job_t){ids, grads, table, state, n, p, nthreads, lr, eps};
    int started[MAX_THREADS] = {0};
    for (int p = 1; p < nthreads; p++)
        started[p] = pthread_create(&threads[p], 0, run, &jobs[p]) == 0;
    run(&jobs[0]);
    for (int p = 1; p < nthreads; p++) {
        if (started[p])
            pthread_join(threads[p], 0);
        else
            run(&jobs[p]); /* no thread to be had: the same rows, on this one */
    }
    return 0;
}
