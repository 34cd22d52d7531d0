/*
 * test_nccl_transport.c -- test_gpu_loader's scenarios of the NCCL
 * transport (csrc/nccl.c) through the stand-ins: argument checks, exchanges
 * with itself and with peers, blocking and non-blocking NCCL, device
 * switches, timeouts, asynchronous errors, GPU hangs and how handles are
 * destroyed.
 */
#define _GNU_SOURCE

#include "gpu_test.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

void t_argument_checks(void)
{
    ad_err err = {0};
    unsigned char id[AD_NCCL_UNIQUE_ID_BYTES] = {0};
    ad_nccl *h = NULL;
    char buf[8];
    ad_nccl_send s = {0, buf, sizeof buf};
    ad_nccl_recv r = {0, buf, sizeof buf};

    /* no library needed for any of these */
    setenv("ASYNCDIFF_NCCL_LIBRARY", "/nonexistent", 1);
    CHECK(ad_nccl_check_init(0, 0, 0, 1.0, &err) == AD_EINVAL && strcmp(err.arg, "world_size") == 0);
    CHECK(ad_nccl_check_init(AD_NCCL_MAX_WORLD + 1, 0, 0, 1.0, &err) == AD_EINVAL);
    CHECK(ad_nccl_check_init(2, 2, 0, 1.0, &err) == AD_EINVAL && strcmp(err.arg, "rank") == 0);
    CHECK(ad_nccl_check_init(2, -1, 0, 1.0, &err) == AD_EINVAL && strcmp(err.arg, "rank") == 0);
    CHECK(ad_nccl_check_init(2, 1, -1, 1.0, &err) == AD_EINVAL && strcmp(err.arg, "device") == 0);
    CHECK(ad_nccl_check_init(2, 1, 0, -1.0, &err) == AD_EINVAL && strcmp(err.arg, "timeout") == 0);
    CHECK(ad_nccl_check_init(2, 1, 0, 1.0 / 0.0, &err) == AD_EINVAL);
    CHECK(ad_nccl_check_init(2, 1, 0, 0.0 / 0.0, &err) == AD_EINVAL);
    CHECK(ad_nccl_check_init(2, 1, 0, 0.0, &err) == AD_OK);

    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_OK);
    CHECK(ad_nccl_check_items(2, NULL, 0, NULL, 0, &err) == AD_OK);
    CHECK(ad_nccl_check_items(2, NULL, 1, NULL, 0, &err) == AD_EINVAL && strcmp(err.arg, "sends") == 0);
    CHECK(ad_nccl_check_items(2, NULL, 0, NULL, 3, &err) == AD_EINVAL && strcmp(err.arg, "recvs") == 0);
    s.peer = 2;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL && strcmp(err.arg, "sends") == 0);
    CHECK_MSG(strstr(err.msg, "peer 2") != NULL, err.msg);
    s.peer = -1;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL);
    s.peer = 1;
    r.ptr = NULL;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL && strcmp(err.arg, "recvs") == 0);
    r.ptr = buf;
    r.nbytes = 0;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL);
    CHECK_MSG(strstr(err.msg, "nbytes must be > 0") != NULL, err.msg);
    r.nbytes = SIZE_MAX;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL);
    r.nbytes = 8;
    r.ptr = (void *)(UINTPTR_MAX - 3);
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL);

    /* init: argument errors come before any loading */
    CHECK(ad_nccl_init(id, 1, 0, 0, 1.0, NULL, &err) == AD_EINVAL);
    CHECK(ad_nccl_init(NULL, 1, 0, 0, 1.0, &h, &err) == AD_EINVAL && h == NULL);
    CHECK(ad_nccl_init(id, 1, 1, 0, 1.0, &h, &err) == AD_EINVAL && h == NULL);
    CHECK(ad_nccl_unique_id(NULL, &err) == AD_EINVAL);
    /* NULL handles */
    CHECK(ad_nccl_exchange(NULL, NULL, 0, NULL, 0, NULL, 1.0, &err) == AD_EINVAL);
    CHECK(ad_nccl_wait(NULL, 1.0, &err) == AD_EINVAL);
    ad_nccl_destroy(NULL, 0);
    ad_nccl_destroy(NULL, 1);
    CHECK(ad_nccl_world(NULL) == 0 && ad_nccl_failed(NULL) == 1 && ad_nccl_stream(NULL) == NULL);
}

/* The rule of ad_nccl_check_items for one item, written out. */
static int item_ok(int world, int peer, uintptr_t ptr, size_t nbytes)
{
    return peer >= 0 && peer < world && ptr != 0 && nbytes > 0 && nbytes <= (size_t)PTRDIFF_MAX &&
           ptr <= UINTPTR_MAX - nbytes;
}

/* ad_nccl_check_items on random lists of items made of edge values, against
 * item_ok: the status, and which list the error names (the first bad item's). */
void t_check_items_random(void)
{
    static const uintptr_t ptrs[] = {0, 1, 4096, (uintptr_t)INTPTR_MAX, UINTPTR_MAX - 3,
                                     UINTPTR_MAX};
    static const size_t sizes[] = {0, 1, 16, (size_t)PTRDIFF_MAX, (size_t)PTRDIFF_MAX + 1,
                                   SIZE_MAX};
    uint64_t rng = 0x2545f4914f6cdd1dULL;
    int bad = 0;

    for (int round = 0; round < 20000; round++) {
        ad_nccl_send sends[4];
        ad_nccl_recv recvs[4];
        uint64_t r;
        const char *want = NULL;
        ad_err err = {0};
#define NEXT() (rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17, rng)
        r = NEXT();
        const int world = 1 + (int)(r % 4);
        const size_t ns = (size_t)(r >> 8) % 5, nr = (size_t)(r >> 16) % 5;
        for (size_t i = 0; i < ns + nr; i++) {
            r = NEXT();
            const int peer = (int)(r % 9) - 3;
            const uintptr_t ptr = ptrs[(r >> 8) % 6];
            const size_t nbytes = sizes[(r >> 16) % 6];
            if (want == NULL && !item_ok(world, peer, ptr, nbytes))
                want = i < ns ? "sends" : "recvs";
            if (i < ns)
                sends[i] = (ad_nccl_send){peer, (const void *)ptr, nbytes};
            else
                recvs[i - ns] = (ad_nccl_recv){peer, (void *)ptr, nbytes};
        }
#undef NEXT
        ad_status st = ad_nccl_check_items(world, sends, ns, recvs, nr, &err);
        if (want == NULL)
            bad += st != AD_OK;
        else
            bad += st != AD_EINVAL || err.arg == NULL || strcmp(err.arg, want) != 0 ||
                   strstr(err.msg, want) == NULL;
    }
    CHECK(bad == 0);
}

/* Fill `n` bytes with a pattern that depends on `seed`. */
static void pattern(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)((i * 131u + seed * 7u + (i >> 8)) & 0xffu);
}

void t_self_exchange(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_cuda_stats cs;
    struct fake_nccl_stats ns;
    size_t big = 1u << 20;
    unsigned char *a = malloc(big), *b = malloc(big), *c = malloc(4096), *d = malloc(4096);
    void *compute = NULL;
    ad_nccl *h;

    use_fakes();
    setenv("FAKE_NCCL_INIT_POLLS", "3", 1);   /* init reports "in progress" a few times */
    setenv("FAKE_NCCL_GROUP_POLLS", "2", 1);  /* and so does every group launch */
    setenv("FAKE_CUDA_EVENT_POLLS", "2", 1);  /* and transfers take a few polls */
    h = open_handle(1, 0, 0, 5.0, &st, &err);
    CHECK_MSG(st == AD_OK && h != NULL, err.msg);
    if (h == NULL)
        goto done;
    nccl_stats(&ns);
    CHECK(ns.inits_nonblocking == 1 && ns.inits_blocking == 0);
    CHECK(ns.config_blocking == 0);
    CHECK(ns.config_version == 21700); /* our layout's version, not the library's */
    CHECK(ns.config_size == (int)sizeof(ad_nccl_config));
    CHECK(ns.config_undef_ok);
    CHECK(!ad_nccl_is_blocking(h) && ad_nccl_world(h) == 1 && ad_nccl_rank(h) == 0);
    cuda_stats(&cs);
    CHECK(cs.streams_created == 1 && cs.last_stream_flags == AD_CUDA_STREAM_NON_BLOCKING);
    CHECK(cs.events_created == 2 && cs.last_event_flags == AD_CUDA_EVENT_DISABLE_TIMING);
    /* a compute stream of the caller's own */
    CHECK(ad_gpu_get()->cudaStreamCreateWithFlags(&compute, 0) == 0);

    for (unsigned round = 0; round < 5; round++) {
        ad_nccl_send sends[2] = {{0, a, big}, {0, c, 4096}};
        ad_nccl_recv recvs[2] = {{0, b, big}, {0, d, 4096}};
        pattern(a, big, round);
        pattern(c, 4096, round + 100);
        memset(b, 0, big);
        memset(d, 0, 4096);
        st = ad_nccl_exchange(h, sends, 2, recvs, 2, round % 2 ? compute : NULL, 5.0, &err);
        CHECK_MSG(st == AD_OK, err.msg);
        CHECK(memcmp(a, b, big) == 0);
        CHECK(memcmp(c, d, 4096) == 0);
    }
    nccl_stats(&ns);
    CHECK(ns.sends == 10 && ns.recvs == 10 && ns.groups == 5);
    CHECK(ns.bytes == 2 * 5 * (long long)(big + 4096));
    CHECK(ns.last_datatype == AD_NCCL_UINT8);
    CHECK(ns.last_stream == ad_nccl_stream(h)); /* NCCL ran on the comm stream */
    CHECK(ns.last_stream != compute && ns.last_stream != NULL);
    CHECK(ns.bad_device_calls == 0);
    cuda_stats(&cs);
    CHECK(cs.records == 10); /* ready + done per exchange */
    CHECK(cs.waits == 10);   /* comm waits for compute, compute waits for comm */

    /* nothing to move: nothing queued */
    CHECK(ad_nccl_exchange(h, NULL, 0, NULL, 0, NULL, 1.0, &err) == AD_OK);
    nccl_stats(&ns);
    CHECK(ns.groups == 5);
    /* bad items are refused without harming the handle */
    {
        ad_nccl_send bad = {1, a, 16};
        CHECK(ad_nccl_exchange(h, &bad, 1, NULL, 0, NULL, 1.0, &err) == AD_EINVAL);
        CHECK(!ad_nccl_failed(h));
        CHECK(ad_nccl_exchange(h, NULL, 0, NULL, 0, NULL, -1.0, &err) == AD_EINVAL);
    }
    CHECK_MSG(ad_nccl_wait(h, 5.0, &err) == AD_OK, err.msg);
    (void)ad_gpu_get()->cudaStreamDestroy(compute);
    setenv("FAKE_NCCL_FINALIZE_POLLS", "2", 1);
    ad_nccl_destroy(h, 0);
    nccl_stats(&ns);
    CHECK(ns.finalizes == 1 && ns.destroys == 1 && ns.aborts == 0 && ns.live_comms == 0);
    cuda_stats(&cs);
    CHECK(cs.streams_created == cs.streams_destroyed);
    CHECK(cs.events_created == cs.events_destroyed);
done:
    free(a);
    free(b);
    free(c);
    free(d);
}

void t_unique_id_roundtrip(void)
{
    ad_err err = {0};
    unsigned char id[AD_NCCL_UNIQUE_ID_BYTES];
    ad_nccl *h = NULL;
    use_fakes();
    CHECK_MSG(ad_nccl_unique_id(id, &err) == AD_OK, err.msg);
    CHECK(memcmp(id, "FAKE", 4) == 0);
    /* the bytes reach ncclCommInitRank* intact (passed by value, 128 bytes) */
    CHECK_MSG(ad_nccl_init(id, 3, 2, 0, 2.0, &h, &err) == AD_OK, err.msg);
    ad_nccl_destroy(h, 0);
    id[77] ^= 1;
    h = NULL;
    CHECK(ad_nccl_init(id, 3, 2, 0, 2.0, &h, &err) == AD_EEXTERNAL && h == NULL);
    CHECK_MSG(strstr(err.msg, "ncclCommInitRankConfig") != NULL, err.msg);
    CHECK_MSG(strstr(err.msg, "nccl.c:") != NULL, err.msg); /* file:line */
    CHECK_MSG(strstr(err.msg, "fake NCCL error") != NULL, err.msg);
    CHECK_MSG(strstr(err.msg, "fake last error detail") != NULL, err.msg);
}

void t_peers(void)
{
    /* world 3, rank 1: sends to 0 and 2, receives from 0 and 2 */
    ad_err err = {0};
    ad_status st;
    unsigned char out[64], in0[32], in2[16];
    ad_nccl *h;
    use_fakes();
    h = open_handle(3, 1, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send sends[2] = {{0, out, 64}, {2, out, 64}};
        ad_nccl_recv recvs[2] = {{0, in0, sizeof in0}, {2, in2, sizeof in2}};
        CHECK_MSG(ad_nccl_exchange(h, sends, 2, recvs, 2, NULL, 2.0, &err) == AD_OK, err.msg);
        CHECK(in0[0] == 1 && in0[31] == 1 && in2[0] == 3 && in2[15] == 3);
    }
    ad_nccl_destroy(h, 0);
}

void t_blocking_nccl(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    unsigned char a[100], b[100];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_VERSION", "21305", 1); /* before non-blocking communicators */
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    CHECK(ad_nccl_is_blocking(h));
    nccl_stats(&ns);
    CHECK(ns.inits_blocking == 1 && ns.inits_nonblocking == 0);
    pattern(a, sizeof a, 9);
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 2.0, &err) == AD_OK, err.msg);
        CHECK(memcmp(a, b, sizeof a) == 0);
    }
    ad_nccl_destroy(h, 0);
    nccl_stats(&ns);
    CHECK(ns.finalizes == 0 && ns.destroys == 1 && ns.live_comms == 0);
}

void t_device_switch(void)
{
    /* the caller works on device 0; the communicator lives on device 1 */
    ad_err err = {0};
    ad_status st;
    struct fake_cuda_stats cs;
    struct fake_nccl_stats ns;
    unsigned char a[10], b[10];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_CUDA_DEVICES", "2", 1);
    CHECK(ad_gpu_load(&err) == AD_OK);
    CHECK(ad_gpu_get()->device_count == 2);
    CHECK(ad_gpu_get()->cudaSetDevice(0) == 0);
    h = open_handle(1, 0, 1, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    cuda_stats(&cs);
    CHECK(cs.current_device == 0); /* put back */
    CHECK(cs.last_stream_device == 1); /* the comm stream belongs to device 1 */
    nccl_stats(&ns);
    CHECK(ns.last_comm_device == 1); /* so does the communicator */
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 2.0, &err) == AD_OK, err.msg);
    }
    cuda_stats(&cs);
    CHECK(cs.current_device == 0);
    nccl_stats(&ns);
    CHECK(ns.bad_device_calls == 0); /* NCCL was always called on device 1 */
    ad_nccl_destroy(h, 0);
    cuda_stats(&cs);
    CHECK(cs.current_device == 0);
    /* a device that does not exist */
    h = open_handle(1, 0, 2, 2.0, &st, &err);
    CHECK(st == AD_EINVAL && h == NULL && strcmp(err.arg, "device") == 0);
}

void t_init_timeout(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    struct fake_cuda_stats cs;
    double t0;
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_INIT_HANG", "1", 1); /* a rank that never shows up */
    t0 = check_now();
    h = open_handle(2, 0, 0, 0.3, &st, &err);
    CHECK(st == AD_ETIMEDOUT && h == NULL);
    CHECK_MSG(strstr(err.msg, "within the timeout") != NULL, err.msg);
    CHECK(check_now() - t0 >= 0.29 && check_now() - t0 < 5.0);
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.live_comms == 0);
    cuda_stats(&cs);
    CHECK(cs.streams_created == cs.streams_destroyed && cs.events_created == cs.events_destroyed);
}

/* An exchange that fails one way or another leaves an aborted handle that
 * refuses further work and can still be destroyed. */
static void expect_aborted(ad_nccl *h)
{
    ad_err err = {0};
    struct fake_nccl_stats ns;
    unsigned char a[4] = {0};
    ad_nccl_send s = {0, a, 4};
    CHECK(ad_nccl_failed(h));
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.live_comms == 0);
    CHECK(ad_nccl_exchange(h, &s, 1, NULL, 0, NULL, 1.0, &err) == AD_ESTATE);
    CHECK(ad_nccl_wait(h, 1.0, &err) == AD_ESTATE);
    ad_nccl_destroy(h, 0);
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.destroys == 0);
}

void t_group_timeout(void)
{
    ad_err err = {0};
    ad_status st;
    unsigned char a[64], b[64];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_GROUP_HANG", "1", 1);
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 0.2, &err) == AD_ETIMEDOUT);
        CHECK_MSG(strstr(err.msg, "ncclGroupEnd") != NULL, err.msg);
        CHECK(err.arg != NULL && strcmp(err.arg, "timeout") == 0);
    }
    expect_aborted(h);
}

/* An error NCCL reports asynchronously after the group launch: the
 * exchange fails with `expect` and NCCL's text, and the handle is aborted. */
static void async_failure(const char *code, ad_status expect, const char *text)
{
    ad_err err = {0};
    ad_status st;
    unsigned char a[64], b[64];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_ASYNC_ERROR", code, 1);
    setenv("FAKE_NCCL_GROUP_POLLS", "1", 1);
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 2.0, &err) == expect);
        CHECK_MSG(strstr(err.msg, text) != NULL, err.msg);
    }
    expect_aborted(h);
}

/* ncclRemoteError: a peer died */
void t_async_error(void) { async_failure("6", AD_EPEERGONE, "fake remote error"); }

/* ncclTimeout (2.30+): a timeout */
void t_async_timeout(void) { async_failure("8", AD_ETIMEDOUT, "fake timeout (NCCL error 8)"); }

void t_shared_gpu_refused(void)
{
    /* ncclInvalidUsage at init (what NCCL answers for two ranks on one GPU):
     * the message says what the NCCL found allows, then NCCL's own words */
    static const struct {
        const char *version, *opt_in, *expect;
    } cases[] = {
        {"22707", NULL, "NCCL 2.27.7 never allows that"},
        {"23206", NULL, "NCCL 2.32.6 refuses that unless NCCL_MULTI_RANK_GPU_ENABLE=1 "
                        "(experimental; now unset)"},
        {"23206", "1", "(experimental; now 1)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ad_err err = {0};
        ad_status st;
        ad_nccl *h;
        pid_t pid = fork(); /* the libraries load once per process */
        if (pid == 0) {
            check_reset();
            use_fakes();
            setenv("FAKE_NCCL_VERSION", cases[i].version, 1);
            setenv("FAKE_NCCL_INIT_ERROR", "5", 1);
            if (cases[i].opt_in != NULL)
                setenv("NCCL_MULTI_RANK_GPU_ENABLE", cases[i].opt_in, 1);
            h = open_handle(2, 1, 0, 2.0, &st, &err);
            CHECK(h == NULL && st == AD_EEXTERNAL);
            CHECK_MSG(strstr(err.msg, cases[i].expect) != NULL, err.msg);
            CHECK_MSG(strstr(err.msg, "NCCL said: ") != NULL, err.msg);
            CHECK_MSG(strstr(err.msg, "NCCL error 5") != NULL, err.msg);
            exit(check_failed == 0 ? 0 : 1);
        }
        if (CHECK(pid > 0)) {
            int status = 0;
            CHECK(waitpid(pid, &status, 0) == pid);
            CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, cases[i].expect);
        }
    }
    {
        /* world 1 cannot share a GPU: NCCL's message alone */
        ad_err err = {0};
        ad_status st;
        use_fakes();
        setenv("FAKE_NCCL_INIT_ERROR", "5", 1);
        CHECK(open_handle(1, 0, 0, 2.0, &st, &err) == NULL && st == AD_EEXTERNAL);
        CHECK_MSG(strstr(err.msg, "NCCL_MULTI_RANK_GPU_ENABLE") == NULL, err.msg);
    }
}

void t_gpu_hang(void)
{
    /* transfers queued but never finishing: seen at the next exchange */
    ad_err err = {0};
    ad_status st;
    unsigned char a[64], b[64];
    ad_nccl *h;
    double t0;
    use_fakes();
    setenv("FAKE_CUDA_HANG", "1", 1);
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 0.2, &err) == AD_OK, err.msg);
        t0 = check_now();
        CHECK(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 0.2, &err) == AD_ETIMEDOUT);
        CHECK(check_now() - t0 >= 0.19);
        CHECK_MSG(strstr(err.msg, "previous exchange") != NULL, err.msg);
    }
    expect_aborted(h);
}

void t_wait_timeout(void)
{
    ad_err err = {0};
    ad_status st;
    unsigned char a[64], b[64];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_CUDA_HANG", "1", 1);
    h = open_handle(1, 0, 0, 0.2, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 0.2, &err) == AD_OK, err.msg);
        CHECK(ad_nccl_wait(h, 0.1, &err) == AD_ETIMEDOUT);
    }
    expect_aborted(h);
}

void t_graceful_destroy_falls_back_to_abort(void)
{
    /* queued work that never ends: destroy(abort=0) gives up after the
     * init timeout and aborts instead of hanging */
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    unsigned char a[64], b[64];
    ad_nccl *h;
    double t0;
    use_fakes();
    setenv("FAKE_CUDA_HANG", "1", 1);
    h = open_handle(1, 0, 0, 0.2, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 1.0, &err) == AD_OK, err.msg);
    }
    t0 = check_now();
    ad_nccl_destroy(h, 0);
    CHECK(check_now() - t0 < 3.0);
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.destroys == 0 && ns.live_comms == 0);
}

void t_op_failure_closes_group(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    unsigned char a[64], b[64];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_FAIL_OP", "1", 1); /* the second call of the group fails */
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 2.0, &err) == AD_EEXTERNAL);
        CHECK_MSG(strstr(err.msg, "ncclRecv") != NULL, err.msg);
    }
    nccl_stats(&ns);
    CHECK(ns.group_depth == 0); /* ncclGroupEnd was still called */
    expect_aborted(h);
}

void t_abort_destroy(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    ad_nccl *h;
    use_fakes();
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    ad_nccl_destroy(h, 1);
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.destroys == 0 && ns.finalizes == 0 && ns.live_comms == 0);
}
