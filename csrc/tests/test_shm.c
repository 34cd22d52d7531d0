/*
 * test_shm.c -- multi-process tests and a bandwidth benchmark for the
 * shared-memory transport (csrc/shm.c, csrc/shm_data.c):
 *
 *   test_shm               run every test, print "N passed, M failed"
 *   test_shm bench         bandwidth of publish+fetch between 2 processes
 *   test_shm bench quick   the same with few iterations (smoke test)
 *
 * This file: main, the random exchange between W ranks and the argument
 * checks.  test_shm_peers.c: timeouts and peers that go away;
 * test_shm_records.c: error records, heartbeat, tags, all-gather, reserve
 * cleanup; test_shm_bench.c: the benchmark; shm_test.c: the shared harness.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm_test.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* The tag every rank gives event seq: (pipeline call, denoiser call) made
 * up from seq, so that the exchange carries tags other than 0. */
static uint64_t xtag(uint64_t seq)
{
    return ((seq / 7 + 1) << 32) | (seq % 7);
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
    st = ad_shm_fetch(h, seq, src, xtag(seq), items, (size_t)n, 10.0, &err);
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
        st = ad_shm_publish(h, seq, xtag(seq), items, (size_t)cur->n[rank], 10.0,
                            &err);
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

void test_exchange(int world, int events)
{
    char test[64], detail[96];
    xchg_arg a;
    double t0 = check_now();
    int ok;
    snprintf(test, sizeof test, "exchange_w%d", world);
    a.events = events;
    a.seed = UINT64_C(0x5eed) * (uint64_t)world + 17;
    ok = run_ranks(test, world, rank_exchange, &a, -1, -1);
    snprintf(detail, sizeof detail, "%d events, %.2f s", events, check_now() - t0);
    check_report(test, ok, detail);
}

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

void test_args(void)
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
    t0 = check_now();
    ad_err_clear(&err);
    {
        ad_status st = ad_shm_attach(name2, 2, 1, 0, 0.2, &h, &err);
        dt = check_now() - t0;
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
    ad_shm_set_busy(NULL, 1);
    ad_shm_fail(NULL, "ignored");
    {
        unsigned char all[AD_SHM_MAX_RECORD];
        size_t lens[1] = {99};
        CHK("allgather w1", ad_shm_allgather(h, "abc", 3, all, lens, 1.0, &err),
            AD_OK, NULL);
        if (lens[0] != 3 || memcmp(all, "abc", 3) != 0) {
            fprintf(stderr, "  args: allgather w1 gave %zu bytes\n", lens[0]);
            bad++;
        }
        CHK("allgather NULL record", ad_shm_allgather(h, NULL, 3, all, lens, 1.0, &err),
            AD_EINVAL, "record");
        CHK("allgather too long", ad_shm_allgather(h, all, AD_SHM_MAX_RECORD + 1, all,
                                                   lens, 1.0, &err), AD_EINVAL, "record");
        CHK("allgather NULL out", ad_shm_allgather(h, "abc", 3, NULL, lens, 1.0, &err),
            AD_EINVAL, "all");
        CHK("allgather NaN timeout", ad_shm_allgather(h, "abc", 3, all, lens, NAN, &err),
            AD_EINVAL, "timeout_s");
    }
    ad_shm_set_busy(h, 1);
    ad_shm_set_busy(h, 0);
    CHK("barrier w1", ad_shm_barrier(h, 1.0, &err), AD_OK, NULL);
    CHK("unlink w1", ad_shm_unlink(name, &err), AD_OK, NULL);
    it.offset = 0;
    it.ptr = in;
    it.nbytes = 0;
    CHK("empty item before reserve", ad_shm_publish(h, 1, 0, &it, 1, 1.0, &err),
        AD_OK, NULL);
    it.nbytes = 1;
    CHK("item before reserve", ad_shm_publish(h, 2, 0, &it, 1, 1.0, &err),
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
    CHK("item past end", ad_shm_publish(h, 2, 0, &it, 1, 1.0, &err), AD_EINVAL,
        "items");
    it.offset = SIZE_MAX;
    it.nbytes = 2;
    CHK("item offset overflow", ad_shm_publish(h, 2, 0, &it, 1, 1.0, &err),
        AD_EINVAL, "items");
    it.offset = 0;
    it.ptr = NULL;
    CHK("NULL item ptr", ad_shm_publish(h, 2, 0, &it, 1, 1.0, &err), AD_EINVAL,
        "items");
    CHK("NULL items", ad_shm_publish(h, 2, 0, NULL, 1, 1.0, &err), AD_EINVAL,
        "items");
    CHK("seq 0", ad_shm_publish(h, 0, 0, NULL, 0, 1.0, &err), AD_EINVAL, "seq");
    CHK("seq again", ad_shm_publish(h, 1, 0, NULL, 0, 1.0, &err), AD_EINVAL,
        "seq");
    CHK("fetch src 1", ad_shm_fetch(h, 1, 1, 0, NULL, 0, 1.0, &err), AD_EINVAL,
        "src");
    CHK("fetch seq 0", ad_shm_fetch(h, 0, 0, 0, NULL, 0, 1.0, &err), AD_EINVAL,
        "seq");
    CHK("fetch NaN timeout", ad_shm_fetch(h, 1, 0, 0, NULL, 0, NAN, &err),
        AD_EINVAL, "timeout_s");
    for (int i = 0; i < 128; i++)
        in[i] = (unsigned char)(i * 3 + 1);
    it.offset = 0;
    it.ptr = in;
    it.nbytes = 128;
    CHK("publish 2", ad_shm_publish(h, 2, 0, &it, 1, 1.0, &err), AD_OK, NULL);
    it.ptr = in + 7;
    it.offset = 5;
    it.nbytes = 100;
    CHK("publish 3", ad_shm_publish(h, 3, 0, &it, 1, 1.0, &err), AD_OK, NULL);
    /* A growing reserve keeps what was published. */
    CHK("reserve 1000", ad_shm_reserve(h, 1000, 1.0, &err), AD_OK, NULL);
    it.ptr = out;
    it.offset = 0;
    it.nbytes = 128;
    memset(out, 0, sizeof out);
    CHK("fetch own 2", ad_shm_fetch(h, 2, 0, 0, &it, 1, 1.0, &err), AD_OK, NULL);
    if (memcmp(out, in, 128) != 0) {
        fprintf(stderr, "  args: event 2 lost across reserve\n");
        bad++;
    }
    it.offset = 5;
    it.nbytes = 100;
    CHK("fetch own 3", ad_shm_fetch(h, 3, 0, 0, &it, 1, 1.0, &err), AD_OK, NULL);
    if (memcmp(out, in + 7, 100) != 0) {
        fprintf(stderr, "  args: event 3 lost across reserve\n");
        bad++;
    }
    /* Skip event 4: fetching it must fail instead of giving old bytes. */
    it.offset = 0;
    it.nbytes = 16;
    CHK("publish 5", ad_shm_publish(h, 5, 0, &it, 1, 1.0, &err), AD_OK, NULL);
    CHK("fetch skipped 4", ad_shm_fetch(h, 4, 0, 0, &it, 1, 1.0, &err),
        AD_ESTATE, "seq");
    ad_shm_ack(NULL, 3);
    ad_shm_ack(h, 3);
    ad_shm_detach(h, 0);
    ad_shm_detach(NULL, 0);
#undef CHK
    check_report("arguments", bad == 0, NULL);
}

int main(int argc, char **argv)
{
    shm_test_init();
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
    test_fail_record();
    test_fail_any();
    test_heartbeat();
    test_chain();
    test_tags();
    test_allgather();
    test_allgather_mismatch();
    test_reserve_kill();
    check_report("no_leftover_segments", leftover_segments() == 0, NULL);
    return check_summary();
}
