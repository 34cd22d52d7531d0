/*
 * nccl.h -- the NCCL transport: point-to-point exchanges between GPU ranks
 * (docs/design.md §5.2).
 *
 * Pure C (no Python.h).  The libraries are opened at run time (gpu.h); this
 * file builds and drives one communicator per rank:
 *
 *   - ad_nccl_init creates the communicator from a 128-byte unique id that
 *     rank 0 made with ad_nccl_unique_id and handed to every rank (the
 *     Python side passes it through the rendezvous store).  When the NCCL
 *     found supports it (2.14+: ncclCommInitRankConfig with blocking = 0)
 *     the communicator is non-blocking and every wait on it is bounded by
 *     the timeout; with an older NCCL init and group launch block.  The
 *     handle also owns a dedicated non-blocking CUDA stream (the "comm
 *     stream") and two events.
 *
 *   - ad_nccl_exchange moves one event's bytes without a host sync:
 *       1. the comm stream waits for an event recorded on the caller's
 *          compute stream, so everything the compute stream produced so far
 *          (the data to send) is ready and the receive buffers are free;
 *       2. inside ncclGroupStart/End: one ncclSend per send item, one
 *          ncclRecv per receive item, all as raw bytes (ncclUint8) on the
 *          comm stream -- fp16/bf16 travel as they are;
 *       3. an event recorded on the comm stream is made a dependency of the
 *          compute stream (cudaStreamWaitEvent): work queued after the call
 *          sees the received bytes.
 *     Items to one peer are matched with that peer's items in order, so the
 *     two sides must list them in the same order (the Python layer sorts
 *     them by slot offset).  Before it queues anything, an exchange waits
 *     (bounded) until the previous one finished on the GPU: at most one
 *     exchange is in flight, a peer that hangs shows up as a timeout one
 *     event later, and the caller may release the previous event's buffers
 *     once the call returns.
 *
 *   - while waiting (init, group launch, previous exchange) the handle polls
 *     ncclCommGetAsyncError; on an error or past the timeout it calls
 *     ncclCommAbort, marks itself failed (later calls: AD_ESTATE) and
 *     returns AD_EEXTERNAL / AD_EPEERGONE / AD_ETIMEDOUT.
 *
 * Every entry point sets the CUDA device of the handle for the duration of
 * the call and puts the caller's device back afterwards.
 *
 * Threading: a handle belongs to one thread at a time.  No call touches
 * Python; a binding may release the GIL around all of them.
 */
#ifndef ASYNCDIFF_NCCL_H
#define ASYNCDIFF_NCCL_H

#include <stddef.h>

#include "gpu.h"
#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest world size accepted (NCCL itself has no small limit; this only
 * keeps obviously wrong values out). */
#define AD_NCCL_MAX_WORLD 65536

typedef struct ad_nccl ad_nccl;

/* One buffer to send to `peer`: `nbytes` (> 0) device bytes at `ptr`. */
typedef struct ad_nccl_send {
    int peer;
    const void *ptr;
    size_t nbytes;
} ad_nccl_send;

/* One buffer to fill with `nbytes` (> 0) bytes received from `peer`. */
typedef struct ad_nccl_recv {
    int peer;
    void *ptr;
    size_t nbytes;
} ad_nccl_recv;

/* A fresh unique id (ncclGetUniqueId): rank 0 makes it, every rank passes
 * the same 128 bytes to ad_nccl_init. */
ad_status ad_nccl_unique_id(unsigned char id[AD_NCCL_UNIQUE_ID_BYTES], ad_err *err);

/* Check init's arguments without touching a library: world in
 * [1, AD_NCCL_MAX_WORLD], rank in [0, world), device >= 0, timeout finite
 * and >= 0.  AD_EINVAL naming the argument otherwise. */
ad_status ad_nccl_check_init(int world, int rank, int device, double timeout_s, ad_err *err);

/* Create rank `rank` of `world` on CUDA device `device` (also checked
 * against the device count).  Waits up to timeout_s for the other ranks
 * when the communicator is non-blocking.  On success *out is a new handle;
 * on failure *out is NULL and nothing is left behind. */
ad_status ad_nccl_init(const unsigned char id[AD_NCCL_UNIQUE_ID_BYTES], int world, int rank,
                       int device, double timeout_s, ad_nccl **out, ad_err *err);

/* Check exchange items without touching a library: peers in [0, world),
 * non-NULL pointers, nbytes > 0, arrays non-NULL when their count is > 0.
 * AD_EINVAL naming "sends" or "recvs" otherwise. */
ad_status ad_nccl_check_items(int world, const ad_nccl_send *sends, size_t ns,
                              const ad_nccl_recv *recvs, size_t nr, ad_err *err);

/* One event (see above).  compute_stream: the caller's cudaStream_t (NULL
 * is the legacy default stream).  With no items at all nothing is queued. */
ad_status ad_nccl_exchange(ad_nccl *h, const ad_nccl_send *sends, size_t ns,
                           const ad_nccl_recv *recvs, size_t nr, void *compute_stream,
                           double timeout_s, ad_err *err);

/* Wait (bounded) until every exchange queued so far has finished on the
 * GPU.  Same failure handling as the exchange. */
ad_status ad_nccl_wait(ad_nccl *h, double timeout_s, ad_err *err);

/* Release the handle.  abort == 0: wait for queued work (bounded by the
 * init timeout), finalize and destroy the communicator, aborting instead
 * if any of that fails.  abort != 0: ncclCommAbort at once (for a rank that
 * gives up after an error; peers fail rather than wait).  NULL is fine. */
void ad_nccl_destroy(ad_nccl *h, int abort);

/* Properties of a handle. */
int ad_nccl_world(const ad_nccl *h);
int ad_nccl_rank(const ad_nccl *h);
int ad_nccl_device(const ad_nccl *h);
int ad_nccl_is_blocking(const ad_nccl *h); /* 1: NCCL too old for non-blocking */
int ad_nccl_failed(const ad_nccl *h);      /* 1 once aborted */
void *ad_nccl_stream(const ad_nccl *h);    /* the comm stream (cudaStream_t) */

#ifdef __cplusplus
}
#endif

#endif /* ASYNCDIFF_NCCL_H */
