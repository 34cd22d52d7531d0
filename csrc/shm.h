/*
 * shm.h -- shared-memory transport between the ranks of one host
 * (docs/design.md §5.1).
 *
 * Pure C (no Python.h).  W processes ("ranks", 1..AD_SHM_MAX_WORLD) share
 *
 *   - one small CONTROL segment, created by rank 0 under a POSIX shm name
 *     (e.g. "/asyncdiff-1234-abcd"), holding a header and one cache line of
 *     counters per rank (published seq, acknowledged seq, barrier count,
 *     state, pid), all C11 atomics;
 *   - one DATA segment made of two equal buffers.  Event `seq` uses buffer
 *     (seq % 2), so a rank can publish event seq+1 while its peers still read
 *     event seq.  The data segment is replaced (bigger) by ad_shm_reserve.
 *
 * Protocol, per event seq (every rank numbers events identically from 1):
 *
 *   publisher:  ad_shm_publish(seq)  -- waits until every other rank has
 *               acknowledged seq-2 (done reading the buffer it is about to
 *               overwrite), copies its items in, then releases published=seq.
 *   reader:     ad_shm_fetch(seq, src) -- waits for published[src] >= seq and
 *               copies items out.  A reader must finish every fetch of event
 *               e before it publishes e+1 (publish acknowledges e for it) or
 *               call ad_shm_ack(e) explicitly.
 *
 * Each rank should call ad_shm_publish for every event (possibly with zero
 * items): that is what moves its acknowledgement forward (a rank that skips
 * events must call ad_shm_ack instead, or its peers' publishes stall).
 * Fetching an event its source skipped fails with AD_ESTATE ("seq").
 *
 * Every wait is bounded by `timeout_s` (seconds, finite, >= 0; 0 = test once)
 * and notices a peer that left (ad_shm_detach), exited or was killed
 * (its pid gone or a zombie): such waits fail with AD_EPEERGONE naming the
 * rank.  Errors are reported as ad_status + ad_err (see status.h); nothing
 * here exits, aborts or asserts.
 *
 * Names: after every rank is attached (and after every reserve) the segment
 * names are unlinked, so /dev/shm holds nothing even if processes are killed
 * later.  On an error during attach/reserve rank 0 unlinks what it created.
 *
 * Threading: one handle belongs to one thread at a time (no internal locks).
 * None of the calls touches Python; a binding may drop the GIL around them.
 */
#ifndef ASYNCDIFF_SHM_H
#define ASYNCDIFF_SHM_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest world size the control segment has room for. */
#define AD_SHM_MAX_WORLD 64

/* Longest accepted segment name, including the leading '/', excluding the
 * suffix the data segments add ("-d" + generation). */
#define AD_SHM_MAX_NAME 200

/* Opaque handle, one per attached rank. */
typedef struct ad_shm ad_shm;

/* One byte range: `nbytes` bytes at `offset` within a data buffer, copied
 * from (publish) or to (fetch) `ptr`.  nbytes == 0 is allowed (ptr ignored). */
typedef struct ad_shm_item {
    size_t offset;
    void *ptr;
    size_t nbytes;
} ad_shm_item;

/* Attach rank `rank` of `world` to the control segment `name` (must start
 * with '/', contain no other '/', at most AD_SHM_MAX_NAME bytes).
 * create != 0 (rank 0): create it exclusively (fails with AD_EIO/EEXIST if the
 * name exists).  create == 0: wait up to timeout_s for rank 0 to create and
 * initialise it.  A world size different from the creator's is AD_EINVAL
 * naming "world_size".  On success *out is a new handle; on failure *out is
 * NULL and nothing is left behind. */
ad_status ad_shm_attach(const char *name, int world, int rank, int create,
                        double timeout_s, ad_shm **out, ad_err *err);

/* Remove `name` (a control segment name) from the shm namespace.  Rank 0
 * calls it once all ranks are attached (after ad_shm_barrier).  A name that
 * is already gone is not an error. */
ad_status ad_shm_unlink(const char *name, ad_err *err);

/* Wait until every rank has entered the same (n-th) barrier.  After a
 * failed barrier the ranks are out of step: detach rather than retry. */
ad_status ad_shm_barrier(ad_shm *h, double timeout_s, ad_err *err);

/* Collective: make each of the two data buffers hold at least `bytes`.
 * Every rank must pass the same value.  When the current buffers are large
 * enough this returns at once, with no communication.  Otherwise all ranks
 * meet, rank 0 makes a new data segment (each buffer `bytes` rounded up to
 * 64), copies the old buffers' contents into it, publishes it, and the
 * others switch to it; the name is unlinked before returning.  Data already
 * published stays readable.  If the slow path fails on any rank (timeout,
 * peer gone, mmap/ftruncate/posix_fallocate error) that rank's handle is
 * marked failed: its later calls return AD_ESTATE and peers waiting on it
 * get AD_EPEERGONE; detach it. */
ad_status ad_shm_reserve(ad_shm *h, size_t bytes, double timeout_s,
                         ad_err *err);

/* Bytes available in each data buffer (0 before the first reserve). */
size_t ad_shm_capacity(const ad_shm *h);

/* World size and rank of a handle. */
int ad_shm_world(const ad_shm *h);
int ad_shm_rank(const ad_shm *h);

/* Publish event seq (>= 1): see the protocol above.  Items must lie inside
 * the buffer (offset + nbytes <= capacity), else AD_EINVAL naming "items". */
ad_status ad_shm_publish(ad_shm *h, uint64_t seq, const ad_shm_item *items,
                         size_t n, double timeout_s, ad_err *err);

/* Copy items of event seq published by rank src (src != own rank). */
ad_status ad_shm_fetch(ad_shm *h, uint64_t seq, int src,
                       const ad_shm_item *items, size_t n, double timeout_s,
                       ad_err *err);

/* This rank is done reading every event <= seq. */
void ad_shm_ack(ad_shm *h, uint64_t seq);

/* Leave: mark the rank closed (failed != 0: failed), so that peers waiting on
 * it fail at once with AD_EPEERGONE; unmap, close and free.  NULL and
 * partially attached handles are fine.  After a normal (failed == 0) detach
 * peers no longer wait for this rank's acknowledgements. */
void ad_shm_detach(ad_shm *h, int failed);

#ifdef __cplusplus
}
#endif

#endif /* ASYNCDIFF_SHM_H */
