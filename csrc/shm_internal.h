/*
 * shm_internal.h -- what the two halves of the shared-memory transport share
 * (shm.c: control segment, liveness, waits, attach/detach, barrier;
 * shm_data.c: data segment, reserve, publish/fetch).  Not part of the API:
 * only those two files include it.  Plain C, no Python.h.
 *
 * Memory layout of the control segment:
 *
 *   [ header, 64 bytes ][ slot of rank 0, 64 bytes ] ... [ slot of rank W-1 ]
 *
 * Every field another process may change concurrently is a C11 atomic.
 * Each slot has exactly one writer (its rank; detach included), so a plain
 * "load, compare, store" is enough to move a counter forward.  Publication
 * of data uses release stores on `published` and acquire loads in readers;
 * the reverse direction (a reader telling the writer it may overwrite) uses
 * release stores on `ack` and acquire loads in the writer.
 *
 * The data segment holds two buffers of `cap` bytes each (cap is a multiple
 * of 64): buffer 0 at offset 0, buffer 1 at offset cap.  Event seq uses
 * buffer seq % 2.
 */
#ifndef ASYNCDIFF_SHM_INTERNAL_H
#define ASYNCDIFF_SHM_INTERNAL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "shm.h"

#if !defined(ATOMIC_LLONG_LOCK_FREE) || ATOMIC_LLONG_LOCK_FREE != 2
#error "asyncdiff shm transport needs lock-free 64-bit atomics"
#endif

#define SHM_MAGIC UINT64_C(0x3144444d48534441) /* "ADSHMDD1" little endian */
#define SHM_VERSION 1u
#define SHM_LINE 64

/* Values of slot.state.  FREE is what ftruncate's zero fill gives. */
enum {
    SLOT_FREE = 0,
    SLOT_ATTACHED = 1,
    SLOT_CLOSED = 2,  /* left normally (ad_shm_detach(h, 0)) */
    SLOT_FAILED = 3   /* left because of an error (ad_shm_detach(h, 1)) */
};

typedef struct shm_header {
    _Atomic uint64_t magic;    /* stored last by the creator (release) */
    _Atomic uint32_t version;
    _Atomic uint32_t world;
    _Atomic uint64_t data_gen; /* generation of the current data segment */
    _Atomic uint64_t data_cap; /* bytes per buffer of that generation */
    char pad_[SHM_LINE - 4 * 8];
} shm_header;

typedef struct shm_slot {
    _Atomic uint64_t published; /* last event this rank made visible */
    _Atomic uint64_t ack;       /* this rank read everything up to here */
    _Atomic uint64_t barrier;   /* number of barriers this rank entered */
    _Atomic uint32_t state;     /* SLOT_* */
    _Atomic int32_t pid;        /* owner's pid, 0 until known */
    _Atomic uint64_t pidns;     /* owner's pid namespace (inode), 0 unknown */
    _Atomic uint64_t wrote[2];  /* last seq written into buffer 0 / 1 */
    char pad_[SHM_LINE - 7 * 8];
} shm_slot;

_Static_assert(sizeof(shm_header) == SHM_LINE, "header must fill one line");
_Static_assert(sizeof(shm_slot) == SHM_LINE, "slot must fill one line");

struct ad_shm {
    char name[AD_SHM_MAX_NAME + 1]; /* control segment name */
    int world;
    int rank;
    int created;       /* this handle created the control segment */
    int attached;      /* our slot is ours (state set to ATTACHED) */
    int broken;        /* a failed reserve left the buffers inconsistent */
    unsigned char *ctl;   /* control mapping */
    size_t ctl_len;
    unsigned char *data;  /* data mapping: two buffers of `cap` bytes */
    size_t data_len;
    size_t cap;
    uint64_t gen;         /* generation of `data` */
    uint64_t last_pub;    /* last seq this rank published */
    uint64_t nbarrier;    /* barriers entered by this rank */
    uint64_t pidns;       /* our pid namespace, 0 if unknown */
    int have_proc;        /* /proc/<pid>/stat can be read here */
};

static inline shm_header *hdr_of(const ad_shm *h)
{
    return (shm_header *)(void *)h->ctl;
}

static inline shm_slot *slot_of(const ad_shm *h, int r)
{
    return (shm_slot *)(void *)(h->ctl + sizeof(shm_header)) + r;
}

/* Raise a counter that only this process writes. */
static inline void shm_raise_counter(_Atomic uint64_t *c, uint64_t v)
{
    if (atomic_load_explicit(c, memory_order_relaxed) < v)
        atomic_store_explicit(c, v, memory_order_release);
}

/* What a wait is waiting for: counter `kind` of rank r reaching `target`. */
enum { W_PUBLISHED, W_ACK, W_BARRIER, W_DATAGEN };

typedef struct wait_spec {
    int kind;
    uint64_t target;
    int only;        /* the one rank awaited, or -1: every rank but our own */
} wait_spec;

/* Fail at once on a closed, NULL or broken handle. */
ad_status ad_shm_check_handle(const ad_shm *h, ad_err *err);

/* Every wait is bounded: a finite timeout >= 0. */
ad_status ad_shm_check_timeout(double timeout_s, ad_err *err);

/*
 * Poll until the spec is met, the deadline passes (AD_ETIMEDOUT), or an
 * awaited rank is gone (AD_EPEERGONE).  `op` names the operation in the
 * messages.
 */
ad_status ad_shm_wait_for(ad_shm *h, const wait_spec *w, double timeout_s, const char *op,
                          ad_err *err);

/* Enter the next counting barrier and wait for every other rank in it. */
ad_status ad_shm_enter_barrier(ad_shm *h, double timeout_s, const char *op, ad_err *err);

#endif /* ASYNCDIFF_SHM_INTERNAL_H */
