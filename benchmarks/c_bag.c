/* The C peers of benchmarks/lookup_kernels.py: what hand-written code, and
 * the memory alone, give a pooled int8 lookup on this machine.
 *
 * c_bag_int8: the simplest fast int8 bag sum a person would write: bag b
 * sums ids[offsets[b]:offsets[b+1]] of FBGEMM's fused 8-bit rows (DIM codes,
 * f32 scale, f32 bias), code * scale + bias per element, into out[b]. Rows
 * AHEAD positions on are asked for early; the bags are split evenly between
 * the OpenMP threads. No checks (ids must be in range), so less work than
 * ekko's lookup.
 *
 * c_touch_lines: no arithmetic, no output: for each id it reads one byte of
 * every 64-byte line its row spans (asked for AHEAD positions early, as
 * above), and returns their sum so that nothing is left out. Its time is the
 * floor under any lookup of those rows: the lines must reach the core.
 *
 * Built by lookup_kernels.py with the system C compiler (-O3 -march=native
 * -fopenmp), once per row width: DIM is a compile-time constant, as in
 * ekko's kernels.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#ifndef DIM
#error "build with -DDIM=<codes per row>"
#endif
#define ROW (DIM + 8)
#define AHEAD 24
#define MAX_THREADS 64

static void ask_for(const uint8_t *row, int64_t row_bytes) {
    for (int64_t at = 0; at < row_bytes; at += 64)
        __builtin_prefetch(row + at, 0, 3);
    __builtin_prefetch(row + row_bytes - 1, 0, 3);
}

static void pool(const uint8_t *table, const int64_t *ids, const int64_t *offsets,
                 int64_t lo, int64_t hi, float *out) {
    const int64_t n = offsets[hi];
    for (int64_t b = lo; b < hi; b++) {
        float acc[DIM] = {0};
        for (int64_t k = offsets[b]; k < offsets[b + 1]; k++) {
            if (k + AHEAD < n)
                ask_for(table + ids[k + AHEAD] * ROW, ROW);
            const uint8_t *row = table + ids[k] * ROW;
            float scale, bias;
            memcpy(&scale, row + DIM, sizeof scale);
            memcpy(&bias, row + DIM + sizeof scale, sizeof bias);
            for (int d = 0; d < DIM; d++)
                acc[d] += (float)row[d] * scale + bias;
        }
        memcpy(out + b * DIM, acc, sizeof acc);
    }
}

/* 0, or -1 for a thread count out of [1, MAX_THREADS] or offsets[0] != 0. */
int c_bag_int8(const uint8_t *table, const int64_t *ids, const int64_t *offsets, int64_t nbags,
               float *out, int nthreads) {
    if (nthreads < 1 || nthreads > MAX_THREADS || offsets[0] != 0)
        return -1;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        pool(table, ids, offsets, nbags * t / nt, nbags * (t + 1) / nt, out);
    }
    return 0;
}

/* The sum of one byte of every line the rows of ids[0:n] span; -1 for a bad thread count. */
int64_t c_touch_lines(const uint8_t *table, int64_t row_bytes, const int64_t *ids, int64_t n,
                      int nthreads) {
    if (nthreads < 1 || nthreads > MAX_THREADS || row_bytes < 1)
        return -1;
    int64_t total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        for (int64_t k = lo; k < hi; k++) {
            if (k + AHEAD < hi)
                ask_for(table + ids[k + AHEAD] * row_bytes, row_bytes);
            const uint8_t *row = table + ids[k] * row_bytes;
            for (int64_t at = 0; at < row_bytes; at += 64)
                total += row[at];
            total += row[row_bytes - 1];
        }
    }
    return total;
}
