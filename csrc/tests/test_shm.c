/*
 * test_shm.c -- multi-process tests and a bandwidth benchmark for shm.c.
 *
 *   test_shm            run every test, print "N passed, M failed"
 *   test_shm bench      bandwidth of publish+fetch between 2 processes
 *   test_shm bench quick   the same with few iterations (smoke test)
 *
 * Every multi-process test forks its ranks from this process; a rank
 * reports failure through its exit status (and a line on stderr).  Each
 * rank arms alarm() so that a hang turns into a failure, not a stuck run.
 * Segment names are "/asyncdiff-test-<pid>-<n>"; at the end the test checks
 * that /dev/shm holds none of them.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_RANKS 16
#define CHILD_ALARM_S 60

static int g_passed, g_failed;
static int g_name_counter;
static char g_prefix[64]; /* "asyncdiff-test-<pid>-" (as listed in /dev/shm) */

/* ------------------------------------------------------------------------ */
/* Utilities                                                                 */
/* ------------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void nap_us(long us)
{
    struct timespec ts;
    ts.tv_sec = us / 1000000;
    ts.tv_nsec = (us % 1000000) * 1000;
    nanosleep(&ts, NULL);
}

/* splitmix64: a tiny, good-enough generator for sizes and byte patterns. */
static uint64_t mix64(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static uint64_t key4(uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
    uint64_t s = a;
    s = mix64(&s) ^ b;
    s = mix64(&s) ^ c;
    s = mix64(&s) ^ d;
    return mix64(&s);
}

/* The bytes item (seq, rank, item) of a run must hold. */
static void fill_pattern(unsigned char *dst, size_t len, uint64_t key)
{
    uint64_t s = key, v;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        v = mix64(&s);
        memcpy(dst + i, &v, 8);
    }
    if (i < len) {
        v = mix64(&s);
        memcpy(dst + i, &v, len - i);
    }
}

static void make_name(char *buf, size_t len)
{
    snprintf(buf, len, "/%s%d", g_prefix, ++g_name_counter);
}

static void report(const char *test, int ok, const char *detail)
{
    if (ok)
        g_passed++;
    else
        g_failed++;
    printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", test, detail ? ": " : "",
           detail ? detail : "");
    fflush(stdout);
}

/* Count entries of /dev/shm that start with our prefix. */
static int leftover_segments(void)
{
    DIR *d = opendir("/dev/shm");
    struct dirent *e;
    int n = 0;
    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, g_prefix, strlen(g_prefix)) == 0) {
            fprintf(stderr, "leftover /dev/shm/%s\n", e->d_name);
            n++;
        }
    }
    closedir(d);
    return n;
}

/* In a child: print why it failed and hand back 1. */
#define CFAIL(...)                                                        \
    do {                                                                  \
        fprintf(stderr, "  [%s rank %d] ", test, rank);                   \
        fprintf(stderr, __VA_ARGS__);                                     \
        fputc('\n', stderr);                                              \
        rc = 1;                                                           \
        goto out;                                                         \
    } while (0)

/* Attach, meet everyone, and let rank 0 remove the name. */
static ad_shm *join(const char *test, const char *name, int world, int rank)
{
    ad_err err = {0};
    ad_shm *h = NULL;
    ad_status st = ad_shm_attach(name, world, rank, rank == 0, 10.0, &h, &err);
    if (st != AD_OK) {
        fprintf(stderr, "  [%s rank %d] attach: %s: %s\n", test, rank,
                ad_status_name(st), err.msg);
        return NULL;
    }
    st = ad_shm_barrier(h, 10.0, &err);
    if (st == AD_OK && rank == 0)
        st = ad_shm_unlink(name, &err);
    if (st != AD_OK) {
        fprintf(stderr, "  [%s rank %d] join: %s: %s\n", test, rank,
                ad_status_name(st), err.msg);
        ad_shm_detach(h, 1);
        return NULL;
    }
    return h;
}

/* ------------------------------------------------------------------------ */
/* Fork harness                                                              */
/* ------------------------------------------------------------------------ */

typedef int (*rank_fn)(const char *test, const char *name, int world,
                       int rank, void *arg);

/*
 * Fork `world` ranks running fn.  Children are reaped in rank order, except
 * that rank `reap_first` (>= 0) is reaped before the others.  Rank
 * `killed_rank` (>= 0) is expected to die of SIGKILL; every other rank must
 * exit with status 0.  Returns 1 when all ranks behaved.
 */
static int run_ranks(const char *test, int world, rank_fn fn, void *arg,
                     int reap_first, int killed_rank)
{
    char name[96];
    pid_t pids[MAX_RANKS];
    int r, ok = 1;

    make_name(name, sizeof name);
    fflush(stdout);
    fflush(stderr);
    for (r = 0; r < world; r++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            world = r;
            ok = 0;
            break;
        }
        if (pid == 0) {
            int rc;
            alarm(CHILD_ALARM_S);
            rc = fn(test, name, world, r, arg);
            exit(rc == 0 ? 0 : 1);
        }
        pids[r] = pid;
    }
    for (int k = -1; k < world; k++) {
        int status = 0;
        r = k < 0 ? reap_first : k;
        if (r < 0 || (k >= 0 && r == reap_first))
            continue;
        if (waitpid(pids[r], &status, 0) < 0) {
            perror("waitpid");
            ok = 0;
            continue;
        }
        if (r == killed_rank) {
            if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL) {
                fprintf(stderr, "  [%s] rank %d was meant to die of SIGKILL\n",
                        test, r);
                ok = 0;
            }
        } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            if (WIFSIGNALED(status))
                fprintf(stderr, "  [%s] rank %d killed by signal %d\n", test,
                        r, WTERMSIG(status));
            else
                fprintf(stderr, "  [%s] rank %d exited with %d\n", test, r,
                        WEXITSTATUS(status));
            ok = 0;
        }
    }
    return ok;
}

/* ------------------------------------------------------------------------ */
/* Test: random exchange, W ranks, many events, growing buffers              */
/* ------------------------------------------------------------------------ */

#define MAX_ITEMS 4

typedef struct layout {
    int n[MAX_RANKS];
    size_t off[MAX_RANKS][MAX_ITEMS];
    size_t len[MAX_RANKS][MAX_ITEMS];
    unsigned char plan[MAX_RANKS][MAX_ITEMS]; /* this rank: 0 skip, 1 now,
                                                 2 at the next event */
    size_t total;
} layout;

typedef struct xchg_arg {
    int events;
    uint64_t seed;
} xchg_arg;

/* Layout of event seq: the same on every rank (depends on seed and seq).
 * The fetch plan depends on the rank as well. */
static void make_layout(layout *L, int world, int rank, uint64_t seed,
                        uint64_t seq, int events)
{
    uint64_t s = key4(seed, seq, 0x1a, 0);
    size_t off = mix64(&s) % 64;
    int r, i;

    memset(L, 0, sizeof *L);
    for (r = 0; r < world; r++) {
        L->n[r] = (int)(mix64(&s) % (MAX_ITEMS + 1));
        for (i = 0; i < L->n[r]; i++) {
            unsigned u = (unsigned)(mix64(&s) % 100);
            size_t len;
            if (u < 10)
                len = 0;
            else if (u < 85)
                len = 1 + mix64(&s) % 16384;
            else if (u < 97)
                len = 1 + mix64(&s) % 262144;
            else
                len = 1 + mix64(&s) % 1048576;
            /* One large item late in the run forces a growth while
             * deferred data is still pending. */
            if ((int)seq == events / 2 && i == 0)
                len = ((size_t)3 << 20) + 13 * (size_t)r;
            off += mix64(&s) % 16; /* unaligned offsets too */
            L->off[r][i] = off;
            L->len[r][i] = len;
            off += len;
        }
    }
    L->total = off;
    s = key4(seed, seq, 0x2b, (uint64_t)rank);
    for (r = 0; r < world; r++)
        for (i = 0; i < L->n[r]; i++)
            L->plan[r][i] = r == rank ? 0 : (unsigned char)(mix64(&s) % 3);
}

/* Fetch the items of rank src that plan marks `which`, check every byte. */
static int fetch_check(ad_shm *h, const layout *L, uint64_t seq, int src,
                       int which, uint64_t seed, const char *test, int rank,
                       size_t *checked)
{
    ad_shm_item items[MAX_ITEMS];
    unsigned char *dst[MAX_ITEMS] = {0};
    unsigned char *want = NULL;
    int idx[MAX_ITEMS], n = 0, i, rc = 0;
    ad_err err = {0};
    ad_status st;

    for (i = 0; i < L->n[src]; i++) {
        if (L->plan[src][i] != which)
            continue;
        dst[n] = malloc(L->len[src][i] + 1);
        if (dst[n] == NULL)
            CFAIL("malloc");
        items[n].offset = L->off[src][i];
        items[n].ptr = dst[n];
        items[n].nbytes = L->len[src][i];
        idx[n++] = i;
    }
    if (n == 0)
        goto out;
    st = ad_shm_fetch(h, seq, src, items, (size_t)n, 10.0, &err);
    if (st != AD_OK)
        CFAIL("fetch(seq=%llu, src=%d): %s: %s", (unsigned long long)seq, src,
              ad_status_name(st), err.msg);
    for (i = 0; i < n; i++) {
        size_t len = items[i].nbytes;
        want = malloc(len + 1);
        if (want == NULL)
            CFAIL("malloc");
        fill_pattern(want, len, key4(seed, seq, (uint64_t)src, (uint64_t)idx[i]));
        if (memcmp(want, dst[i], len) != 0) {
            size_t b = 0;
            while (want[b] == dst[i][b])
                b++;
            CFAIL("event %llu, rank %d item %d (%zu bytes at %zu): byte %zu "
                  "is %02x, want %02x", (unsigned long long)seq, src, idx[i],
                  len, items[i].offset, b, dst[i][b], want[b]);
        }
        free(want);
        want = NULL;
        *checked += len;
    }
out:
    free(want);
    for (i = 0; i < MAX_ITEMS; i++)
        free(dst[i]);
    return rc;
}

static int rank_exchange(const char *test, const char *name, int world,
                         int rank, void *varg)
{
    const xchg_arg *a = varg;
    ad_shm *h = join(test, name, world, rank);
    layout *cur = calloc(1, sizeof *cur), *prev = calloc(1, sizeof *prev);
    unsigned char *src[MAX_ITEMS] = {0};
    uint64_t jitter = key4(a->seed, 0x3c, (uint64_t)rank, 0);
    ad_err err = {0};
    ad_status st;
    size_t now = 0, later = 0;
    int rc = 0, i, s;

    if (h == NULL || cur == NULL || prev == NULL)
        CFAIL("setup failed");
    for (uint64_t seq = 1; seq <= (uint64_t)a->events + 1; seq++) {
        int last = seq == (uint64_t)a->events + 1;
        ad_shm_item items[MAX_ITEMS];

        if (!last) {
            make_layout(cur, world, rank, a->seed, seq, a->events);
            st = ad_shm_reserve(h, cur->total, 10.0, &err);
            if (st != AD_OK)
                CFAIL("reserve(%zu): %s: %s", cur->total, ad_status_name(st),
                      err.msg);
            if (ad_shm_capacity(h) < cur->total)
                CFAIL("capacity %zu < %zu", ad_shm_capacity(h), cur->total);
        }
        /* Reads of the previous event that were put off until now. */
        if (seq > 1)
            for (s = 0; s < world; s++)
                if (s != rank &&
                    fetch_check(h, prev, seq - 1, s, 2, a->seed, test, rank,
                                &later))
                    CFAIL("deferred fetch failed");
        if (last)
            break;

        for (i = 0; i < cur->n[rank]; i++) {
            free(src[i]);
            src[i] = malloc(cur->len[rank][i] + 1);
            if (src[i] == NULL)
                CFAIL("malloc");
            fill_pattern(src[i], cur->len[rank][i],
                         key4(a->seed, seq, (uint64_t)rank, (uint64_t)i));
            items[i].offset = cur->off[rank][i];
            items[i].ptr = src[i];
            items[i].nbytes = cur->len[rank][i];
        }
        st = ad_shm_publish(h, seq, items, (size_t)cur->n[rank], 10.0, &err);
        if (st != AD_OK)
            CFAIL("publish(%llu): %s: %s", (unsigned long long)seq,
                  ad_status_name(st), err.msg);
        for (s = 0; s < world; s++)
            if (s != rank &&
                fetch_check(h, cur, seq, s, 1, a->seed, test, rank,
                            &now))
                CFAIL("immediate fetch failed");

        /* Shake the interleaving a little. */
        if (mix64(&jitter) % 8 == 0)
            nap_us((long)(mix64(&jitter) % 300));
        {
            layout *t = prev;
            prev = cur;
            cur = t;
        }
    }
    ad_shm_ack(h, (uint64_t)a->events);
    st = ad_shm_barrier(h, 10.0, &err);
    if (st != AD_OK)
        CFAIL("final barrier: %s: %s", ad_status_name(st), err.msg);
    /* The run must have exercised both kinds of read. */
    if (now == 0 || later == 0)
        CFAIL("checked %zu bytes read at once and %zu read later", now, later);
    if (rank == 0)
        fprintf(stderr, "  [%s rank 0] checked %zu + %zu bytes, buffers of "
                "%zu bytes\n", test, now, later, ad_shm_capacity(h));
out:
    for (i = 0; i < MAX_ITEMS; i++)
        free(src[i]);
    free(cur);
    free(prev);
    ad_shm_detach(h, rc != 0);
    return rc;
}

static void test_exchange(int world, int events)
{
    char test[64], detail[96];
    xchg_arg a;
    double t0 = now_s();
    int ok;
    snprintf(test, sizeof test, "exchange_w%d", world);
    a.events = events;
    a.seed = UINT64_C(0x5eed) * (uint64_t)world + 17;
    ok = run_ranks(test, world, rank_exchange, &a, -1, -1);
    snprintf(detail, sizeof detail, "%d events, %.2f s", events, now_s() - t0);
    report(test, ok, detail);
}

/* ------------------------------------------------------------------------ */
/* Test: timeouts                                                            */
/* ------------------------------------------------------------------------ */

/* Check status, elapsed time (in [lo, hi]) and words in the message. */
static int expect(const char *what, ad_status st, const ad_err *err,
                  ad_status want, double dt, double lo, double hi,
                  const char *word1, const char *word2)
{
    if (st != want) {
        fprintf(stderr, "  %s: got %s (%s), want %s\n", what,
                ad_status_name(st), err->msg, ad_status_name(want));
        return 1;
    }
    if (dt < lo || dt > hi) {
        fprintf(stderr, "  %s: took %.3f s, want %.3f..%.3f s (%s)\n", what,
                dt, lo, hi, err->msg);
        return 1;
    }
    if ((word1 && !strstr(err->msg, word1)) ||
        (word2 && !strstr(err->msg, word2))) {
        fprintf(stderr, "  %s: message lacks \"%s\"/\"%s\": %s\n", what,
                word1 ? word1 : "", word2 ? word2 : "", err->msg);
        return 1;
    }
    return 0;
}

static int rank_timeout(const char *test, const char *name, int world,
                        int rank, void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    unsigned char buf[256] = {1};
    ad_shm_item it = {0, buf, sizeof buf};
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    st = ad_shm_reserve(h, 4096, 10.0, &err);
    if (st != AD_OK)
        CFAIL("reserve: %s", err.msg);
    if (rank == 1) {
        /* Never publishes; waits until rank 0 is done. */
        st = ad_shm_barrier(h, 20.0, &err);
        if (st != AD_OK)
            CFAIL("barrier: %s", err.msg);
        goto out;
    }
    /* Rank 1 never publishes event 1. */
    t0 = now_s();
    st = ad_shm_fetch(h, 1, 1, &it, 1, 0.3, &err);
    dt = now_s() - t0;
    if (expect("fetch timeout", st, &err, AD_ETIMEDOUT, dt, 0.3, 0.6,
               "rank 1", "event 1"))
        CFAIL("fetch timeout check failed");
    /* Events 1 and 2 use fresh buffers; event 3 needs rank 1 to have read
     * event 1, which it never acknowledges. */
    if (ad_shm_publish(h, 1, &it, 1, 0.3, &err) != AD_OK ||
        ad_shm_publish(h, 2, &it, 1, 0.3, &err) != AD_OK)
        CFAIL("publish 1/2: %s", err.msg);
    t0 = now_s();
    st = ad_shm_publish(h, 3, &it, 1, 0.2, &err);
    dt = now_s() - t0;
    if (expect("publish timeout", st, &err, AD_ETIMEDOUT, dt, 0.2, 0.4,
               "rank 1", "acknowledge"))
        CFAIL("publish timeout check failed");
    /* timeout 0 means "test once". */
    t0 = now_s();
    st = ad_shm_fetch(h, 5, 1, &it, 1, 0.0, &err);
    dt = now_s() - t0;
    if (expect("zero timeout", st, &err, AD_ETIMEDOUT, dt, 0.0, 0.05,
               "rank 1", "event 5"))
        CFAIL("zero timeout check failed");
    st = ad_shm_barrier(h, 20.0, &err);
    if (st != AD_OK)
        CFAIL("barrier: %s", err.msg);
out:
    ad_shm_detach(h, rc != 0);
    return rc;
}

static void test_timeout(void)
{
    report("timeout", run_ranks("timeout", 2, rank_timeout, NULL, -1, -1),
           NULL);
}

/* ------------------------------------------------------------------------ */
/* Tests: peers that go away                                                 */
/* ------------------------------------------------------------------------ */

/* Run events 1..n: everyone publishes one 1 KiB item and reads all others. */
static int run_events(ad_shm *h, int world, int rank, uint64_t from,
                      uint64_t to, const char *test)
{
    unsigned char mine[1024], theirs[1024];
    ad_err err = {0};
    int rc = 0;
    if (ad_shm_reserve(h, (size_t)world * 1024, 10.0, &err) != AD_OK)
        CFAIL("reserve: %s", err.msg);
    for (uint64_t seq = from; seq <= to; seq++) {
        ad_shm_item it = {(size_t)rank * 1024, mine, sizeof mine};
        memset(mine, (int)(seq * 7 + (uint64_t)rank), sizeof mine);
        if (ad_shm_publish(h, seq, &it, 1, 10.0, &err) != AD_OK)
            CFAIL("publish %llu: %s", (unsigned long long)seq, err.msg);
        for (int s = 0; s < world; s++) {
            ad_shm_item in = {(size_t)s * 1024, theirs, sizeof theirs};
            if (s == rank)
                continue;
            if (ad_shm_fetch(h, seq, s, &in, 1, 10.0, &err) != AD_OK)
                CFAIL("fetch %llu from %d: %s", (unsigned long long)seq, s,
                      err.msg);
            if (theirs[0] != (unsigned char)(seq * 7 + (uint64_t)s) ||
                theirs[1023] != theirs[0])
                CFAIL("bad data in event %llu from rank %d",
                      (unsigned long long)seq, s);
        }
    }
out:
    return rc;
}

/* W=3: rank 2 calls _exit(0) at event 6 without detaching; the parent reaps
 * it at once, so its pid disappears.  Rank 0 waits in fetch, rank 1 in a
 * barrier: both must fail with peer_gone naming rank 2 within 1 s. */
static int rank_exit(const char *test, const char *name, int world, int rank,
                     void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    unsigned char buf[64];
    ad_shm_item it = {0, buf, sizeof buf};
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    if (run_events(h, world, rank, 1, 5, test))
        CFAIL("events 1..5 failed");
    if (rank == 2)
        _exit(0); /* vanish without a word */
    t0 = now_s();
    if (rank == 0)
        st = ad_shm_fetch(h, 6, 2, &it, 1, 10.0, &err);
    else
        st = ad_shm_barrier(h, 10.0, &err);
    dt = now_s() - t0;
    if (expect(rank == 0 ? "fetch from exited peer" : "barrier with exited "
               "peer", st, &err, AD_EPEERGONE, dt, 0.0, 1.0, "rank 2", "died"))
        CFAIL("exited peer not detected");
    fprintf(stderr, "  [%s rank %d] detected in %.1f ms: %s\n", test, rank,
            dt * 1e3, err.msg);
    if (rank == 0)
        nap_us(300000); /* let rank 1 see rank 2 before it sees us leave */
out:
    ad_shm_detach(h, 1);
    return rc;
}

static void test_exit(void)
{
    report("peer_exit", run_ranks("peer_exit", 3, rank_exit, NULL, 2, -1),
           NULL);
}

/* W=2: rank 1 SIGKILLs itself at event 6; the parent reaps it only at the
 * end (a zombie meanwhile).  Rank 0 must see peer_gone in fetch and in
 * publish (waiting for rank 1's acknowledgement). */
static int rank_kill(const char *test, const char *name, int world, int rank,
                     void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    unsigned char buf[64] = {0};
    ad_shm_item it = {0, buf, sizeof buf};
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    if (run_events(h, world, rank, 1, 5, test))
        CFAIL("events 1..5 failed");
    if (rank == 1)
        kill(getpid(), SIGKILL);
    /* Event 6 reuses the buffer of event 4, which rank 1 acknowledged. */
    if (ad_shm_publish(h, 6, &it, 1, 10.0, &err) != AD_OK)
        CFAIL("publish 6: %s", err.msg);
    t0 = now_s();
    st = ad_shm_fetch(h, 6, 1, &it, 1, 10.0, &err);
    dt = now_s() - t0;
    if (expect("fetch from killed peer", st, &err, AD_EPEERGONE, dt, 0.0, 1.0,
               "rank 1", "zombie"))
        CFAIL("killed peer not detected in fetch");
    fprintf(stderr, "  [%s rank %d] detected in %.1f ms: %s\n", test, rank,
            dt * 1e3, err.msg);
    t0 = now_s();
    st = ad_shm_publish(h, 7, &it, 1, 10.0, &err);
    dt = now_s() - t0;
    if (expect("publish with killed peer", st, &err, AD_EPEERGONE, dt, 0.0,
               1.0, "rank 1", "acknowledge"))
        CFAIL("killed peer not detected in publish");
out:
    ad_shm_detach(h, 1);
    return rc;
}

static void test_kill(void)
{
    report("peer_sigkill", run_ranks("peer_sigkill", 2, rank_kill, NULL, -1, 1),
           NULL);
}

/* W=2: rank 1 publishes event 3 and detaches (normally or as failed).
 * Normal: rank 0 can still read event 3, publish past rank 1's last
 * acknowledgement, and a wait for event 4 fails with "has left".
 * Failed: the wait for event 4 fails with "has failed". */
static int rank_detach(const char *test, const char *name, int world,
                       int rank, void *arg)
{
    const int failed = *(const int *)arg;
    ad_shm *h = join(test, name, world, rank);
    unsigned char buf[64];
    ad_shm_item it = {0, buf, sizeof buf};
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;

    if (h == NULL)
        CFAIL("join failed");
    if (run_events(h, world, rank, 1, 2, test))
        CFAIL("events 1..2 failed");
    if (rank == 1) {
        ad_shm_item mine = {1024, buf, sizeof buf};
        memset(buf, 0xab, sizeof buf);
        if (ad_shm_publish(h, 3, &mine, 1, 10.0, &err) != AD_OK)
            CFAIL("publish 3: %s", err.msg);
        ad_shm_detach(h, failed);
        h = NULL;
        goto out;
    }
    nap_us(100000); /* rank 1 is gone by now */
    if (!failed) {
        ad_shm_item in = {1024, buf, sizeof buf};
        memset(buf, 0, sizeof buf);
        st = ad_shm_fetch(h, 3, 1, &in, 1, 1.0, &err);
        if (st != AD_OK || buf[0] != 0xab || buf[63] != 0xab)
            CFAIL("event 3 of a rank that left normally: %s %s",
                  ad_status_name(st), err.msg);
        for (uint64_t seq = 3; seq <= 6; seq++)
            if (ad_shm_publish(h, seq, &it, 1, 1.0, &err) != AD_OK)
                CFAIL("publish %llu after peer left: %s",
                      (unsigned long long)seq, err.msg);
    }
    t0 = now_s();
    st = ad_shm_fetch(h, 4, 1, &it, 1, 10.0, &err);
    dt = now_s() - t0;
    if (expect("fetch from detached peer", st, &err, AD_EPEERGONE, dt, 0.0,
               0.1, "rank 1", failed ? "has failed" : "has left"))
        CFAIL("detached peer not reported");
out:
    ad_shm_detach(h, 0);
    return rc;
}

static void test_detach(int failed)
{
    const char *t = failed ? "peer_detach_failed" : "peer_detach_normal";
    report(t, run_ranks(t, 2, rank_detach, &failed, -1, -1), NULL);
}

/* ------------------------------------------------------------------------ */
/* Test: argument checks (one process)                                       */
/* ------------------------------------------------------------------------ */

static int check_st(const char *what, ad_status st, const ad_err *err,
                    ad_status want, const char *arg)
{
    if (st != want || (arg != NULL && (err->arg == NULL ||
                                       strcmp(err->arg, arg) != 0))) {
        fprintf(stderr, "  args: %s: got %s arg=%s (%s), want %s arg=%s\n",
                what, ad_status_name(st), err->arg ? err->arg : "-", err->msg,
                ad_status_name(want), arg ? arg : "-");
        return 1;
    }
    return 0;
}

static void test_args(void)
{
    char name[96], name2[96];
    ad_shm *h = NULL, *h0 = NULL, *h1 = NULL, *hx = NULL;
    unsigned char in[200], out[200];
    ad_shm_item it;
    ad_err err = {0};
    int bad = 0;
    double t0, dt;

    make_name(name, sizeof name);
    make_name(name2, sizeof name2);
#define CHK(what, call, want, arg)                                       \
    do {                                                                 \
        ad_err_clear(&err);                                              \
        bad += check_st(what, (call), &err, want, arg);                  \
    } while (0)

    CHK("NULL out", ad_shm_attach(name, 1, 0, 1, 1.0, NULL, &err), AD_EINVAL,
        "out");
    CHK("NULL name", ad_shm_attach(NULL, 1, 0, 1, 1.0, &h, &err), AD_EINVAL,
        "name");
    CHK("no slash", ad_shm_attach("asyncdiff-x", 1, 0, 1, 1.0, &h, &err),
        AD_EINVAL, "name");
    CHK("inner slash", ad_shm_attach("/asyncdiff/x", 1, 0, 1, 1.0, &h, &err),
        AD_EINVAL, "name");
    CHK("world 0", ad_shm_attach(name, 0, 0, 1, 1.0, &h, &err), AD_EINVAL,
        "world_size");
    CHK("world 65", ad_shm_attach(name, 65, 0, 1, 1.0, &h, &err), AD_EINVAL,
        "world_size");
    CHK("rank 2 of 2", ad_shm_attach(name, 2, 2, 0, 1.0, &h, &err), AD_EINVAL,
        "rank");
    CHK("rank -1", ad_shm_attach(name, 2, -1, 0, 1.0, &h, &err), AD_EINVAL,
        "rank");
    CHK("rank 0 not creating", ad_shm_attach(name, 2, 0, 0, 1.0, &h, &err),
        AD_EINVAL, "create");
    CHK("rank 1 creating", ad_shm_attach(name, 2, 1, 1, 1.0, &h, &err),
        AD_EINVAL, "create");
    CHK("NaN timeout", ad_shm_attach(name, 2, 0, 1, NAN, &h, &err), AD_EINVAL,
        "timeout_s");
    CHK("inf timeout", ad_shm_attach(name, 2, 0, 1, INFINITY, &h, &err),
        AD_EINVAL, "timeout_s");
    CHK("negative timeout", ad_shm_attach(name, 2, 0, 1, -1.0, &h, &err),
        AD_EINVAL, "timeout_s");
    if (h != NULL) {
        fprintf(stderr, "  args: handle returned on failure\n");
        bad++;
    }

    /* Nobody creates name2: attach times out in about the timeout. */
    t0 = now_s();
    ad_err_clear(&err);
    {
        ad_status st = ad_shm_attach(name2, 2, 1, 0, 0.2, &h, &err);
        dt = now_s() - t0;
        bad += expect("attach timeout", st, &err, AD_ETIMEDOUT, dt, 0.2, 0.4,
                      name2, "rank 0");
    }

    /* Two ranks of one world in this process (no collective calls). */
    CHK("create", ad_shm_attach(name, 2, 0, 1, 1.0, &h0, &err), AD_OK, NULL);
    CHK("create again", ad_shm_attach(name, 2, 0, 1, 1.0, &hx, &err), AD_EIO,
        "name");
    if (err.sys_errno != EEXIST) {
        fprintf(stderr, "  args: create again: errno %d\n", err.sys_errno);
        bad++;
    }
    CHK("world mismatch", ad_shm_attach(name, 3, 1, 0, 1.0, &hx, &err),
        AD_EINVAL, "world_size");
    CHK("open", ad_shm_attach(name, 2, 1, 0, 1.0, &h1, &err), AD_OK, NULL);
    CHK("rank twice", ad_shm_attach(name, 2, 1, 0, 1.0, &hx, &err), AD_ESTATE,
        "rank");
    CHK("unlink", ad_shm_unlink(name, &err), AD_OK, NULL);
    CHK("unlink again", ad_shm_unlink(name, &err), AD_OK, NULL);
    CHK("unlink bad name", ad_shm_unlink("x", &err), AD_EINVAL, "name");
    if (ad_shm_world(h1) != 2 || ad_shm_rank(h1) != 1 ||
        ad_shm_capacity(h1) != 0) {
        fprintf(stderr, "  args: world/rank/capacity accessors\n");
        bad++;
    }
    ad_shm_detach(h0, 0);
    ad_shm_detach(h1, 0);
    h0 = h1 = NULL;

    /* A world of one: reserve, publish and fetch without peers. */
    CHK("create w1", ad_shm_attach(name, 1, 0, 1, 1.0, &h, &err), AD_OK, NULL);
    CHK("NULL handle", ad_shm_barrier(NULL, 1.0, &err), AD_EINVAL, NULL);
    CHK("barrier w1", ad_shm_barrier(h, 1.0, &err), AD_OK, NULL);
    CHK("unlink w1", ad_shm_unlink(name, &err), AD_OK, NULL);
    it.offset = 0;
    it.ptr = in;
    it.nbytes = 0;
    CHK("empty item before reserve", ad_shm_publish(h, 1, &it, 1, 1.0, &err),
        AD_OK, NULL);
    it.nbytes = 1;
    CHK("item before reserve", ad_shm_publish(h, 2, &it, 1, 1.0, &err),
        AD_EINVAL, "items");
    CHK("reserve 100", ad_shm_reserve(h, 100, 1.0, &err), AD_OK, NULL);
    if (ad_shm_capacity(h) != 128) {
        fprintf(stderr, "  args: capacity %zu, want 128\n", ad_shm_capacity(h));
        bad++;
    }
    CHK("reserve smaller", ad_shm_reserve(h, 64, 1.0, &err), AD_OK, NULL);
    CHK("reserve huge", ad_shm_reserve(h, SIZE_MAX, 1.0, &err), AD_ENOMEM,
        "bytes");
    it.offset = 100;
    it.nbytes = 29;
    CHK("item past end", ad_shm_publish(h, 2, &it, 1, 1.0, &err), AD_EINVAL,
        "items");
    it.offset = SIZE_MAX;
    it.nbytes = 2;
    CHK("item offset overflow", ad_shm_publish(h, 2, &it, 1, 1.0, &err),
        AD_EINVAL, "items");
    it.offset = 0;
    it.ptr = NULL;
    CHK("NULL item ptr", ad_shm_publish(h, 2, &it, 1, 1.0, &err), AD_EINVAL,
        "items");
    CHK("NULL items", ad_shm_publish(h, 2, NULL, 1, 1.0, &err), AD_EINVAL,
        "items");
    CHK("seq 0", ad_shm_publish(h, 0, NULL, 0, 1.0, &err), AD_EINVAL, "seq");
    CHK("seq again", ad_shm_publish(h, 1, NULL, 0, 1.0, &err), AD_EINVAL,
        "seq");
    CHK("fetch src 1", ad_shm_fetch(h, 1, 1, NULL, 0, 1.0, &err), AD_EINVAL,
        "src");
    CHK("fetch seq 0", ad_shm_fetch(h, 0, 0, NULL, 0, 1.0, &err), AD_EINVAL,
        "seq");
    CHK("fetch NaN timeout", ad_shm_fetch(h, 1, 0, NULL, 0, NAN, &err),
        AD_EINVAL, "timeout_s");
    for (int i = 0; i < 128; i++)
        in[i] = (unsigned char)(i * 3 + 1);
    it.offset = 0;
    it.ptr = in;
    it.nbytes = 128;
    CHK("publish 2", ad_shm_publish(h, 2, &it, 1, 1.0, &err), AD_OK, NULL);
    it.ptr = in + 7;
    it.offset = 5;
    it.nbytes = 100;
    CHK("publish 3", ad_shm_publish(h, 3, &it, 1, 1.0, &err), AD_OK, NULL);
    /* A growing reserve keeps what was published. */
    CHK("reserve 1000", ad_shm_reserve(h, 1000, 1.0, &err), AD_OK, NULL);
    it.ptr = out;
    it.offset = 0;
    it.nbytes = 128;
    memset(out, 0, sizeof out);
    CHK("fetch own 2", ad_shm_fetch(h, 2, 0, &it, 1, 1.0, &err), AD_OK, NULL);
    if (memcmp(out, in, 128) != 0) {
        fprintf(stderr, "  args: event 2 lost across reserve\n");
        bad++;
    }
    it.offset = 5;
    it.nbytes = 100;
    CHK("fetch own 3", ad_shm_fetch(h, 3, 0, &it, 1, 1.0, &err), AD_OK, NULL);
    if (memcmp(out, in + 7, 100) != 0) {
        fprintf(stderr, "  args: event 3 lost across reserve\n");
        bad++;
    }
    /* Skip event 4: fetching it must fail instead of giving old bytes. */
    it.offset = 0;
    it.nbytes = 16;
    CHK("publish 5", ad_shm_publish(h, 5, &it, 1, 1.0, &err), AD_OK, NULL);
    CHK("fetch skipped 4", ad_shm_fetch(h, 4, 0, &it, 1, 1.0, &err),
        AD_ESTATE, "seq");
    ad_shm_ack(NULL, 3);
    ad_shm_ack(h, 3);
    ad_shm_detach(h, 0);
    ad_shm_detach(NULL, 0);
#undef CHK
    report("arguments", bad == 0, NULL);
}

/* ------------------------------------------------------------------------ */
/* Bandwidth                                                                 */
/* ------------------------------------------------------------------------ */

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
                t0 = now_s();
            }
            seq++;
            if (rank == 0) {
                if (ad_shm_publish(h, seq, &it, 1, 30.0, &err) != AD_OK)
                    CFAIL("publish: %s", err.msg);
            } else {
                if (ad_shm_fetch(h, seq, 0, &it, 1, 30.0, &err) != AD_OK ||
                    ad_shm_publish(h, seq, NULL, 0, 30.0, &err) != AD_OK)
                    CFAIL("fetch: %s", err.msg);
            }
        }
        if (rank == 1) {
            double dt = now_s() - t0;
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

static int bench(int quick)
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
        double t0 = now_s(), dt;
        for (int i = 0; i < iters; i++) {
            memcpy(b, a, size);
            /* keep the copy from being optimised away */
            __asm__ __volatile__("" : : "r"(b) : "memory");
        }
        dt = now_s() - t0;
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

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    snprintf(g_prefix, sizeof g_prefix, "asyncdiff-test-%d-", (int)getpid());
    setvbuf(stdout, NULL, _IOLBF, 0);

    if (argc > 1 && strcmp(argv[1], "bench") == 0)
        return bench(argc > 2 && strcmp(argv[2], "quick") == 0);
    if (argc > 1) {
        fprintf(stderr, "usage: %s [bench [quick]]\n", argv[0]);
        return 2;
    }

    test_args();
    test_exchange(2, 300);
    test_exchange(3, 200);
    test_exchange(5, 150);
    test_exchange(16, 24);
    test_timeout();
    test_exit();
    test_kill();
    test_detach(0);
    test_detach(1);
    report("no_leftover_segments", leftover_segments() == 0, NULL);

    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
