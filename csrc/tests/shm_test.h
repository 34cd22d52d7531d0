/*
 * shm_test.h -- what the files of the test_shm program share: segment
 * names, byte patterns, the fork harness that runs one function per rank,
 * and the checks of a failed call's status, time and message.
 *
 * The program (test_shm.c with main, the exchange and argument tests;
 * test_shm_peers.c, timeouts and peers that go away; test_shm_records.c,
 * error records, heartbeat, tags, all-gather, reserve cleanup;
 * test_shm_bench.c, bandwidth) forks its ranks from one process; a rank reports failure
 * through its exit status and a line on stderr, and arms alarm() so that a
 * hang turns into a failure.  Segment names are
 * "/asyncdiff-test-<pid>-<n>"; the run ends by checking that /dev/shm holds
 * none of them.
 */
#ifndef ASYNCDIFF_TESTS_SHM_TEST_H
#define ASYNCDIFF_TESTS_SHM_TEST_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "check.h"
#include "shm.h"

#define MAX_RANKS 16
#define CHILD_ALARM_S 60

/* Call once, first: the prefix of this run's segment names. */
void shm_test_init(void);

/* A fresh segment name for this run. */
void make_name(char *buf, size_t len);

/* Entries of /dev/shm made by this run (each printed on stderr). */
int leftover_segments(void);

void nap_us(long us);

/* splitmix64 and a key made of four numbers: sizes and byte patterns. */
uint64_t mix64(uint64_t *state);
uint64_t key4(uint64_t a, uint64_t b, uint64_t c, uint64_t d);

/* The bytes an item with this key must hold. */
void fill_pattern(unsigned char *dst, size_t len, uint64_t key);

/* In a child: print why it failed and hand back 1. */
#define CFAIL(...)                                                        \
    do {                                                                  \
        fprintf(stderr, "  [%s rank %d] ", test, rank);                   \
        fprintf(stderr, __VA_ARGS__);                                     \
        fputc('\n', stderr);                                              \
        rc = 1;                                                           \
        goto out;                                                         \
    } while (0)


/* Attach, meet everyone, and let rank 0 remove the name; NULL on failure
 * (reported on stderr). */
ad_shm *join(const char *test, const char *name, int world, int rank);

typedef int (*rank_fn)(const char *test, const char *name, int world,
                       int rank, void *arg);

/*
 * Fork `world` ranks running fn.  Children are reaped in rank order, except
 * that rank `reap_first` (>= 0) is reaped before the others.  Rank
 * `killed_rank` (>= 0) is expected to die of SIGKILL; every other rank must
 * exit with status 0.  Returns 1 when all ranks behaved.
 */
int run_ranks(const char *test, int world, rank_fn fn, void *arg, int reap_first,
              int killed_rank);

/* Check status, elapsed time (in [lo, hi]) and words in the message
 * (either may be NULL); 0 when all match, else 1 with the reason on
 * stderr. */
int expect(const char *what, ad_status st, const ad_err *err, ad_status want, double dt,
           double lo, double hi, const char *word1, const char *word2);

/* The tests, one entry each. */
void test_exchange(int world, int events);
void test_args(void);
void test_timeout(void);
void test_exit(void);
void test_kill(void);
void test_detach(int failed);
void test_fail_record(void);
void test_fail_any(void);
void test_heartbeat(void);
void test_chain(void);
void test_tags(void);
void test_allgather(void);
void test_allgather_mismatch(void);
void test_reserve_kill(void);
int bench(int quick);

#endif /* ASYNCDIFF_TESTS_SHM_TEST_H */
