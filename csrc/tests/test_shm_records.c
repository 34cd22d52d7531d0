/*
 * test_shm_records.c -- test_shm's tests of what ranks tell each other
 * besides events: error records (ad_shm_fail), the heartbeat that makes a
 * timeout bound silence (ad_shm_set_busy; a stopped rank still times out),
 * event tags (a rank out of step fails on both sides), the all-gather, and
 * the cleanup of a reserve whose rank 0 is killed midway.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm_test.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

/* 0 when the failed wait names rank `peer` in err->peer, else 1. */
static int expect_peer(const char *what, const ad_err *err, int peer)
{
    if (err->peer != peer) {
        fprintf(stderr, "  %s: err.peer is %d, want %d (%s)\n", what,
                err->peer, peer, err->msg);
        return 1;
    }
    return 0;
}

/* In one process, two ranks of one world: the failure message of rank 1
 * reaches rank 0's wait, cut to AD_SHM_MAX_ERROR bytes at a character
 * boundary; the first failure's message is kept; the failed handle refuses
 * further calls. */
void test_fail_record(void)
{
    char name[96], longmsg[512];
    ad_shm *h0 = NULL, *h1 = NULL;
    ad_err err = {0};
    ad_status st;
    const char *tail;
    double t0, dt;
    int bad = 0;

    make_name(name, sizeof name);
    if (ad_shm_attach(name, 2, 0, 1, 1.0, &h0, &err) != AD_OK ||
        ad_shm_attach(name, 2, 1, 0, 1.0, &h1, &err) != AD_OK ||
        ad_shm_unlink(name, &err) != AD_OK) {
        fprintf(stderr, "  fail_record: setup: %s\n", err.msg);
        bad++;
        goto out;
    }
    /* 200 two-byte characters: byte 255 continues a character, so the
     * record keeps 254 bytes (127 whole characters). */
    longmsg[0] = '\0';
    for (int i = 0; i < 200; i++)
        strcat(longmsg, "\xc3\xa9");
    ad_shm_fail(h1, longmsg);
    ad_shm_fail(h1, "a second failure must not replace the first message");
    t0 = check_now();
    st = ad_shm_fetch(h0, 1, 1, 0, NULL, 0, 5.0, &err);
    dt = check_now() - t0;
    bad += expect("fetch from failed rank", st, &err, AD_EPEERGONE, dt, 0.0,
                  0.1, "fetch: rank 1 failed: \xc3\xa9", NULL);
    bad += expect_peer("fetch from failed rank", &err, 1);
    tail = strstr(err.msg, "failed: ");
    if (tail == NULL || strlen(tail + 8) != 254 ||
        strcmp(tail + 8 + 252, "\xc3\xa9") != 0) {
        fprintf(stderr, "  fail_record: kept %zu bytes of the message, want "
                "254\n", tail ? strlen(tail + 8) : 0);
        bad++;
    }
    ad_err_clear(&err);
    st = ad_shm_barrier(h1, 1.0, &err);
    bad += expect("call on a failed handle", st, &err, AD_ESTATE, 0.0, 0.0,
                  1.0, "unusable", "\xc3\xa9");
    /* A normal detach after fail keeps the rank failed, with its message. */
    ad_shm_detach(h1, 0);
    h1 = NULL;
    st = ad_shm_barrier(h0, 5.0, &err);
    bad += expect("barrier after the failed rank left", st, &err,
                  AD_EPEERGONE, 0.0, 0.0, 1.0, "barrier: rank 1 failed: ",
                  NULL);
out:
    ad_shm_detach(h0, 0);
    ad_shm_detach(h1, 1);
    check_report("fail_record", bad == 0, NULL);
}

/* W=3: rank 2 fails with a message while rank 1 waits for it and rank 0
 * waits for rank 1 (not for rank 2): both learn it within milliseconds. */
static int rank_fail_any(const char *test, const char *name, int world,
                         int rank, void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    if (rank == 2) {
        nap_us(100000);
        ad_shm_fail(h, "ValueError: warm_up: rank 0 has 1, rank 2 has 2");
        nap_us(500000); /* still attached while the others notice */
        goto out;
    }
    t0 = check_now();
    st = ad_shm_fetch(h, 1, rank == 0 ? 1 : 2, 0, NULL, 0, 10.0, &err);
    dt = check_now() - t0;
    if (expect("wait while a rank fails", st, &err, AD_EPEERGONE, dt, 0.05,
               0.4, "fetch: rank 2 failed: ValueError: warm_up: rank 0 has 1",
               NULL) ||
        expect_peer("wait while a rank fails", &err, 2))
        CFAIL("failure of rank 2 not reported");
    fprintf(stderr, "  [%s rank %d] detected in %.1f ms: %s\n", test, rank,
            (dt - 0.1) * 1e3, err.msg);
    if (rank == 1)
        nap_us(300000); /* let rank 0 see rank 2 before it sees us leave */
out:
    ad_shm_detach(h, rc != 0);
    return rc;
}

void test_fail_any(void)
{
    check_report("fail_any_rank",
                 run_ranks("fail_any_rank", 3, rank_fail_any, NULL, -1, -1),
                 NULL);
}

/*
 * W=2, rank 1 publishes events 1..3 late; rank 0 waits with timeout 0.3 s:
 *   1: rank 1 not busy, sleeps 0.6 s: rank 0 times out after ~0.3 s;
 *   2: rank 1 busy, sleeps 1.0 s: rank 0 waits the whole second;
 *   3: rank 1 busy but SIGSTOPped: rank 0 times out after ~0.3 s of
 *      silence, then sends SIGCONT (rank 1's pid came with event 2).
 */
static int rank_heartbeat(const char *test, const char *name, int world,
                          int rank, void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    pid_t pid = getpid();
    ad_shm_item it = {0, &pid, sizeof pid};
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    if (ad_shm_reserve(h, 64, 10.0, &err) != AD_OK)
        CFAIL("reserve: %s", err.msg);
    if (rank == 1) {
        nap_us(600000);
        if (ad_shm_publish(h, 1, 0, NULL, 0, 10.0, &err) != AD_OK)
            CFAIL("publish 1: %s", err.msg);
        ad_shm_set_busy(h, 1);
        nap_us(1000000);
        if (ad_shm_publish(h, 2, 0, &it, 1, 10.0, &err) != AD_OK)
            CFAIL("publish 2: %s", err.msg);
        /* Stop only once rank 0 holds our pid (its event 2 says so): it
         * sends SIGCONT, on every path. */
        if (ad_shm_fetch(h, 2, 0, 0, NULL, 0, 10.0, &err) != AD_OK)
            CFAIL("fetch 2: %s", err.msg);
        raise(SIGSTOP);
        if (ad_shm_publish(h, 3, 0, NULL, 0, 10.0, &err) != AD_OK)
            CFAIL("publish 3: %s", err.msg);
        ad_shm_set_busy(h, 0);
        goto done;
    }
    t0 = check_now();
    st = ad_shm_fetch(h, 1, 1, 0, NULL, 0, 0.3, &err);
    dt = check_now() - t0;
    if (expect("idle peer", st, &err, AD_ETIMEDOUT, dt, 0.3, 0.5, "rank 1",
               "silent"))
        CFAIL("an idle peer must time out");
    if (ad_shm_fetch(h, 1, 1, 0, NULL, 0, 10.0, &err) != AD_OK)
        CFAIL("fetch 1: %s", err.msg);
    t0 = check_now();
    pid = 0;
    st = ad_shm_fetch(h, 2, 1, 0, &it, 1, 0.3, &err);
    dt = check_now() - t0;
    if (st != AD_OK || dt < 0.8)
        CFAIL("busy peer: %s after %.3f s (%s), want ok after ~1 s",
              ad_status_name(st), dt, err.msg);
    fprintf(stderr, "  [%s rank 0] waited %.2f s for a busy peer with "
            "timeout 0.3 s\n", test, dt);
    if (ad_shm_publish(h, 2, 0, NULL, 0, 10.0, &err) != AD_OK)
        CFAIL("publish 2: %s", err.msg);
    ad_shm_ack(h, 2);
    t0 = check_now();
    st = ad_shm_fetch(h, 3, 1, 0, NULL, 0, 0.3, &err);
    dt = check_now() - t0;
    kill(pid, SIGCONT);
    if (expect("stopped peer", st, &err, AD_ETIMEDOUT, dt, 0.3, 0.5,
               "rank 1 has been silent", NULL))
        CFAIL("a stopped peer must time out");
    fprintf(stderr, "  [%s rank 0] stopped peer detected in %.3f s: %s\n",
            test, dt, err.msg);
    if (ad_shm_fetch(h, 3, 1, 0, NULL, 0, 10.0, &err) != AD_OK)
        CFAIL("fetch 3 after SIGCONT: %s", err.msg);
done:
    if (ad_shm_barrier(h, 10.0, &err) != AD_OK)
        CFAIL("final barrier: %s", err.msg);
out:
    if (rc != 0 && rank == 0 && pid > 0 && pid != getpid())
        kill(pid, SIGCONT);
    ad_shm_detach(h, rc != 0);
    return rc;
}

void test_heartbeat(void)
{
    double t0 = check_now();
    char detail[64];
    int ok = run_ranks("heartbeat", 2, rank_heartbeat, NULL, -1, -1);
    snprintf(detail, sizeof detail, "%.2f s", check_now() - t0);
    check_report("heartbeat", ok, detail);
}

/* W=3, every rank busy.  Part 1, a chain: rank 2 computes for 1 s, rank 1
 * waits for rank 2, rank 0 waits for rank 1 with a 0.3 s timeout: rank 0
 * must wait the whole second (rank 1 waits for a rank that makes
 * progress).  Part 2, a cycle: ranks 0 and 1 wait for each other's event 2
 * (rank 2 waits for both): all three fail after ~0.3 s although every one
 * of them beats -- by timing out, or through the record of the first one
 * that did. */
static int rank_chain(const char *test, const char *name, int world, int rank,
                      void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    ad_shm_set_busy(h, 1);
    t0 = check_now();
    if (rank == 2) {
        nap_us(1000000);
        st = ad_shm_publish(h, 1, 0, NULL, 0, 10.0, &err);
    } else {
        st = ad_shm_fetch(h, 1, rank + 1, 0, NULL, 0, rank == 0 ? 0.3 : 10.0,
                          &err);
        if (st == AD_OK && rank == 1)
            st = ad_shm_publish(h, 1, 0, NULL, 0, 10.0, &err);
    }
    dt = check_now() - t0;
    if (st != AD_OK || (rank < 2 && dt < 0.9))
        CFAIL("chain: %s after %.3f s (%s), want ok after ~1 s",
              ad_status_name(st), dt, err.msg);
    if (rank == 0)
        fprintf(stderr, "  [%s rank 0] waited %.2f s (timeout 0.3 s) for "
                "rank 1, which waited for busy rank 2\n", test, dt);
    if (ad_shm_barrier(h, 10.0, &err) != AD_OK)
        CFAIL("barrier: %s", err.msg);
    t0 = check_now();
    if (rank == 2)
        st = ad_shm_barrier(h, 0.3, &err);
    else
        st = ad_shm_fetch(h, 2, 1 - rank, 0, NULL, 0, 0.3, &err);
    dt = check_now() - t0;
    /* A rank that fails leaves its message (as the binding's caller does):
     * the first to see the cycle times out, the others may learn it from
     * its record (or from the record of one that learnt it). */
    if (st != AD_OK)
        ad_shm_fail(h, err.msg);
    if ((st != AD_ETIMEDOUT && st != AD_EPEERGONE) ||
        expect("ranks waiting for each other", st, &err, st, dt, 0.3, 0.6,
               "waiting for each other", NULL))
        CFAIL("a cycle of busy ranks must time out (%s: %s)",
              ad_status_name(st), err.msg);
    if (rank == 0)
        fprintf(stderr, "  [%s rank 0] cycle detected in %.3f s: %s\n", test,
                dt, err.msg);
out:
    ad_shm_detach(h, rc != 0);
    return rc;
}

void test_chain(void)
{
    check_report("wait_chain_and_cycle",
                 run_ranks("wait_chain_and_cycle", 3, rank_chain, NULL, -1, -1),
                 NULL);
}

#define TAG(call, k) (((uint64_t)(call) << 32) | (uint64_t)(k))

/* W=2: events 1..3 agree; at event 4 rank 1 is one denoiser call ahead.
 * Rank 0's fetch fails naming both identities; rank 1, waiting for rank
 * 0's next event, learns it at once through rank 0's error record. */
static int rank_tags(const char *test, const char *name, int world, int rank,
                     void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    unsigned char b = 0;
    ad_shm_item it = {(size_t)rank, &b, 1};
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    if (ad_shm_reserve(h, 64, 10.0, &err) != AD_OK)
        CFAIL("reserve: %s", err.msg);
    for (uint64_t seq = 1; seq <= 4; seq++) {
        uint64_t k = seq == 4 && rank == 1 ? 4 : 3;
        ad_shm_item in = {(size_t)(1 - rank), &b, 1};
        if (ad_shm_publish(h, seq, TAG(2, seq < 4 ? seq : k), &it, 1, 10.0,
                           &err) != AD_OK)
            CFAIL("publish %llu: %s", (unsigned long long)seq, err.msg);
        if (seq == 4)
            break;
        if (ad_shm_fetch(h, seq, 1 - rank, TAG(2, seq), &in, 1, 10.0, &err) !=
            AD_OK)
            CFAIL("fetch %llu: %s", (unsigned long long)seq, err.msg);
    }
    t0 = check_now();
    if (rank == 0)
        st = ad_shm_fetch(h, 4, 1, TAG(2, 3), NULL, 0, 10.0, &err);
    else
        st = ad_shm_fetch(h, 5, 0, TAG(2, 5), NULL, 0, 10.0, &err);
    dt = check_now() - t0;
    if (rank == 0 &&
        expect("fetch out of step", st, &err, AD_ESTATE, dt, 0.0, 1.0,
               "exchange out of step: rank 1 sent event 4 as pipeline call 2, "
               "denoiser call 4; rank 0 expected pipeline call 2, denoiser "
               "call 3 (the ranks were given different arguments)", NULL))
        CFAIL("tag mismatch not reported");
    if (rank == 1 &&
        (expect("peer out of step", st, &err, AD_EPEERGONE, dt, 0.0, 1.0,
                "fetch: rank 0 failed: exchange out of step: rank 1 sent "
                "event 4", NULL) ||
         expect_peer("peer out of step", &err, 0)))
        CFAIL("tag mismatch not reported to the peer");
out:
    ad_shm_detach(h, 1);
    return rc;
}

void test_tags(void)
{
    check_report("event_tags", run_ranks("event_tags", 2, rank_tags, NULL, -1, -1),
                 NULL);
}

typedef struct gather_arg {
    int rounds;
    double *per_call_us; /* bench: rank 0's figure, in shared memory */
} gather_arg;

/* Rank r's record of round k: 0 bytes, AD_SHM_MAX_RECORD bytes or some
 * length in between, different per rank in every round. */
static size_t gather_len(int k, int r)
{
    switch ((k + r) % 3) {
    case 0: return 0;
    case 1: return AD_SHM_MAX_RECORD;
    default: return (size_t)((37 * k + 11 * r) % AD_SHM_MAX_RECORD);
    }
}

/* W ranks, `rounds` all-gathers with records of varying lengths, a plain
 * barrier and a reserve mixed in; every byte checked.  Then, for timing,
 * 2000 empty-ish all-gathers back to back. */
static int rank_gather(const char *test, const char *name, int world, int rank,
                       void *varg)
{
    const gather_arg *a = varg;
    ad_shm *h = join(test, name, world, rank);
    unsigned char mine[AD_SHM_MAX_RECORD + 1], want[AD_SHM_MAX_RECORD + 1];
    unsigned char *all = malloc((size_t)world * AD_SHM_MAX_RECORD);
    size_t lens[AD_SHM_MAX_WORLD];
    ad_err err = {0};
    ad_status st;
    int rc = 0;

    if (h == NULL || all == NULL)
        CFAIL("setup failed");
    for (int k = 1; k <= a->rounds; k++) {
        size_t n = gather_len(k, rank);
        fill_pattern(mine, n, key4(0x9a, (uint64_t)k, (uint64_t)rank, 0));
        memset(all, 0xee, (size_t)world * AD_SHM_MAX_RECORD);
        st = ad_shm_allgather(h, mine, n, all, lens, 10.0, &err);
        if (st != AD_OK)
            CFAIL("allgather %d: %s", k, err.msg);
        for (int r = 0; r < world; r++) {
            size_t m = gather_len(k, r);
            fill_pattern(want, m, key4(0x9a, (uint64_t)k, (uint64_t)r, 0));
            if (lens[r] != m ||
                memcmp(all + (size_t)r * AD_SHM_MAX_RECORD, want, m) != 0)
                CFAIL("allgather %d: rank %d's record: %zu bytes, want %zu%s",
                      k, r, lens[r], m, lens[r] == m ? " (bytes differ)" : "");
        }
        if (k % 5 == 0 && ad_shm_barrier(h, 10.0, &err) != AD_OK)
            CFAIL("barrier: %s", err.msg);
        if (k % 7 == 0 &&
            ad_shm_reserve(h, (size_t)k * 1000, 10.0, &err) != AD_OK)
            CFAIL("reserve: %s", err.msg);
    }
    st = ad_shm_allgather(h, mine, AD_SHM_MAX_RECORD + 1, all, lens, 10.0, &err);
    if (st != AD_EINVAL || strcmp(err.arg ? err.arg : "", "record") != 0)
        CFAIL("a 257-byte record: %s (%s)", ad_status_name(st), err.msg);
    if (a->per_call_us != NULL) {
        const int n = 2000;
        double t0;
        if (ad_shm_barrier(h, 10.0, &err) != AD_OK)
            CFAIL("barrier: %s", err.msg);
        t0 = check_now();
        for (int k = 0; k < n; k++) {
            memcpy(mine, &k, sizeof k);
            if (ad_shm_allgather(h, mine, 64, all, lens, 10.0, &err) != AD_OK)
                CFAIL("timed allgather %d: %s", k, err.msg);
        }
        if (rank == 0)
            *a->per_call_us = (check_now() - t0) / n * 1e6;
    }
out:
    free(all);
    ad_shm_detach(h, rc != 0);
    return rc;
}

void test_allgather(void)
{
    gather_arg a = {60, NULL};
    char detail[96];
    double *us = mmap(NULL, sizeof *us, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int ok;

    ok = run_ranks("allgather_w3", 3, rank_gather, &a, -1, -1);
    check_report("allgather_w3", ok, "60 rounds");
    if (us == MAP_FAILED) {
        check_report("allgather_w2", 0, "mmap failed");
        return;
    }
    *us = -1.0;
    a.rounds = 20;
    a.per_call_us = us;
    ok = run_ranks("allgather_w2", 2, rank_gather, &a, -1, -1);
    snprintf(detail, sizeof detail, "%.1f us per 64-byte all-gather", *us);
    check_report("allgather_w2", ok && *us > 0.0, detail);
    munmap(us, sizeof *us);
}

/* W=2, collectives out of step: rank 0 all-gathers while rank 1 is in a
 * plain barrier.  Rank 0 finds rank 1's record stale and fails; rank 1's
 * next barrier learns it. */
static int rank_gather_mismatch(const char *test, const char *name, int world,
                                int rank, void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    unsigned char all[2 * AD_SHM_MAX_RECORD];
    size_t lens[2];
    ad_err err = {0};
    ad_status st;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    if (rank == 0) {
        st = ad_shm_allgather(h, "x", 1, all, lens, 10.0, &err);
        if (expect("allgather against a barrier", st, &err, AD_ESTATE, 0.0,
                   0.0, 10.0, "out of step", "rank 1"))
            CFAIL("mismatched collectives not reported");
    } else {
        if (ad_shm_barrier(h, 10.0, &err) != AD_OK)
            CFAIL("barrier: %s", err.msg);
        st = ad_shm_barrier(h, 10.0, &err);
        if (expect("barrier after peer failed", st, &err, AD_EPEERGONE, 0.0,
                   0.0, 10.0, "rank 0 failed: allgather: ranks out of step",
                   NULL))
            CFAIL("peer's failure not reported");
    }
out:
    ad_shm_detach(h, 1);
    return rc;
}

void test_allgather_mismatch(void)
{
    check_report("allgather_out_of_step",
                 run_ranks("allgather_out_of_step", 2, rank_gather_mismatch,
                           NULL, -1, -1), NULL);
}

/* W=2: rank 1 reserves; rank 0 meets it in the first barrier (its own
 * reserve would), creates the data segment name the reserve makes and is
 * SIGKILLed before publishing it.  Rank 1 must report rank 0's death and
 * leave nothing in /dev/shm (before, only rank 0 removed that name). */
static int rank_reserve_kill(const char *test, const char *name, int world,
                             int rank, void *arg)
{
    ad_shm *h = join(test, name, world, rank);
    char dname[160], path[192];
    ad_err err = {0};
    ad_status st;
    double t0, dt;
    int rc = 0;
    (void)arg;

    if (h == NULL)
        CFAIL("join failed");
    snprintf(dname, sizeof dname, "%s-d1", name);
    snprintf(path, sizeof path, "/dev/shm%s", dname);
    if (rank == 0) {
        int fd;
        if (ad_shm_barrier(h, 10.0, &err) != AD_OK)
            CFAIL("barrier: %s", err.msg);
        fd = shm_open(dname, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0 || ftruncate(fd, 4096) != 0)
            CFAIL("shm_open(%s)", dname);
        kill(getpid(), SIGKILL);
    }
    t0 = check_now();
    st = ad_shm_reserve(h, 2048, 10.0, &err);
    dt = check_now() - t0;
    if (expect("reserve while rank 0 dies", st, &err, AD_EPEERGONE, dt, 0.0,
               1.0, "rank 0 has died", NULL) ||
        expect_peer("reserve while rank 0 dies", &err, 0))
        CFAIL("death of rank 0 during reserve not reported");
    if (access(path, F_OK) == 0)
        CFAIL("%s was left behind", path);
out:
    ad_shm_detach(h, 1);
    return rc;
}

void test_reserve_kill(void)
{
    check_report("reserve_rank0_killed",
                 run_ranks("reserve_rank0_killed", 2, rank_reserve_kill, NULL,
                           -1, 0), NULL);
}
