/* Thread slots for work split inside one parallel region (ggml's ith / nth): a kernel's `_part` function does
 * slot ith's share of its work, so a decode step can run every kernel of every layer inside one OpenMP region,
 * its threads meeting at a spin barrier between dependent ops instead of forking and joining a region per op
 * (libgomp sleeps its workers between regions when a second pool exists; a spin barrier does not care). */
#ifndef SKV_TEAM_H
#define SKV_TEAM_H
#include <immintrin.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct {
    atomic_int arrived, generation;
    int n;
} skv_barrier;

typedef struct {
    int ith, nth;
    skv_barrier *barrier; /* NULL: a team of one */
} skv_team;

#define SKV_SOLO ((skv_team){0, 1, NULL})

/* every thread of the team waits here until all have arrived (spinning; yielding after a while, so a team with
 * more threads than free CPUs still progresses) */
static inline void skv_team_sync(const skv_team *t) {
    skv_barrier *b = t->barrier;
    if (!b || b->n < 2) return;
    const int gen = atomic_load_explicit(&b->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == b->n - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->generation, 1, memory_order_acq_rel);
        return;
    }
    for (long spins = 0; atomic_load_explicit(&b->generation, memory_order_acquire) == gen; spins++) {
        if (spins < 4096) /* ~0.1-0.2 ms of pauses: longer than an op's wait, shorter than a time slice */
            _mm_pause();
        else
            sched_yield();
    }
}

/* slot ith's contiguous share [*lo, *hi) of n items, shares rounded to multiples of `unit` */
static inline void skv_team_range(const skv_team *t, int64_t n, int64_t unit, int64_t *lo, int64_t *hi) {
    const int64_t units = (n + unit - 1) / unit, per = units / t->nth, extra = units % t->nth;
    const int64_t first = t->ith * per + (t->ith < extra ? t->ith : extra);
    const int64_t count = per + (t->ith < extra);
    *lo = first * unit < n ? first * unit : n;
    *hi = (first + count) * unit < n ? (first + count) * unit : n;
}

/* the library's parallel regions so far (a test checks that a fused decode step opens exactly one) */
extern atomic_llong skv_regions_opened;
#define SKV_COUNT_REGION() atomic_fetch_add_explicit(&skv_regions_opened, 1, memory_order_relaxed)
#endif
