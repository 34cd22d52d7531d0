/*
 * nccl.c -- the NCCL transport (see nccl.h for the protocol).
 *
 * Pure C.  Every library call goes through the table of gpu.h, and every
 * failure becomes an ad_status with the call, file:line and the library's
 * message.  Functions keep a single exit path: after the arguments are
 * checked, any failure jumps to `error`, which aborts the communicator (the
 * ranks are out of step from then on) and restores the caller's device.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, nanosleep */

#include "nccl.h"

#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct ad_nccl {
    const ad_gpu_api *api;
    ad_nccl_comm comm;     /* NULL once aborted or destroyed */
    ad_cuda_stream stream; /* the comm stream: every NCCL operation runs on it */
    ad_cuda_event ready;   /* recorded on the compute stream, awaited by the comm stream */
    ad_cuda_event done;    /* recorded on the comm stream, awaited by the compute stream */
    int world, rank, device;
    int blocking; /* 1: blocking communicator (NCCL < 2.14) */
    int pending;  /* `done` belongs to an exchange not yet seen finished */
    int failed;   /* aborted after an error: every later call is refused */
    ad_nccl_result last_error; /* the NCCL result of the latest failure, 0 if none */
    double timeout_s; /* the init timeout; bounds a graceful destroy */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Between two polls: yield for the first rounds (an exchange usually ends
 * within microseconds), then sleep for a growing while, at most 0.5 ms, so
 * that a long wait costs no CPU to speak of. */
static void backoff(unsigned *round)
{
    if (*round < 64) {
        sched_yield();
    } else {
        unsigned shift = *round - 64 < 9 ? *round - 64 : 9;
        struct timespec ts = {0, (long)(1000u << shift)}; /* 1 us .. 512 us */
        nanosleep(&ts, NULL);
    }
    (*round)++;
}

static int valid_timeout(double timeout_s)
{
    return isfinite(timeout_s) && timeout_s >= 0.0;
}

ad_status ad_nccl_check_init(int world, int rank, int device, double timeout_s, ad_err *err)
{
    if (world < 1 || world > AD_NCCL_MAX_WORLD)
        return AD_INVALID(err, "world_size", "world_size must be in [1, %d], got %d",
                          AD_NCCL_MAX_WORLD, world);
    if (rank < 0 || rank >= world)
        return AD_INVALID(err, "rank", "rank must be in [0, %d), got %d", world, rank);
    if (device < 0)
        return AD_INVALID(err, "device", "device must be a CUDA device number >= 0, got %d",
                          device);
    if (!valid_timeout(timeout_s))
        return AD_INVALID(err, "timeout", "timeout must be finite and >= 0 seconds");
    return AD_OK;
}

/* One buffer of an exchange: shared by the send and receive checks. */
static ad_status check_item(const char *what, size_t i, int world, int peer, const void *ptr,
                            size_t nbytes, ad_err *err)
{
    if (peer < 0 || peer >= world)
        return AD_INVALID(err, what, "%s[%zu]: peer %d is not a rank of this world (0..%d)",
                          what, i, peer, world - 1);
    if (ptr == NULL)
        return AD_INVALID(err, what, "%s[%zu]: the buffer pointer is NULL", what, i);
    if (nbytes == 0)
        return AD_INVALID(err, what, "%s[%zu]: nbytes must be > 0 (leave empty buffers out)",
                          what, i);
    if (nbytes > (size_t)PTRDIFF_MAX || (uintptr_t)ptr > UINTPTR_MAX - nbytes)
        return AD_INVALID(err, what, "%s[%zu]: %zu bytes at %p do not fit in the address space",
                          what, i, nbytes, ptr);
    return AD_OK;
}

ad_status ad_nccl_check_items(int world, const ad_nccl_send *sends, size_t ns,
                              const ad_nccl_recv *recvs, size_t nr, ad_err *err)
{
    ad_status st;
    if (world < 1 || world > AD_NCCL_MAX_WORLD)
        return AD_INVALID(err, "world_size", "world_size must be in [1, %d], got %d",
                          AD_NCCL_MAX_WORLD, world);
    if (ns > 0 && sends == NULL)
        return AD_INVALID(err, "sends", "sends is NULL but holds %zu items", ns);
    if (nr > 0 && recvs == NULL)
        return AD_INVALID(err, "recvs", "recvs is NULL but holds %zu items", nr);
    for (size_t i = 0; i < ns; i++) {
        st = check_item("sends", i, world, sends[i].peer, sends[i].ptr, sends[i].nbytes, err);
        if (st != AD_OK)
            return st;
    }
    for (size_t i = 0; i < nr; i++) {
        st = check_item("recvs", i, world, recvs[i].peer, recvs[i].ptr, recvs[i].nbytes, err);
        if (st != AD_OK)
            return st;
    }
    return AD_OK;
}

/* Make the handle's device current; *saved receives the caller's device
 * (-1 when it could not be read, and then nothing is changed). */
static ad_status enter_device(ad_nccl *h, int *saved, ad_err *err)
{
    int current = -1;
    AD_CUDA_CHECK(h->api, err, cudaGetDevice(&current));
    if (current != h->device)
        AD_CUDA_CHECK(h->api, err, cudaSetDevice(h->device));
    *saved = current;
    return AD_OK;
}

static void leave_device(ad_nccl *h, int saved)
{
    if (saved >= 0 && saved != h->device)
        (void)h->api->cudaSetDevice(saved);
}

/* Give up on the communicator: kernels still running are told to quit and
 * peers stop waiting for this rank (as far as NCCL can tell them). */
static void abort_comm(ad_nccl *h)
{
    if (h->comm != NULL) {
        (void)h->api->ncclCommAbort(h->comm);
        h->comm = NULL;
    }
    h->failed = 1;
}

/* The communicator's asynchronous state.  AD_OK with *busy = 1 while a
 * non-blocking operation is still being set up (ncclInProgress), AD_OK with
 * *busy = 0 when idle and healthy, an error status when NCCL reported an
 * error (a peer that went away is AD_EPEERGONE). */
static ad_status comm_state(ad_nccl *h, const char *what, int *busy, ad_err *err)
{
    ad_nccl_result state = AD_NCCL_SUCCESS;
    *busy = 0;
    AD_NCCL_CHECK(h->api, h->comm, err, ncclCommGetAsyncError(h->comm, &state));
    if (state == AD_NCCL_IN_PROGRESS) {
        *busy = 1;
        return AD_OK;
    }
    if (state != AD_NCCL_SUCCESS)
        h->last_error = state;
    return ad_nccl_status(h->api, h->comm, state, what, __FILE__, __LINE__, err);
}

/* Wait until a non-blocking operation (init, group launch, finalize) is
 * set up, or fails, or the timeout runs out. */
static ad_status wait_launched(ad_nccl *h, double timeout_s, const char *what, ad_err *err)
{
    double deadline = now_s() + timeout_s;
    unsigned round = 0;
    for (;;) {
        int busy = 0;
        ad_status st = comm_state(h, what, &busy, err);
        if (st != AD_OK || !busy)
            return st;
        if (now_s() >= deadline)
            return ad_err_set(err, AD_ETIMEDOUT, "timeout",
                              "%s did not complete within the timeout (%g s): another rank "
                              "is missing, stuck or out of step",
                              what, timeout_s);
        backoff(&round);
    }
}

/* Wait until `event` has completed on the GPU, watching the communicator
 * for asynchronous errors meanwhile. */
static ad_status wait_event(ad_nccl *h, ad_cuda_event event, double timeout_s, const char *what,
                            ad_err *err)
{
    double deadline = now_s() + timeout_s;
    unsigned round = 0;
    for (;;) {
        int busy = 0;
        ad_status st;
        ad_cuda_error q = h->api->cudaEventQuery(event);
        if (q == AD_CUDA_SUCCESS)
            return AD_OK;
        if (q != AD_CUDA_ERROR_NOT_READY)
            return ad_cuda_status(h->api, q, "cudaEventQuery(event)", __FILE__, __LINE__, err);
        st = comm_state(h, what, &busy, err);
        if (st != AD_OK)
            return st;
        if (now_s() >= deadline)
            return ad_err_set(err, AD_ETIMEDOUT, "timeout",
                              "%s: the GPU transfers did not finish within the timeout (%g s): "
                              "another rank is missing, stuck or out of step",
                              what, timeout_s);
        backoff(&round);
    }
}

/* Fill an ncclConfig_t as NCCL_CONFIG_INITIALIZER would for the layout we
 * declare: everything "undefined" (NCCL picks), size and version saying
 * which fields are ours.  An NCCL newer than that layout ignores fields it
 * has and we do not; an older one copies only its own size. */
static void config_init(ad_nccl_config *cfg, int nccl_version)
{
    int ours = AD_NCCL_VERSION_CODE(2, 17, 0);
    memset(cfg, 0, sizeof *cfg);
    cfg->size = sizeof *cfg;
    cfg->magic = AD_NCCL_CONFIG_MAGIC;
    cfg->version = (unsigned int)(nccl_version < ours ? nccl_version : ours);
    cfg->blocking = AD_NCCL_CONFIG_UNDEF_INT;
    cfg->cgaClusterSize = AD_NCCL_CONFIG_UNDEF_INT;
    cfg->minCTAs = AD_NCCL_CONFIG_UNDEF_INT;
    cfg->maxCTAs = AD_NCCL_CONFIG_UNDEF_INT;
    cfg->netName = NULL;
}

/* Destroy what a handle owns (device already current) and free it. */
static void release(ad_nccl *h)
{
    if (h->ready != NULL)
        (void)h->api->cudaEventDestroy(h->ready);
    if (h->done != NULL)
        (void)h->api->cudaEventDestroy(h->done);
    if (h->stream != NULL)
        (void)h->api->cudaStreamDestroy(h->stream);
    free(h);
}

/* NCCL answers ncclInvalidUsage at init when two ranks of a communicator
 * are on one GPU, which is the likely cause here: say so, and what the NCCL
 * found allows (docs/design.md §5.2), before NCCL's own words. */
static void shared_gpu_hint(const ad_gpu_api *api, ad_err *err)
{
    char said[sizeof err->msg], version[32];
    const char *opt_in = getenv("NCCL_MULTI_RANK_GPU_ENABLE");
    if (err == NULL)
        return;
    memcpy(said, err->msg, sizeof said);
    ad_nccl_version_string(api->nccl_version, version, sizeof version);
    if (api->nccl_version < AD_NCCL_VERSION_CODE(2, 30, 0))
        snprintf(err->msg, sizeof err->msg,
                 "NCCL refused the communicator; if two ranks share one GPU: NCCL %s never "
                 "allows that (2.30+ does with NCCL_MULTI_RANK_GPU_ENABLE=1, experimental); use "
                 "one GPU per rank or transport='shm'. NCCL said: %.250s",
                 version, said);
    else
        snprintf(err->msg, sizeof err->msg,
                 "NCCL refused the communicator; if two ranks share one GPU: NCCL %s refuses "
                 "that unless NCCL_MULTI_RANK_GPU_ENABLE=1 (experimental; now %.16s); use one GPU "
                 "per rank or transport='shm'. NCCL said: %.250s",
                 version, opt_in != NULL ? opt_in : "unset", said);
}

ad_status ad_nccl_unique_id(unsigned char id[AD_NCCL_UNIQUE_ID_BYTES], ad_err *err)
{
    const ad_gpu_api *api;
    ad_nccl_id uid;
    ad_status st;

    if (id == NULL)
        return AD_INVALID(err, "id", "id must not be NULL");
    st = ad_gpu_load(err);
    if (st != AD_OK)
        return st;
    api = ad_gpu_get();
    memset(&uid, 0, sizeof uid);
    AD_NCCL_CHECK(api, NULL, err, ncclGetUniqueId(&uid));
    memcpy(id, uid.internal, AD_NCCL_UNIQUE_ID_BYTES);
    return AD_OK;
}

ad_status ad_nccl_init(const unsigned char id[AD_NCCL_UNIQUE_ID_BYTES], int world, int rank,
                       int device, double timeout_s, ad_nccl **out, ad_err *err)
{
    const ad_gpu_api *api;
    ad_nccl *h = NULL;
    ad_nccl_id uid;
    int saved = -1;
    ad_status st;

    if (out == NULL)
        return AD_INVALID(err, "out", "out must not be NULL");
    *out = NULL;
    if (id == NULL)
        return AD_INVALID(err, "unique_id", "unique_id must not be NULL");
    st = ad_nccl_check_init(world, rank, device, timeout_s, err);
    if (st != AD_OK)
        return st;
    st = ad_gpu_load(err);
    if (st != AD_OK)
        return st;
    api = ad_gpu_get();
    if (device >= api->device_count)
        return AD_INVALID(err, "device", "device must be in [0, %d) (CUDA devices visible), got %d",
                          api->device_count, device);

    h = calloc(1, sizeof *h);
    if (h == NULL)
        return AD_NOMEM(err, "the NCCL transport handle");
    h->api = api;
    h->world = world;
    h->rank = rank;
    h->device = device;
    h->timeout_s = timeout_s;
    memcpy(uid.internal, id, AD_NCCL_UNIQUE_ID_BYTES);

    st = enter_device(h, &saved, err);
    if (st != AD_OK)
        goto error;
    if (api->ncclCommInitRankConfig != NULL &&
        api->nccl_version >= AD_NCCL_VERSION_CODE(2, 14, 0)) {
        /* Non-blocking: the call returns at once and we poll, so a missing
         * rank is a timeout instead of a hang. */
        ad_nccl_config cfg;
        ad_nccl_result r;
        config_init(&cfg, api->nccl_version);
        cfg.blocking = 0;
        r = api->ncclCommInitRankConfig(&h->comm, world, uid, rank, &cfg);
        if (r != AD_NCCL_SUCCESS && r != AD_NCCL_IN_PROGRESS) {
            h->last_error = r;
            st = ad_nccl_status(api, h->comm, r,
                                "ncclCommInitRankConfig(&comm, world, id, rank, &config)",
                                __FILE__, __LINE__, err);
            goto error;
        }
        if (h->comm == NULL) {
            st = ad_err_set(err, AD_EEXTERNAL, NULL,
                            "ncclCommInitRankConfig returned no communicator");
            goto error;
        }
        st = wait_launched(h, timeout_s, "NCCL communicator setup (ncclCommInitRankConfig)", err);
        if (st != AD_OK)
            goto error;
    } else {
        /* NCCL before 2.14: init blocks until every rank has joined. */
        ad_nccl_result r;
        h->blocking = 1;
        r = api->ncclCommInitRank(&h->comm, world, uid, rank);
        if (r != AD_NCCL_SUCCESS) {
            h->last_error = r;
            st = ad_nccl_status(api, NULL, r, "ncclCommInitRank(&comm, world, id, rank)",
                                __FILE__, __LINE__, err);
            goto error;
        }
    }
    AD_CUDA_CHECK_GOTO(api, err, st, error,
                       cudaStreamCreateWithFlags(&h->stream, AD_CUDA_STREAM_NON_BLOCKING));
    AD_CUDA_CHECK_GOTO(api, err, st, error,
                       cudaEventCreateWithFlags(&h->ready, AD_CUDA_EVENT_DISABLE_TIMING));
    AD_CUDA_CHECK_GOTO(api, err, st, error,
                       cudaEventCreateWithFlags(&h->done, AD_CUDA_EVENT_DISABLE_TIMING));
    leave_device(h, saved);
    *out = h;
    return AD_OK;
error:
    if (h->last_error == AD_NCCL_INVALID_USAGE && world > 1)
        shared_gpu_hint(api, err);
    abort_comm(h);
    release(h); /* still on the handle's device (or on the caller's if that failed) */
    if (saved >= 0 && saved != device)
        (void)api->cudaSetDevice(saved);
    return st;
}

/* What every call on a live handle checks first: a handle, not aborted, and
 * a usable timeout. */
static ad_status check_usable(const ad_nccl *h, double timeout_s, ad_err *err)
{
    if (h == NULL)
        return AD_INVALID(err, "handle", "the NCCL handle is NULL");
    if (h->failed || h->comm == NULL)
        return ad_err_set(err, AD_ESTATE, NULL,
                          "the NCCL transport was aborted after an earlier error; "
                          "create a new one");
    if (!valid_timeout(timeout_s))
        return AD_INVALID(err, "timeout", "timeout must be finite and >= 0 seconds");
    return AD_OK;
}

ad_status ad_nccl_exchange(ad_nccl *h, const ad_nccl_send *sends, size_t ns,
                           const ad_nccl_recv *recvs, size_t nr, void *compute_stream,
                           double timeout_s, ad_err *err)
{
    const ad_gpu_api *api;
    ad_nccl_result r;
    int saved = -1;
    ad_status st = AD_OK;

    st = check_usable(h, timeout_s, err);
    if (st != AD_OK)
        return st;
    st = ad_nccl_check_items(h->world, sends, ns, recvs, nr, err);
    if (st != AD_OK)
        return st;
    if (ns == 0 && nr == 0)
        return AD_OK;
    api = h->api;

    st = enter_device(h, &saved, err);
    if (st != AD_OK)
        goto error;
    /* At most one exchange in flight (see nccl.h). */
    if (h->pending) {
        st = wait_event(h, h->done, timeout_s, "waiting for the previous exchange", err);
        if (st != AD_OK)
            goto error;
        h->pending = 0;
    }
    /* 1. The comm stream starts after what the compute stream has queued. */
    AD_CUDA_CHECK_GOTO(api, err, st, error, cudaEventRecord(h->ready, compute_stream));
    AD_CUDA_CHECK_GOTO(api, err, st, error, cudaStreamWaitEvent(h->stream, h->ready, 0));

    /* 2. All sends and receives as one group, so that NCCL can run them
     *    together without any ordering deadlock between peers. */
    AD_NCCL_CHECK_GOTO(api, h->comm, err, st, error, ncclGroupStart());
    for (size_t i = 0; i < ns && st == AD_OK; i++) {
        r = api->ncclSend(sends[i].ptr, sends[i].nbytes, AD_NCCL_UINT8, sends[i].peer, h->comm,
                          h->stream);
        if (r != AD_NCCL_SUCCESS && r != AD_NCCL_IN_PROGRESS)
            st = ad_nccl_status(api, h->comm, r, "ncclSend(ptr, nbytes, ncclUint8, peer, comm, stream)",
                                __FILE__, __LINE__, err);
    }
    for (size_t i = 0; i < nr && st == AD_OK; i++) {
        r = api->ncclRecv(recvs[i].ptr, recvs[i].nbytes, AD_NCCL_UINT8, recvs[i].peer, h->comm,
                          h->stream);
        if (r != AD_NCCL_SUCCESS && r != AD_NCCL_IN_PROGRESS)
            st = ad_nccl_status(api, h->comm, r, "ncclRecv(ptr, nbytes, ncclUint8, peer, comm, stream)",
                                __FILE__, __LINE__, err);
    }
    /* The group is closed whatever happened inside it. */
    r = api->ncclGroupEnd();
    if (st != AD_OK)
        goto error; /* the first failure is the more useful message */
    if (r != AD_NCCL_SUCCESS && r != AD_NCCL_IN_PROGRESS) {
        st = ad_nccl_status(api, h->comm, r, "ncclGroupEnd()", __FILE__, __LINE__, err);
        goto error;
    }
    /* A non-blocking communicator may still be queueing the kernels: they
     * must be on the comm stream before the event below is recorded. */
    if (!h->blocking) {
        st = wait_launched(h, timeout_s, "NCCL send/receive launch (ncclGroupEnd)", err);
        if (st != AD_OK)
            goto error;
    }

    /* 3. Work queued on the compute stream from now on sees the bytes. */
    AD_CUDA_CHECK_GOTO(api, err, st, error, cudaEventRecord(h->done, h->stream));
    h->pending = 1;
    AD_CUDA_CHECK_GOTO(api, err, st, error, cudaStreamWaitEvent(compute_stream, h->done, 0));
    leave_device(h, saved);
    return AD_OK;
error:
    abort_comm(h);
    leave_device(h, saved);
    return st;
}

ad_status ad_nccl_wait(ad_nccl *h, double timeout_s, ad_err *err)
{
    int saved = -1;
    ad_status st = AD_OK;

    st = check_usable(h, timeout_s, err);
    if (st != AD_OK)
        return st;
    if (!h->pending)
        return AD_OK;
    st = enter_device(h, &saved, err);
    if (st != AD_OK)
        goto error;
    st = wait_event(h, h->done, timeout_s, "waiting for the last exchange", err);
    if (st != AD_OK)
        goto error;
    h->pending = 0;
    leave_device(h, saved);
    return AD_OK;
error:
    abort_comm(h);
    leave_device(h, saved);
    return st;
}

void ad_nccl_destroy(ad_nccl *h, int abort)
{
    const ad_gpu_api *api;
    int saved = -1;

    if (h == NULL)
        return;
    api = h->api;
    (void)enter_device(h, &saved, NULL);
    if (h->comm != NULL && !abort) {
        /* Graceful: let queued transfers finish, then finalize (non-blocking
         * communicators finalize asynchronously and are polled), then free.
         * Any trouble on the way turns into an abort. */
        if (h->pending &&
            wait_event(h, h->done, h->timeout_s, "closing the NCCL transport", NULL) != AD_OK)
            abort = 1;
        if (!abort && !h->blocking && api->ncclCommFinalize != NULL) {
            ad_nccl_result r = api->ncclCommFinalize(h->comm);
            if (r != AD_NCCL_SUCCESS && r != AD_NCCL_IN_PROGRESS)
                abort = 1;
            else if (wait_launched(h, h->timeout_s, "ncclCommFinalize", NULL) != AD_OK)
                abort = 1;
        }
        if (!abort) {
            (void)api->ncclCommDestroy(h->comm);
            h->comm = NULL;
        }
    }
    abort_comm(h); /* no-op when the communicator is already gone */
    release(h);
    if (saved >= 0)
        (void)api->cudaSetDevice(saved);
}

int ad_nccl_world(const ad_nccl *h) { return h != NULL ? h->world : 0; }
int ad_nccl_rank(const ad_nccl *h) { return h != NULL ? h->rank : -1; }
int ad_nccl_device(const ad_nccl *h) { return h != NULL ? h->device : -1; }
int ad_nccl_is_blocking(const ad_nccl *h) { return h != NULL ? h->blocking : 0; }
int ad_nccl_failed(const ad_nccl *h) { return h != NULL ? h->failed : 1; }
void *ad_nccl_stream(const ad_nccl *h) { return h != NULL ? h->stream : NULL; }
