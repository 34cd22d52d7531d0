/*
 * shm.c -- shared-memory transport, control part: the control segment,
 * attach / unlink / detach and the barrier.  Peers' liveness, the wait
 * loop, the heartbeat and error records are in shm_live.c; the data segment
 * (reserve, publish, fetch) and the all-gather in shm_data.c; the layout
 * they share is in shm_internal.h and the protocol in shm.h.
 *
 * Pure C (POSIX shm + C11 atomics); never includes Python.h.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* A POSIX shm name: "/" then 1..AD_SHM_MAX_NAME-1 bytes, no other '/'. */
static ad_status check_name(const char *name, ad_err *err)
{
    size_t len;
    if (name == NULL)
        return AD_INVALID(err, "name", "segment name is NULL");
    len = strlen(name);
    if (len < 2 || len > AD_SHM_MAX_NAME || name[0] != '/' ||
        strchr(name + 1, '/') != NULL)
        return AD_INVALID(err, "name",
                          "segment name must be '/' followed by 1..%d bytes "
                          "without '/', got \"%.64s\"",
                          AD_SHM_MAX_NAME - 1, name);
    return AD_OK;
}

/* Identity of our pid namespace (the inode of /proc/self/ns/pid), or 0.
 * Pids of processes in another namespace mean nothing to us. */
static uint64_t own_pidns(void)
{
    struct stat sb;
    if (stat("/proc/self/ns/pid", &sb) != 0)
        return 0;
    return (uint64_t)sb.st_ino;
}

/* Rank 0: create and initialise the control segment. */
static ad_status create_ctl(ad_shm *h, ad_err *err)
{
    ad_status st = AD_OK;
    shm_header *hd;
    shm_slot *s0;
    int fd;
    void *p;

    fd = shm_open(h->name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        int e = errno;
        return ad_err_sys(err, e, "name", "shm_open(\"%s\", O_CREAT|O_EXCL) "
                          "failed: %s", h->name, strerror(e));
    }
    h->created = 1; /* from here on, failure paths unlink the name */
    if (ftruncate(fd, (off_t)h->ctl_len) != 0) {
        int e = errno;
        st = ad_err_sys(err, e, NULL, "ftruncate(\"%s\", %zu) failed: %s",
                        h->name, h->ctl_len, strerror(e));
        goto done;
    }
    p = mmap(NULL, h->ctl_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        st = ad_err_sys(err, e, NULL, "mmap(\"%s\", %zu) failed: %s",
                        h->name, h->ctl_len, strerror(e));
        goto done;
    }
    h->ctl = p;
    hd = hdr_of(h);
    s0 = slot_of(h, 0);
    /* ftruncate zero-filled everything; set what is not zero. */
    atomic_store_explicit(&hd->version, SHM_VERSION, memory_order_relaxed);
    atomic_store_explicit(&hd->world, (uint32_t)h->world, memory_order_relaxed);
    atomic_store_explicit(&s0->pidns, h->pidns, memory_order_relaxed);
    atomic_store_explicit(&s0->pid, (int32_t)getpid(), memory_order_relaxed);
    atomic_store_explicit(&s0->state, SLOT_ATTACHED, memory_order_relaxed);
    h->attached = 1;
    /* The magic goes last: whoever sees it sees the fields above. */
    atomic_store_explicit(&hd->magic, SHM_MAGIC, memory_order_release);
done:
    close(fd);
    return st;
}

/* Other ranks: wait for rank 0's segment, map it and claim our slot. */
static ad_status open_ctl(ad_shm *h, double timeout_s, ad_err *err)
{
    const double start = shm_now_s();
    ad_status st = AD_OK;
    int fd = -1;
    long nap_ns = 1000;
    shm_header *hd;
    shm_slot *me;
    uint32_t world, version, expect = SLOT_FREE;
    const char *stage = "the segment to exist";

    for (;;) {
        if (fd < 0) {
            fd = shm_open(h->name, O_RDWR, 0);
            if (fd < 0 && errno != ENOENT) {
                int e = errno;
                return ad_err_sys(err, e, "name", "shm_open(\"%s\") failed: %s",
                                  h->name, strerror(e));
            }
        }
        if (fd >= 0 && h->ctl == NULL) {
            struct stat sb;
            stage = "the segment to be sized";
            if (fstat(fd, &sb) != 0) {
                int e = errno;
                st = ad_err_sys(err, e, NULL, "fstat(\"%s\") failed: %s",
                                h->name, strerror(e));
                goto done;
            }
            /* Rank 0 sizes the object right after creating it. */
            if ((size_t)sb.st_size >= sizeof(shm_header)) {
                void *p = mmap(NULL, (size_t)sb.st_size,
                               PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (p == MAP_FAILED) {
                    int e = errno;
                    st = ad_err_sys(err, e, NULL, "mmap(\"%s\", %lld) failed: "
                                    "%s", h->name, (long long)sb.st_size,
                                    strerror(e));
                    goto done;
                }
                h->ctl = p;
                h->ctl_len = (size_t)sb.st_size;
                stage = "the segment to be initialised";
            }
        }
        if (h->ctl != NULL &&
            atomic_load_explicit(&hdr_of(h)->magic, memory_order_acquire) ==
                SHM_MAGIC)
            break;
        if (shm_now_s() - start >= timeout_s) {
            st = ad_err_set(err, AD_ETIMEDOUT, NULL,
                            "attach: timed out after %.3g s while rank %d "
                            "waited for rank 0 to create shared memory "
                            "\"%s\" (waiting for %s)",
                            timeout_s, h->rank, h->name, stage);
            goto done;
        }
        shm_sleep_ns(nap_ns);
        if (nap_ns < 64000)
            nap_ns *= 2;
    }

    hd = hdr_of(h);
    version = atomic_load_explicit(&hd->version, memory_order_relaxed);
    world = atomic_load_explicit(&hd->world, memory_order_relaxed);
    if (version != SHM_VERSION) {
        st = ad_err_set(err, AD_ESTATE, NULL,
                        "shared memory \"%s\" has layout version %u, this "
                        "build speaks %u", h->name, version, SHM_VERSION);
        goto done;
    }
    if ((int)world != h->world || h->ctl_len < shm_ctl_size(h->world)) {
        st = AD_INVALID(err, "world_size",
                        "world_size mismatch: rank %d was started with "
                        "world_size=%d but rank 0 created \"%s\" for "
                        "world_size=%u", h->rank, h->world, h->name, world);
        goto done;
    }
    me = slot_of(h, h->rank);
    if (!atomic_compare_exchange_strong_explicit(&me->state, &expect,
                                                 SLOT_ATTACHED,
                                                 memory_order_acq_rel,
                                                 memory_order_acquire)) {
        st = ad_err_set(err, AD_ESTATE, "rank",
                        "rank %d is already attached to \"%s\" (pid %d): two "
                        "processes with the same rank, or a stale segment",
                        h->rank, h->name,
                        (int)atomic_load_explicit(&me->pid,
                                                  memory_order_relaxed));
        goto done;
    }
    atomic_store_explicit(&me->pidns, h->pidns, memory_order_relaxed);
    atomic_store_explicit(&me->pid, (int32_t)getpid(), memory_order_release);
    h->attached = 1;
done:
    if (fd >= 0)
        close(fd);
    return st;
}

ad_status ad_shm_attach(const char *name, int world, int rank, int create,
                        double timeout_s, ad_shm **out, ad_err *err)
{
    ad_status st;
    ad_shm *h = NULL;
    _Atomic uint64_t probe = 0;

    if (out == NULL)
        return AD_INVALID(err, "out", "output pointer is NULL");
    *out = NULL;
    if ((st = check_name(name, err)) != AD_OK)
        return st;
    if (world < 1 || world > AD_SHM_MAX_WORLD)
        return AD_INVALID(err, "world_size",
                          "world_size must be in 1..%d, got %d",
                          AD_SHM_MAX_WORLD, world);
    if (rank < 0 || rank >= world)
        return AD_INVALID(err, "rank", "rank must be in 0..%d, got %d",
                          world - 1, rank);
    if ((create != 0) != (rank == 0))
        return AD_INVALID(err, "create",
                          "rank 0 creates the segment and the other ranks open "
                          "it; got create=%d on rank %d", create, rank);
    if ((st = ad_shm_check_timeout(timeout_s, err)) != AD_OK)
        return st;
    if (!atomic_is_lock_free(&probe))
        return ad_err_set(err, AD_EUNSUPPORTED, NULL,
                          "64-bit atomics are not lock-free on this machine");

    h = calloc(1, sizeof *h);
    if (h == NULL)
        return AD_NOMEM(err, "the shared-memory handle");
    memcpy(h->name, name, strlen(name) + 1);
    h->world = world;
    h->rank = rank;
    h->ctl_len = shm_ctl_size(world);
    h->pidns = own_pidns();
    h->have_proc = access("/proc/self/stat", R_OK) == 0;
    h->owner = getpid();

    st = create ? create_ctl(h, err) : open_ctl(h, timeout_s, err);
    if (st == AD_OK)
        st = ad_shm_beat_start(h, err);
    if (st != AD_OK)
        goto error;
    *out = h;
    return AD_OK;

error:
    /* Nothing was published by a half-made handle: leave quietly.  Rank 0
     * removes its name (ad_shm_detach does it for a handle it created). */
    ad_shm_detach(h, 1);
    return st;
}

ad_status ad_shm_unlink(const char *name, ad_err *err)
{
    ad_status st = check_name(name, err);
    if (st != AD_OK)
        return st;
    if (shm_unlink(name) != 0 && errno != ENOENT) {
        int e = errno;
        return ad_err_sys(err, e, "name", "shm_unlink(\"%s\") failed: %s",
                          name, strerror(e));
    }
    return AD_OK;
}

void ad_shm_detach(ad_shm *h, int failed)
{
    if (h == NULL)
        return;
    if (h->owner != 0 && h->owner != getpid()) {
        /* A child forked after attach: the rank, its slot and its heartbeat
         * thread belong to the parent (the thread does not even exist
         * here).  Only drop this process's copy of the mappings. */
        if (h->data != NULL)
            munmap(h->data, h->data_len);
        if (h->ctl != NULL)
            munmap(h->ctl, h->ctl_len);
        free(h);
        return;
    }
    ad_shm_beat_stop(h); /* before the mapping it writes goes */
    if (h->ctl != NULL && h->attached && !h->failed) {
        /* (A rank marked failed already said so, with its message.) */
        shm_slot *me = slot_of(h, h->rank);
        if (!failed) {
            /* A rank that left reads nothing more: let publishers on. */
            atomic_store_explicit(&me->ack, UINT64_MAX, memory_order_release);
        }
        atomic_store_explicit(&me->state,
                              failed ? SLOT_FAILED : SLOT_CLOSED,
                              memory_order_release);
    }
    if (h->data != NULL)
        munmap(h->data, h->data_len);
    if (h->ctl != NULL)
        munmap(h->ctl, h->ctl_len);
    /* The creator makes sure its name does not outlive it (normally it was
     * unlinked long ago and this is a harmless ENOENT). */
    if (h->created)
        shm_unlink(h->name);
    free(h);
}

/*
 * Counting barrier: entering the n-th barrier sets our counter to n; we may
 * leave when every other counter is >= n.  Nobody can be more than one
 * barrier ahead of a rank still inside, so plain counters suffice.
 */
ad_status ad_shm_enter_barrier(ad_shm *h, double timeout_s, const char *op, ad_err *err)
{
    wait_spec w;
    h->nbarrier++;
    atomic_store_explicit(&slot_of(h, h->rank)->barrier, h->nbarrier,
                          memory_order_release);
    w.kind = W_BARRIER;
    w.target = h->nbarrier;
    w.only = -1;
    return ad_shm_wait_for(h, &w, timeout_s, op, err);
}

ad_status ad_shm_barrier(ad_shm *h, double timeout_s, ad_err *err)
{
    ad_status st = ad_shm_check_handle(h, err);
    if (st == AD_OK)
        st = ad_shm_check_timeout(timeout_s, err);
    if (st == AD_OK)
        st = ad_shm_enter_barrier(h, timeout_s, "barrier", err);
    return st;
}

int ad_shm_world(const ad_shm *h)
{
    return h != NULL ? h->world : 0;
}

int ad_shm_rank(const ad_shm *h)
{
    return h != NULL ? h->rank : -1;
}
