/*
 * test_shm_peers.c -- test_shm's tests of waits that cannot succeed:
 * timeouts, and peers that exit, are SIGKILLed or detach while others wait
 * for them (every such wait must fail at once, naming the rank).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm_test.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

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
    t0 = check_now();
    st = ad_shm_fetch(h, 1, 1, 0, &it, 1, 0.3, &err);
    dt = check_now() - t0;
    if (expect("fetch timeout", st, &err, AD_ETIMEDOUT, dt, 0.3, 0.6,
               "rank 1", "event 1"))
        CFAIL("fetch timeout check failed");
    /* Events 1 and 2 use fresh buffers; event 3 needs rank 1 to have read
     * event 1, which it never acknowledges. */
    if (ad_shm_publish(h, 1, 0, &it, 1, 0.3, &err) != AD_OK ||
        ad_shm_publish(h, 2, 0, &it, 1, 0.3, &err) != AD_OK)
        CFAIL("publish 1/2: %s", err.msg);
    t0 = check_now();
    st = ad_shm_publish(h, 3, 0, &it, 1, 0.2, &err);
    dt = check_now() - t0;
    if (expect("publish timeout", st, &err, AD_ETIMEDOUT, dt, 0.2, 0.4,
               "rank 1", "acknowledge"))
        CFAIL("publish timeout check failed");
    /* timeout 0 means "test once". */
    t0 = check_now();
    st = ad_shm_fetch(h, 5, 1, 0, &it, 1, 0.0, &err);
    dt = check_now() - t0;
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

void test_timeout(void)
{
    check_report("timeout", run_ranks("timeout", 2, rank_timeout, NULL, -1, -1),
           NULL);
}

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
        if (ad_shm_publish(h, seq, 0, &it, 1, 10.0, &err) != AD_OK)
            CFAIL("publish %llu: %s", (unsigned long long)seq, err.msg);
        for (int s = 0; s < world; s++) {
            ad_shm_item in = {(size_t)s * 1024, theirs, sizeof theirs};
            if (s == rank)
                continue;
            if (ad_shm_fetch(h, seq, s, 0, &in, 1, 10.0, &err) != AD_OK)
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
    t0 = check_now();
    if (rank == 0)
        st = ad_shm_fetch(h, 6, 2, 0, &it, 1, 10.0, &err);
    else
        st = ad_shm_barrier(h, 10.0, &err);
    dt = check_now() - t0;
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

void test_exit(void)
{
    check_report("peer_exit", run_ranks("peer_exit", 3, rank_exit, NULL, 2, -1),
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
    if (ad_shm_publish(h, 6, 0, &it, 1, 10.0, &err) != AD_OK)
        CFAIL("publish 6: %s", err.msg);
    t0 = check_now();
    st = ad_shm_fetch(h, 6, 1, 0, &it, 1, 10.0, &err);
    dt = check_now() - t0;
    if (expect("fetch from killed peer", st, &err, AD_EPEERGONE, dt, 0.0, 1.0,
               "rank 1", "zombie"))
        CFAIL("killed peer not detected in fetch");
    fprintf(stderr, "  [%s rank %d] detected in %.1f ms: %s\n", test, rank,
            dt * 1e3, err.msg);
    t0 = check_now();
    st = ad_shm_publish(h, 7, 0, &it, 1, 10.0, &err);
    dt = check_now() - t0;
    if (expect("publish with killed peer", st, &err, AD_EPEERGONE, dt, 0.0,
               1.0, "rank 1", "acknowledge"))
        CFAIL("killed peer not detected in publish");
out:
    ad_shm_detach(h, 1);
    return rc;
}

void test_kill(void)
{
    check_report("peer_sigkill", run_ranks("peer_sigkill", 2, rank_kill, NULL, -1, 1),
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
        if (ad_shm_publish(h, 3, 0, &mine, 1, 10.0, &err) != AD_OK)
            CFAIL("publish 3: %s", err.msg);
        ad_shm_detach(h, failed);
        h = NULL;
        goto out;
    }
    nap_us(100000); /* rank 1 is gone by now */
    if (!failed) {
        ad_shm_item in = {1024, buf, sizeof buf};
        memset(buf, 0, sizeof buf);
        st = ad_shm_fetch(h, 3, 1, 0, &in, 1, 1.0, &err);
        if (st != AD_OK || buf[0] != 0xab || buf[63] != 0xab)
            CFAIL("event 3 of a rank that left normally: %s %s",
                  ad_status_name(st), err.msg);
        for (uint64_t seq = 3; seq <= 6; seq++)
            if (ad_shm_publish(h, seq, 0, &it, 1, 1.0, &err) != AD_OK)
                CFAIL("publish %llu after peer left: %s",
                      (unsigned long long)seq, err.msg);
    }
    t0 = check_now();
    st = ad_shm_fetch(h, 4, 1, 0, &it, 1, 10.0, &err);
    dt = check_now() - t0;
    if (expect("fetch from detached peer", st, &err, AD_EPEERGONE, dt, 0.0,
               0.1, "rank 1", failed ? "has failed" : "has left"))
        CFAIL("detached peer not reported");
out:
    ad_shm_detach(h, 0);
    return rc;
}

void test_detach(int failed)
{
    const char *t = failed ? "peer_detach_failed" : "peer_detach_normal";
    check_report(t, run_ranks(t, 2, rank_detach, &failed, -1, -1), NULL);
}
