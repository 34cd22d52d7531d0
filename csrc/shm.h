/*
 * shm.h -- shared-memory transport between the ranks of one host
 * (docs/design.md §5.1).
 *
 * Pure C (no Python.h).  W processes ("ranks", 1..AD_SHM_MAX_WORLD) share
 *
 *   - one small CONTROL segment, created by rank 0 under a POSIX shm name
 *     (e.g. "/asyncdiff-1234-abcd"), holding a header, two cache lines of
 *     counters per rank (published seq, acknowledged seq, barrier count,
 *     state, pid, event tags, heartbeat), all C11 atomics, and one record
 *     area per rank (its error message and its all-gather records);
 *   - one DATA segment made of two equal buffers.  Event `seq` uses buffer
 *     (seq % 2), so a rank can publish event seq+1 while its peers still read
 *     event seq.  The data segment is replaced (bigger) by ad_shm_reserve.
 *
 * Protocol, per event seq (every rank numbers events identically from 1):
 *
 *   publisher:  ad_shm_publish(seq, tag) -- waits until every other rank has
 *               acknowledged seq-2 (done reading the buffer it is about to
 *               overwrite), copies its items in, stores `tag` with the event,
 *               then releases published=seq.
 *   reader:     ad_shm_fetch(seq, src, tag) -- waits for published[src] >=
 *               seq, checks that src stored the same tag for seq (else the
 *               ranks are out of step: see ad_shm_fetch) and copies items
 *               out.  A reader must finish every fetch of event e before it
 *               publishes e+1 (publish acknowledges e for it) or call
 *               ad_shm_ack(e) explicitly.
 *
 * Each rank should call ad_shm_publish for every event (possibly with zero
 * items): that is what moves its acknowledgement forward (a rank that skips
 * events must call ad_shm_ack instead, or its peers' publishes stall).
 * Fetching an event its source skipped fails with AD_ESTATE ("seq").
 *
 * Liveness.  Every wait notices at once (milliseconds) a peer that left
 * (ad_shm_detach), failed (ad_shm_fail, ad_shm_detach(h, 1)), exited or was
 * killed (its pid gone or a zombie): such waits fail with AD_EPEERGONE, with
 * ad_err.peer = that rank and, for a failed rank, the message it left
 * ("<op>: rank R failed: <message>").  A wait also fails that way as soon as
 * any rank of the world (not only the awaited ones) is marked failed.
 * `timeout_s` (seconds, finite, >= 0; 0 = test once) bounds SILENCE, not the
 * wait: each handle runs a heartbeat thread that, while the rank is marked
 * busy (ad_shm_set_busy), stores the CLOCK_MONOTONIC time into its slot every
 * AD_SHM_BEAT_MS.  A wait times out (AD_ETIMEDOUT) only when an awaited rank
 * has neither made the awaited progress nor beaten for timeout_s seconds
 * since the wait began: a busy, beating rank is waited for indefinitely; a
 * stopped (SIGSTOP) or hung-in-C rank, or one that is not busy, is not.  A
 * rank that is itself inside a wait counts as making progress only through
 * the ranks it waits for (each waiting rank shows in its slot whom it waits
 * for): a chain ending at a computing, beating rank is waited for; busy
 * ranks that wait for each other (a deadlock: ranks given different
 * arguments) time out after timeout_s (+ at most AD_SHM_BEAT_MS) with a
 * message that says so.  Timeouts shorter than a few heartbeat periods are
 * therefore only meant for ranks that are not busy.  Errors are reported as ad_status + ad_err
 * (see status.h); nothing here exits, aborts or asserts.
 *
 * Names: after every rank is attached (and after every reserve) the segment
 * names are unlinked, so /dev/shm holds nothing even if processes are killed
 * later.  On an error during attach rank 0 unlinks the control segment; on
 * an error during reserve every rank unlinks the data segment being made.
 *
 * Threading: one handle belongs to one thread at a time (no internal locks),
 * except ad_shm_set_busy, which any thread may call at any time.  The
 * heartbeat thread (started by attach, joined by detach) blocks every signal
 * and touches nothing but its rank's heartbeat word.  None of the calls
 * touches Python; a binding may drop the GIL around them.
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

/* Bytes of an error message kept by ad_shm_fail (longer ones are cut at a
 * UTF-8 character boundary). */
#define AD_SHM_MAX_ERROR 255

/* Largest record of one rank in ad_shm_allgather. */
#define AD_SHM_MAX_RECORD 256

/* Period of the heartbeat of a busy rank, in milliseconds. */
#define AD_SHM_BEAT_MS 100

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
 * others switch to it; every rank unlinks the name before returning (and
 * on failure), so a rank killed midway leaves nothing in /dev/shm as long
 * as one rank survives.  Data already published stays readable.  If the
 * slow path fails on any rank (timeout, peer gone, mmap/ftruncate/
 * posix_fallocate error) that rank's handle is marked failed with the
 * error's message (ad_shm_fail): its later calls return AD_ESTATE and peers
 * waiting on it get AD_EPEERGONE; detach it. */
ad_status ad_shm_reserve(ad_shm *h, size_t bytes, double timeout_s,
                         ad_err *err);

/* Bytes available in each data buffer (0 before the first reserve). */
size_t ad_shm_capacity(const ad_shm *h);

/* World size and rank of a handle. */
int ad_shm_world(const ad_shm *h);
int ad_shm_rank(const ad_shm *h);

/* Publish event seq (>= 1) with identity `tag`: see the protocol above.
 * Items must lie inside the buffer (offset + nbytes <= capacity), else
 * AD_EINVAL naming "items".  The tag is opaque to the transport, except in
 * ad_shm_fetch's message, which reads it as (pipeline call << 32) |
 * denoiser call k. */
ad_status ad_shm_publish(ad_shm *h, uint64_t seq, uint64_t tag,
                         const ad_shm_item *items, size_t n, double timeout_s,
                         ad_err *err);

/* Copy items of event seq published by rank src (src may be our own rank).
 * If src published seq with a tag other than `tag`, fail with AD_ESTATE
 * ("exchange out of step: rank S sent event E as pipeline call C, denoiser
 * call K; rank R expected pipeline call C', denoiser call K' (the ranks were
 * given different arguments)") and mark this handle failed with that
 * message (ad_shm_fail), so that every peer learns it at once. */
ad_status ad_shm_fetch(ad_shm *h, uint64_t seq, int src, uint64_t tag,
                       const ad_shm_item *items, size_t n, double timeout_s,
                       ad_err *err);

/* Collective: every rank contributes `n` <= AD_SHM_MAX_RECORD bytes at
 * `mine` (n may differ between ranks) and receives every rank's record:
 * rank r's at all + r * AD_SHM_MAX_RECORD (`all` holds world *
 * AD_SHM_MAX_RECORD bytes), its length in lens[r].  One barrier; records
 * live in the control segment (two areas per rank, used by round parity).
 * Every rank must make the same sequence of collective calls (barrier,
 * reserve, allgather); a rank found at another round fails with AD_ESTATE. */
ad_status ad_shm_allgather(ad_shm *h, const void *mine, size_t n, void *all,
                           size_t *lens, double timeout_s, ad_err *err);

/* Mark this rank failed, leaving `message` (may be NULL or empty; cut to
 * AD_SHM_MAX_ERROR bytes) for its peers: the message is stored in the
 * rank's record before the state becomes FAILED (release), so a peer that
 * sees the state sees the message.  The first failure's message is kept (a
 * second ad_shm_fail, a failing reserve or fetch, or ad_shm_detach(h, 1)
 * does not replace it).  Later calls on the handle fail with AD_ESTATE;
 * detach it.  NULL or detached handles are ignored. */
void ad_shm_fail(ad_shm *h, const char *message);

/* busy != 0: this rank is inside a call (its heartbeat thread beats from
 * now on, the first beat stored at once); busy == 0: it is not (beats
 * stop).  Safe from any thread; NULL is ignored. */
void ad_shm_set_busy(ad_shm *h, int busy);

/* This rank is done reading every event <= seq. */
void ad_shm_ack(ad_shm *h, uint64_t seq);

/* Leave: mark the rank closed (failed != 0, or an earlier ad_shm_fail:
 * failed, keeping the message of the first failure), so that peers waiting
 * on it fail at once with AD_EPEERGONE; stop the heartbeat thread; unmap,
 * close and free.  NULL and partially attached handles are fine.  After a
 * normal (failed == 0) detach peers no longer wait for this rank's
 * acknowledgements. */
void ad_shm_detach(ad_shm *h, int failed);

#ifdef __cplusplus
}
#endif

#endif /* ASYNCDIFF_SHM_H */
