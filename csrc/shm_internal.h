/*
 * shm_internal.h -- what the three parts of the shared-memory transport
 * share (shm.c: control segment, attach/detach, barrier; shm_live.c:
 * liveness -- heartbeat thread, error records, the one wait loop;
 * shm_data.c: data segment, reserve, publish/fetch, all-gather).  Not part
 * of the API: only those files include it.  Plain C, no Python.h.
 *
 * Memory layout of the control segment (layout version SHM_VERSION):
 *
 *   [ header, 64 bytes ]
 *   [ slot of rank 0, 128 bytes ] ... [ slot of rank W-1 ]
 *   [ record of rank 0, 896 bytes ] ... [ record of rank W-1 ]
 *
 * A slot is two cache lines: the event protocol's counters (line 1), then
 * the event tags, the heartbeat and whom the rank waits for (line 2).  A record holds the rank's
 * error message (256 bytes) and its two all-gather areas (320 bytes each).
 * Every slot field another process may change concurrently is a C11
 * atomic.  Each slot and record has exactly one writer (its rank; detach
 * and the rank's heartbeat thread included), so a plain "load, compare,
 * store" is enough to move a counter forward.  Publication of data uses
 * release stores on `published` and acquire loads in readers; the reverse
 * direction (a reader telling the writer it may overwrite) uses release
 * stores on `ack` and acquire loads in the writer.  Records are plain
 * bytes ordered by an atomic: the error message is written once, before the
 * release store of state = FAILED; an all-gather record is written before
 * the release store of the rank's barrier counter.
 *
 * The data segment holds two buffers of `cap` bytes each (cap is a multiple
 * of 64): buffer 0 at offset 0, buffer 1 at offset cap.  Event seq uses
 * buffer seq % 2.
 */
#ifndef ASYNCDIFF_SHM_INTERNAL_H
#define ASYNCDIFF_SHM_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "shm.h"

#if !defined(ATOMIC_LLONG_LOCK_FREE) || ATOMIC_LLONG_LOCK_FREE != 2
#error "asyncdiff shm transport needs lock-free 64-bit atomics"
#endif

#define SHM_MAGIC UINT64_C(0x3144444d48534441) /* "ADSHMDD1" little endian */
#define SHM_VERSION 2u
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
    /* line 1: the event protocol */
    _Atomic uint64_t published; /* last event this rank made visible */
    _Atomic uint64_t ack;       /* this rank read everything up to here */
    _Atomic uint64_t barrier;   /* number of barriers this rank entered */
    _Atomic uint32_t state;     /* SLOT_* */
    _Atomic int32_t pid;        /* owner's pid, 0 until known */
    _Atomic uint64_t pidns;     /* owner's pid namespace (inode), 0 unknown */
    _Atomic uint64_t wrote[2];  /* last seq written into buffer 0 / 1 */
    char pad1_[SHM_LINE - 7 * 8];
    /* line 2: identity of the events in the buffers, liveness */
    _Atomic uint64_t tag[2];    /* tag of event wrote[b], stored with it */
    _Atomic uint64_t beat;      /* CLOCK_MONOTONIC ns of the last heartbeat
                                 * of this rank, 0 if it never beat */
    _Atomic uint64_t waiting;   /* bit r: this rank is inside a wait for
                                 * rank r (0: not waiting) */
    char pad2_[SHM_LINE - 4 * 8];
} shm_slot;

/* One all-gather contribution: written by its rank before it enters the
 * all-gather's barrier, read by everyone after it. */
typedef struct shm_gather {
    uint64_t round;                      /* all-gather number (from 1) */
    uint64_t len;                        /* bytes in data */
    unsigned char data[AD_SHM_MAX_RECORD];
    char pad_[SHM_LINE - 2 * 8];
} shm_gather;

typedef struct shm_record {
    char error[AD_SHM_MAX_ERROR + 1]; /* NUL-terminated; see ad_shm_fail */
    shm_gather gather[2];             /* all-gather round r uses r % 2 */
} shm_record;

_Static_assert(AD_SHM_MAX_WORLD <= 64, "slot.waiting is a 64-bit rank mask");
_Static_assert(sizeof(shm_header) == SHM_LINE, "header must fill one line");
_Static_assert(sizeof(shm_slot) == 2 * SHM_LINE, "slot must fill two lines");
_Static_assert(sizeof(shm_gather) % SHM_LINE == 0, "gather area: whole lines");
_Static_assert(sizeof(shm_record) % SHM_LINE == 0, "record: whole lines");
_Static_assert(sizeof(shm_record) == 896, "record layout changed: bump SHM_VERSION");

struct ad_shm {
    char name[AD_SHM_MAX_NAME + 1]; /* control segment name */
    int world;
    int rank;
    int created;       /* this handle created the control segment */
    int attached;      /* our slot is ours (state set to ATTACHED) */
    int failed;        /* marked failed (ad_shm_fail, a failed reserve or
                        * fetch): later calls are refused */
    char why[AD_SHM_MAX_ERROR + 1]; /* the failure's message ("" if none) */
    unsigned char *ctl;   /* control mapping */
    size_t ctl_len;
    unsigned char *data;  /* data mapping: two buffers of `cap` bytes */
    size_t data_len;
    size_t cap;
    uint64_t gen;         /* generation of `data` */
    uint64_t last_pub;    /* last seq this rank published */
    uint64_t nbarrier;    /* barriers entered by this rank */
    uint64_t ngather;     /* all-gathers entered by this rank */
    uint64_t pidns;       /* our pid namespace, 0 if unknown */
    int have_proc;        /* /proc/<pid>/stat can be read here */
    pid_t owner;          /* the process that attached: in a child forked
                           * later, detach only unmaps and frees */
    /* Heartbeat thread (shm_live.c). */
    _Atomic int busy;     /* ad_shm_set_busy: beat while set */
    int beat_running;     /* the thread exists and must be joined */
    int beat_stop;        /* under beat_mu: the thread must end */
    pthread_t beat_thread;
    pthread_mutex_t beat_mu;
    pthread_cond_t beat_cv;
};

static inline shm_header *hdr_of(const ad_shm *h)
{
    return (shm_header *)(void *)h->ctl;
}

static inline shm_slot *slot_of(const ad_shm *h, int r)
{
    return (shm_slot *)(void *)(h->ctl + sizeof(shm_header)) + r;
}

static inline shm_record *record_of(const ad_shm *h, int r)
{
    return (shm_record *)(void *)(h->ctl + sizeof(shm_header) +
                                  (size_t)h->world * sizeof(shm_slot)) + r;
}

/* Bytes of the control segment for `world` ranks. */
static inline size_t shm_ctl_size(int world)
{
    return sizeof(shm_header) +
           (size_t)world * (sizeof(shm_slot) + sizeof(shm_record));
}

static inline double shm_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline uint64_t shm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

/* Sleep for `ns` (< 1 s) nanoseconds; callers poll, so an early wake-up by
 * a signal does not matter. */
static inline void shm_sleep_ns(long ns)
{
    struct timespec ts;
    ts.tv_sec = 0;
    ts.tv_nsec = ns;
    nanosleep(&ts, NULL);
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

/* Fail at once on a closed, NULL or failed handle. */
ad_status ad_shm_check_handle(const ad_shm *h, ad_err *err);

/* Every wait is bounded: a finite timeout >= 0. */
ad_status ad_shm_check_timeout(double timeout_s, ad_err *err);

/*
 * Poll until the spec is met, an awaited rank has been silent for timeout_s
 * (AD_ETIMEDOUT: no progress, no heartbeat since max(start of the wait, its
 * last beat)), or an awaited rank is gone, or any rank failed
 * (AD_EPEERGONE, ad_err.peer set).  `op` names the operation in the
 * messages.
 */
ad_status ad_shm_wait_for(ad_shm *h, const wait_spec *w, double timeout_s, const char *op,
                          ad_err *err);

/* Enter the next counting barrier and wait for every other rank in it. */
ad_status ad_shm_enter_barrier(ad_shm *h, double timeout_s, const char *op, ad_err *err);

/* Start the heartbeat thread of an attached handle (attach); stop and join
 * it (detach; harmless when it was never started). */
ad_status ad_shm_beat_start(ad_shm *h, ad_err *err);
void ad_shm_beat_stop(ad_shm *h);

#endif /* ASYNCDIFF_SHM_INTERNAL_H */
