/*
 * test_shm_bench.c -- `test_shm bench [quick]`: the memcpy ceiling of one
 * core, then publish+fetch bandwidth between two processes for 64 KiB to
 * 64 MiB events.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm_test.h"

#include <stdlib.h>
#include <string.h>

static const size_t bench_sizes[] = {(size_t)64 << 10, (size_t)1 << 20,
                                     (size_t)16 << 20, (size_t)64 << 20};
#define N_BENCH (sizeof bench_sizes / sizeof bench_sizes[0])

static int bench_iters(size_t size, int quick)
{
    double want = (quick ? 64e6 : 2e9) / (double)size;
    int n = (int)want;
    if (n < (quick ? 4 : 20))
        n = quick ? 4 : 20;
    if (n > 20000)
        n = 20000;
    return n;
}

/* Rank 0 publishes one item of `size` bytes per event; rank 1 fetches it
 * and publishes an empty event (which acknowledges the previous one). */
static int rank_bench(const char *test, const char *name, int world, int rank,
                      void *arg)
{
    const int quick = *(const int *)arg;
    ad_shm *h = join(test, name, world, rank);
    unsigned char *buf = NULL;
    ad_err err = {0};
    uint64_t seq = 0;
    int rc = 0;

    if (h == NULL)
        CFAIL("join failed");
    buf = malloc(bench_sizes[N_BENCH - 1]);
    if (buf == NULL)
        CFAIL("malloc");
    memset(buf, rank + 1, bench_sizes[N_BENCH - 1]);
    for (size_t k = 0; k < N_BENCH; k++) {
        size_t size = bench_sizes[k];
        ad_shm_item it = {0, buf, size};
        int iters = bench_iters(size, quick), warm = 3;
        double t0 = 0;
        if (ad_shm_reserve(h, size, 30.0, &err) != AD_OK)
            CFAIL("reserve: %s", err.msg);
        for (int i = 0; i < warm + iters; i++) {
            if (i == warm) {
                if (ad_shm_barrier(h, 30.0, &err) != AD_OK)
                    CFAIL("barrier: %s", err.msg);
                t0 = check_now();
            }
            seq++;
            if (rank == 0) {
                if (ad_shm_publish(h, seq, 0, &it, 1, 30.0, &err) != AD_OK)
                    CFAIL("publish: %s", err.msg);
            } else {
                if (ad_shm_fetch(h, seq, 0, 0, &it, 1, 30.0, &err) != AD_OK ||
                    ad_shm_publish(h, seq, 0, NULL, 0, 30.0, &err) != AD_OK)
                    CFAIL("fetch: %s", err.msg);
            }
        }
        if (rank == 1) {
            double dt = check_now() - t0;
            printf("  shm publish+fetch %8zu KiB: %7.2f GB/s  (%8.1f us per "
                   "event, %d events)\n", size >> 10,
                   (double)size * iters / dt / 1e9, dt / iters * 1e6, iters);
            fflush(stdout);
        }
        /* Keep the two ranks in step between sizes. */
        if (ad_shm_barrier(h, 30.0, &err) != AD_OK)
            CFAIL("barrier: %s", err.msg);
    }
out:
    free(buf);
    ad_shm_detach(h, rc != 0);
    return rc;
}

int bench(int quick)
{
    unsigned char *a, *b;
    size_t big = bench_sizes[N_BENCH - 1];
    int ok;

    printf("memcpy ceiling (one process, one core):\n");
    a = malloc(big);
    b = malloc(big);
    if (a == NULL || b == NULL) {
        free(a);
        free(b);
        fprintf(stderr, "malloc failed\n");
        return 1;
    }
    memset(a, 1, big);
    memset(b, 2, big);
    for (size_t k = 0; k < N_BENCH; k++) {
        size_t size = bench_sizes[k];
        int iters = bench_iters(size, quick);
        double t0 = check_now(), dt;
        for (int i = 0; i < iters; i++) {
            memcpy(b, a, size);
            /* keep the copy from being optimised away */
            __asm__ __volatile__("" : : "r"(b) : "memory");
        }
        dt = check_now() - t0;
        printf("  memcpy            %8zu KiB: %7.2f GB/s\n", size >> 10,
               (double)size * iters / dt / 1e9);
    }
    free(a);
    free(b);
    printf("shared memory, 2 processes (each byte copied in by the publisher "
           "and out by the reader):\n");
    ok = run_ranks("bench", 2, rank_bench, &quick, -1, -1);
    if (leftover_segments() != 0)
        ok = 0;
    printf("bench %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
