/*
 * shm.c -- shared-memory transport between the ranks of one host.
 *
 * See shm.h for the protocol.  This file is pure C (POSIX shm + C11
 * atomics); it never includes Python.h.
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
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if !defined(ATOMIC_LLONG_LOCK_FREE) || ATOMIC_LLONG_LOCK_FREE != 2
#error "asyncdiff shm transport needs lock-free 64-bit atomics"
#endif

/* ------------------------------------------------------------------------ */
/* Shared layout                                                             */
/* ------------------------------------------------------------------------ */

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

/* Bytes of the control segment for `world` ranks. */
static size_t ctl_size(int world)
{
    return sizeof(shm_header) + (size_t)world * sizeof(shm_slot);
}

/* ------------------------------------------------------------------------ */
/* Handle                                                                    */
/* ------------------------------------------------------------------------ */

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

static shm_header *hdr_of(const ad_shm *h)
{
    return (shm_header *)(void *)h->ctl;
}

static shm_slot *slot_of(const ad_shm *h, int r)
{
    return (shm_slot *)(void *)(h->ctl + sizeof(shm_header)) + r;
}

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A hint to the CPU that we are in a spin loop. */
static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Sleep for `ns` nanoseconds (restarting is not needed: the callers poll). */
static void sleep_ns(long ns)
{
    struct timespec ts;
    ts.tv_sec = 0;
    ts.tv_nsec = ns;
    nanosleep(&ts, NULL);
}

/* Raise a counter that only this process writes. */
static void raise_counter(_Atomic uint64_t *c, uint64_t v)
{
    if (atomic_load_explicit(c, memory_order_relaxed) < v)
        atomic_store_explicit(c, v, memory_order_release);
}

static ad_status check_timeout(double timeout_s, ad_err *err)
{
    /* isfinite rejects NaN and infinities: every wait must be bounded. */
    if (!isfinite(timeout_s) || timeout_s < 0.0)
        return AD_INVALID(err, "timeout_s",
                          "timeout_s must be a finite number >= 0, got %g",
                          timeout_s);
    return AD_OK;
}

static ad_status check_handle(const ad_shm *h, ad_err *err)
{
    if (h == NULL || h->ctl == NULL)
        return AD_INVALID(err, "shm", "shared-memory handle is NULL or closed");
    if (h->broken)
        return ad_err_set(err, AD_ESTATE, NULL,
                          "shared-memory transport of rank %d is unusable "
                          "after an earlier failed reserve", h->rank);
    return AD_OK;
}

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

static void data_name(const ad_shm *h, uint64_t gen, char *buf, size_t len)
{
    snprintf(buf, len, "%s-d%llu", h->name, (unsigned long long)gen);
}

/* ------------------------------------------------------------------------ */
/* Liveness of peers                                                         */
/* ------------------------------------------------------------------------ */

/* Identity of our pid namespace (the inode of /proc/self/ns/pid), or 0.
 * Pids of processes in another namespace mean nothing to us. */
static uint64_t own_pidns(void)
{
    struct stat sb;
    if (stat("/proc/self/ns/pid", &sb) != 0)
        return 0;
    return (uint64_t)sb.st_ino;
}

/* Whether process `pid` is gone: 1 = no such process, 2 = zombie (exited,
 * not yet reaped: kill() still succeeds on it), 0 = alive or unknown.  We
 * never call a peer gone on a doubtful answer.  With /proc, one open/read
 * answers both questions; without it, kill(pid, 0) finds vanished pids. */
static int pid_gone(const ad_shm *h, pid_t pid)
{
    char path[48], buf[512];
    ssize_t n;
    int fd;
    char *close_paren;

    if (pid <= 0)
        return 0;
    if (!h->have_proc)
        return kill(pid, 0) == -1 && errno == ESRCH ? 1 : 0;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? 1 : 0;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    /* The state letter follows the last ')': the command name inside the
     * parentheses may itself hold ')' or spaces. */
    close_paren = strrchr(buf, ')');
    if (close_paren != NULL && close_paren[1] == ' ' &&
        (close_paren[2] == 'Z' || close_paren[2] == 'X'))
        return 2;
    return 0;
}

/* Why rank r can no longer make progress, or NULL if it still can.
 * check_pid: also ask the kernel about its process (one or two syscalls). */
static const char *peer_gone(const ad_shm *h, int r, int check_pid,
                             char *buf, size_t len)
{
    shm_slot *s = slot_of(h, r);
    uint32_t st = atomic_load_explicit(&s->state, memory_order_acquire);
    uint64_t ns;
    int32_t pid;
    int how;

    if (st == SLOT_CLOSED)
        return "has left (detached)";
    if (st == SLOT_FAILED)
        return "has failed (detached after an error)";
    if (st != SLOT_ATTACHED || !check_pid)
        return NULL;
    pid = atomic_load_explicit(&s->pid, memory_order_acquire);
    ns = atomic_load_explicit(&s->pidns, memory_order_relaxed);
    if (ns != 0 && h->pidns != 0 && ns != h->pidns)
        return NULL; /* another pid namespace: its pid is not ours to ask */
    how = pid_gone(h, (pid_t)pid);
    if (how == 0)
        return NULL;
    snprintf(buf, len, "%s (pid %d)",
             how == 1 ? "has died: its process no longer exists"
                      : "has died: its process is a zombie", (int)pid);
    return buf;
}

/* ------------------------------------------------------------------------ */
/* The one wait loop                                                         */
/* ------------------------------------------------------------------------ */

/* What a wait is waiting for: counter `kind` of rank r reaching `target`. */
enum { W_PUBLISHED, W_ACK, W_BARRIER, W_DATAGEN };

typedef struct wait_spec {
    int kind;
    uint64_t target;
    int only;        /* the one rank awaited, or -1: every rank but our own */
} wait_spec;

static uint64_t counter_of(const ad_shm *h, int kind, int r)
{
    switch (kind) {
    case W_PUBLISHED:
        return atomic_load_explicit(&slot_of(h, r)->published,
                                    memory_order_acquire);
    case W_ACK:
        return atomic_load_explicit(&slot_of(h, r)->ack, memory_order_acquire);
    case W_BARRIER:
        return atomic_load_explicit(&slot_of(h, r)->barrier,
                                    memory_order_acquire);
    default: /* W_DATAGEN: a header field written by rank 0 */
        return atomic_load_explicit(&hdr_of(h)->data_gen,
                                    memory_order_acquire);
    }
}

static const char *wait_what(int kind)
{
    switch (kind) {
    case W_PUBLISHED: return "publish event";
    case W_ACK: return "acknowledge (finish reading) event";
    case W_BARRIER: return "enter barrier";
    default: return "create data segment generation";
    }
}

/* Backoff phases of a wait, in microseconds since it began: spin with a
 * pause instruction, then hand the core over with sched_yield, then sleep
 * (1 us doubling to SLEEP_CAP_US; the kernel's timer slack makes the
 * shortest real sleep about 50 us).  The spin is kept very short on
 * purpose: on the 2-vCPU VM used for development, pause loops cost far more
 * than sched_yield (64 KiB ping-pong: ~9 us per event with 0-1 us of spin,
 * 20-40 us with 5-20 us of spin).  Waits in real use last milliseconds (a
 * denoiser step), where only the sleep phase matters.  Both can be changed
 * at build time (-DAD_SHM_SPIN_US=..., -DAD_SHM_YIELD_US=...). */
#ifndef AD_SHM_SPIN_US
#define AD_SHM_SPIN_US 1
#endif
#ifndef AD_SHM_YIELD_US
#define AD_SHM_YIELD_US 20
#endif
#define SLEEP_CAP_US 64
/* How often a waiter asks the kernel whether awaited peers still live. */
#define PID_CHECK_US 2000

/*
 * Poll until the spec is met, the deadline passes, or an awaited rank is
 * gone.  Peer states (closed/failed flags) are read on every round, one
 * atomic load each; peer pids are checked every PID_CHECK_US.
 */
static ad_status wait_for(ad_shm *h, const wait_spec *w, double timeout_s,
                          const char *op, ad_err *err)
{
    const double start = now_s();
    double next_pid_check = start + PID_CHECK_US * 1e-6;
    long nap_ns = 1000;
    int lo = w->only >= 0 ? w->only : 0;
    int hi = w->only >= 0 ? w->only + 1 : h->world;
    char why_buf[128];

    for (;;) {
        int pending = -1, r, check_pid = 0;
        double t = now_s(), waited = t - start;

        if (t >= next_pid_check) {
            check_pid = 1;
            next_pid_check = t + PID_CHECK_US * 1e-6;
        }
        for (r = lo; r < hi; r++) {
            const char *why;
            if (w->only < 0 && r == h->rank)
                continue;
            if (counter_of(h, w->kind, r) >= w->target)
                continue;
            if (pending < 0)
                pending = r;
            why = peer_gone(h, r, check_pid, why_buf, sizeof why_buf);
            /* The acquire load of the state orders the re-check after
             * anything the peer published before leaving. */
            if (why != NULL && counter_of(h, w->kind, r) < w->target)
                return ad_err_set(err, AD_EPEERGONE, NULL,
                                  "%s: rank %d %s while rank %d waited for it "
                                  "to %s %llu",
                                  op, r, why, h->rank, wait_what(w->kind),
                                  (unsigned long long)w->target);
        }
        if (pending < 0)
            return AD_OK;
        if (waited >= timeout_s)
            return ad_err_set(
                err, AD_ETIMEDOUT, NULL,
                "%s: timed out after %.3g s while rank %d waited for rank %d "
                "to %s %llu (it is at %llu)",
                op, timeout_s, h->rank, pending, wait_what(w->kind),
                (unsigned long long)w->target,
                (unsigned long long)counter_of(h, w->kind, pending));

        if (waited < AD_SHM_SPIN_US * 1e-6) {
            for (int i = 0; i < 16; i++)
                cpu_relax();
        } else if (waited < AD_SHM_YIELD_US * 1e-6) {
            sched_yield();
        } else {
            sleep_ns(nap_ns);
            if (nap_ns < SLEEP_CAP_US * 1000L)
                nap_ns *= 2;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Attach / unlink / detach                                                  */
/* ------------------------------------------------------------------------ */

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
    const double start = now_s();
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
        if (now_s() - start >= timeout_s) {
            st = ad_err_set(err, AD_ETIMEDOUT, NULL,
                            "attach: timed out after %.3g s while rank %d "
                            "waited for rank 0 to create shared memory "
                            "\"%s\" (waiting for %s)",
                            timeout_s, h->rank, h->name, stage);
            goto done;
        }
        sleep_ns(nap_ns);
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
    if ((int)world != h->world || h->ctl_len < ctl_size(h->world)) {
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
    if ((st = check_timeout(timeout_s, err)) != AD_OK)
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
    h->ctl_len = ctl_size(world);
    h->pidns = own_pidns();
    h->have_proc = access("/proc/self/stat", R_OK) == 0;

    st = create ? create_ctl(h, err) : open_ctl(h, timeout_s, err);
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
    if (h->ctl != NULL && h->attached) {
        shm_slot *me = slot_of(h, h->rank);
        failed = failed || h->broken;
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

/* ------------------------------------------------------------------------ */
/* Barrier                                                                   */
/* ------------------------------------------------------------------------ */

/*
 * Counting barrier: entering the n-th barrier sets our counter to n; we may
 * leave when every other counter is >= n.  Nobody can be more than one
 * barrier ahead of a rank still inside, so plain counters suffice.
 */
static ad_status barrier(ad_shm *h, double timeout_s, const char *op,
                         ad_err *err)
{
    wait_spec w;
    h->nbarrier++;
    atomic_store_explicit(&slot_of(h, h->rank)->barrier, h->nbarrier,
                          memory_order_release);
    w.kind = W_BARRIER;
    w.target = h->nbarrier;
    w.only = -1;
    return wait_for(h, &w, timeout_s, op, err);
}

ad_status ad_shm_barrier(ad_shm *h, double timeout_s, ad_err *err)
{
    ad_status st = check_handle(h, err);
    if (st == AD_OK)
        st = check_timeout(timeout_s, err);
    if (st == AD_OK)
        st = barrier(h, timeout_s, "barrier", err);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Reserve                                                                   */
/* ------------------------------------------------------------------------ */

/* Map data segment `dname` of `len` bytes; fd is closed afterwards. */
static ad_status map_data(int fd, const char *dname, size_t len, void **out,
                          ad_err *err)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        return ad_err_sys(err, e, NULL, "mmap(\"%s\", %zu) failed: %s", dname,
                          len, strerror(e));
    }
    *out = p;
    return AD_OK;
}

/* Rank 0's part: new segment, old contents copied, header updated. */
static ad_status reserve_create(ad_shm *h, uint64_t gen, size_t cap,
                                const char *dname, void **out, ad_err *err)
{
    ad_status st;
    size_t len = 2 * cap;
    unsigned char *p = NULL;
    int fd = shm_open(dname, O_RDWR | O_CREAT | O_EXCL, 0600);

    if (fd < 0) {
        int e = errno;
        return ad_err_sys(err, e, NULL, "shm_open(\"%s\", O_CREAT|O_EXCL) "
                          "failed: %s", dname, strerror(e));
    }
    if (ftruncate(fd, (off_t)len) != 0) {
        int e = errno;
        st = ad_err_sys(err, e, NULL, "ftruncate(\"%s\", %zu) failed: %s",
                        dname, len, strerror(e));
        goto done;
    }
    /* Reserve the pages now: on a small tmpfs (a container's default
     * /dev/shm is 64 MiB) a plain ftruncate would succeed and the first
     * memcpy past the limit would kill the process with SIGBUS. */
    {
        int rc = posix_fallocate(fd, 0, (off_t)len);
        if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
            st = ad_err_sys(err, rc, NULL,
                            "posix_fallocate(\"%s\", %zu) failed: %s (is "
                            "/dev/shm too small?)", dname, len, strerror(rc));
            goto done;
        }
    }
    st = map_data(fd, dname, len, (void **)&p, err);
    if (st != AD_OK)
        goto done;
    /* Keep both old buffers' contents (events published before the reserve
     * may still be fetched after it).  Every rank is inside the reserve,
     * so nobody writes them now. */
    if (h->data != NULL) {
        memcpy(p, h->data, h->cap);
        memcpy(p + cap, h->data + h->cap, h->cap);
    }
    atomic_store_explicit(&hdr_of(h)->data_cap, (uint64_t)cap,
                          memory_order_relaxed);
    atomic_store_explicit(&hdr_of(h)->data_gen, gen, memory_order_release);
    *out = p;
done:
    close(fd);
    if (st != AD_OK)
        shm_unlink(dname);
    return st;
}

/* Other ranks: wait for rank 0's new segment and map it. */
static ad_status reserve_open(ad_shm *h, uint64_t gen, size_t cap,
                              const char *dname, double timeout_s, void **out,
                              ad_err *err)
{
    ad_status st;
    wait_spec w;
    uint64_t their_cap;
    int fd;
    struct stat sb;

    w.kind = W_DATAGEN;
    w.target = gen;
    w.only = 0;
    st = wait_for(h, &w, timeout_s, "reserve", err);
    if (st != AD_OK)
        return st;
    their_cap = atomic_load_explicit(&hdr_of(h)->data_cap,
                                     memory_order_relaxed);
    if (atomic_load_explicit(&hdr_of(h)->data_gen, memory_order_relaxed) !=
            gen || their_cap != (uint64_t)cap)
        return AD_INVALID(err, "bytes",
                          "reserve: ranks disagree: rank %d asked for %zu-byte "
                          "buffers, rank 0 made %llu-byte buffers (every rank "
                          "must reserve the same sizes in the same order)",
                          h->rank, cap, (unsigned long long)their_cap);
    fd = shm_open(dname, O_RDWR, 0);
    if (fd < 0) {
        int e = errno;
        return ad_err_sys(err, e, NULL, "shm_open(\"%s\") failed: %s", dname,
                          strerror(e));
    }
    if (fstat(fd, &sb) != 0 || (size_t)sb.st_size < 2 * cap) {
        int e = errno;
        st = ad_err_set(err, AD_EINTERNAL, NULL,
                        "data segment \"%s\" is %lld bytes, expected %zu "
                        "(errno %d)", dname, (long long)sb.st_size, 2 * cap, e);
        goto done;
    }
    st = map_data(fd, dname, 2 * cap, out, err);
done:
    close(fd);
    return st;
}

ad_status ad_shm_reserve(ad_shm *h, size_t bytes, double timeout_s,
                         ad_err *err)
{
    ad_status st;
    size_t cap;
    uint64_t gen;
    void *p = NULL;
    char dname[AD_SHM_MAX_NAME + 32];

    if ((st = check_handle(h, err)) != AD_OK)
        return st;
    if ((st = check_timeout(timeout_s, err)) != AD_OK)
        return st;
    /* Fast path, decided alike on every rank (same history, same bytes). */
    if (bytes <= h->cap)
        return AD_OK;
    if (bytes > (SIZE_MAX / 2 - 64) || bytes > (size_t)(INT64_MAX / 4))
        return ad_err_set(err, AD_ENOMEM, "bytes",
                          "reserve: %zu bytes per buffer is too large", bytes);
    cap = (bytes + 63) & ~(size_t)63;
    gen = h->gen + 1;
    data_name(h, gen, dname, sizeof dname);

    /* 1. Everyone is here: no rank reads or writes the old buffers. */
    st = barrier(h, timeout_s, "reserve", err);
    if (st != AD_OK)
        goto error;

    /* 2. Rank 0 makes the segment; the others map it. */
    if (h->rank == 0)
        st = reserve_create(h, gen, cap, dname, &p, err);
    else
        st = reserve_open(h, gen, cap, dname, timeout_s, &p, err);
    if (st != AD_OK)
        goto error;
    if (h->data != NULL)
        munmap(h->data, h->data_len);
    h->data = p;
    h->data_len = 2 * cap;
    h->cap = cap;
    h->gen = gen;

    /* 3. Everyone mapped it: the name can go. */
    st = barrier(h, timeout_s, "reserve", err);
    if (h->rank == 0)
        shm_unlink(dname);
    if (st != AD_OK)
        goto error;
    return AD_OK;

error:
    /* The ranks may now disagree about the buffers: this handle is done
     * for, and peers waiting on us learn it at once. */
    if (h->rank == 0)
        shm_unlink(dname);
    h->broken = 1;
    atomic_store_explicit(&slot_of(h, h->rank)->state, SLOT_FAILED,
                          memory_order_release);
    return st;
}

size_t ad_shm_capacity(const ad_shm *h)
{
    return h != NULL ? h->cap : 0;
}

int ad_shm_world(const ad_shm *h)
{
    return h != NULL ? h->world : 0;
}

int ad_shm_rank(const ad_shm *h)
{
    return h != NULL ? h->rank : -1;
}

/* ------------------------------------------------------------------------ */
/* Publish / fetch / ack                                                     */
/* ------------------------------------------------------------------------ */

static ad_status check_items(const ad_shm *h, const ad_shm_item *items,
                             size_t n, ad_err *err)
{
    size_t i;
    if (n > 0 && items == NULL)
        return AD_INVALID(err, "items", "items is NULL but n=%zu", n);
    for (i = 0; i < n; i++) {
        const ad_shm_item *it = &items[i];
        if (it->nbytes == 0)
            continue;
        if (it->ptr == NULL)
            return AD_INVALID(err, "items", "items[%zu].ptr is NULL", i);
        if (it->offset > h->cap || it->nbytes > h->cap - it->offset)
            return AD_INVALID(err, "items",
                              "items[%zu] (offset %zu, %zu bytes) does not fit "
                              "in the %zu-byte buffer (call reserve first)",
                              i, it->offset, it->nbytes, h->cap);
    }
    return AD_OK;
}

static unsigned char *buffer_of(const ad_shm *h, uint64_t seq)
{
    return h->data + (size_t)(seq & 1u) * h->cap;
}

ad_status ad_shm_publish(ad_shm *h, uint64_t seq, const ad_shm_item *items,
                         size_t n, double timeout_s, ad_err *err)
{
    ad_status st;
    unsigned char *buf;
    size_t i;
    shm_slot *me;

    if ((st = check_handle(h, err)) != AD_OK)
        return st;
    if ((st = check_timeout(timeout_s, err)) != AD_OK)
        return st;
    if (seq == 0 || seq == UINT64_MAX)
        return AD_INVALID(err, "seq", "seq must be >= 1, got %llu",
                          (unsigned long long)seq);
    if (seq <= h->last_pub)
        return AD_INVALID(err, "seq",
                          "rank %d already published event %llu; events must "
                          "be published in increasing order (got %llu)",
                          h->rank, (unsigned long long)h->last_pub,
                          (unsigned long long)seq);
    if ((st = check_items(h, items, n, err)) != AD_OK)
        return st;

    me = slot_of(h, h->rank);
    /* Publishing seq means we are done with event seq-1 as a reader. */
    raise_counter(&me->ack, seq - 1);

    /* Buffer seq%2 last held event seq-2: wait until everyone read it. */
    if (seq >= 3) {
        wait_spec w;
        w.kind = W_ACK;
        w.target = seq - 2;
        w.only = -1;
        st = wait_for(h, &w, timeout_s, "publish", err);
        if (st != AD_OK)
            return st;
    }

    /* check_items let a non-empty item through only if cap > 0, i.e. only
     * if the data segment is mapped. */
    buf = h->data != NULL ? buffer_of(h, seq) : NULL;
    for (i = 0; i < n; i++)
        if (items[i].nbytes > 0)
            memcpy(buf + items[i].offset, items[i].ptr, items[i].nbytes);
    atomic_store_explicit(&me->wrote[seq & 1u], seq, memory_order_relaxed);
    /* Release: a reader that sees published >= seq sees the bytes above. */
    atomic_store_explicit(&me->published, seq, memory_order_release);
    h->last_pub = seq;
    return AD_OK;
}

ad_status ad_shm_fetch(ad_shm *h, uint64_t seq, int src,
                       const ad_shm_item *items, size_t n, double timeout_s,
                       ad_err *err)
{
    ad_status st;
    const unsigned char *buf;
    size_t i;
    wait_spec w;
    uint64_t wrote;

    if ((st = check_handle(h, err)) != AD_OK)
        return st;
    if ((st = check_timeout(timeout_s, err)) != AD_OK)
        return st;
    if (seq == 0 || seq == UINT64_MAX)
        return AD_INVALID(err, "seq", "seq must be >= 1, got %llu",
                          (unsigned long long)seq);
    if (src < 0 || src >= h->world)
        return AD_INVALID(err, "src", "src must be in 0..%d, got %d",
                          h->world - 1, src);
    if ((st = check_items(h, items, n, err)) != AD_OK)
        return st;

    w.kind = W_PUBLISHED;
    w.target = seq;
    w.only = src;
    st = wait_for(h, &w, timeout_s, "fetch", err);
    if (st != AD_OK)
        return st;
    /* published >= seq also holds when src skipped seq and went on: the
     * buffer would then hold older bytes.  src cannot have overwritten seq
     * with seq+2 yet (that waits for our acknowledgement of seq). */
    wrote = atomic_load_explicit(&slot_of(h, src)->wrote[seq & 1u],
                                 memory_order_relaxed);
    if (wrote != seq)
        return ad_err_set(err, AD_ESTATE, "seq",
                          "fetch: rank %d never published event %llu (it "
                          "went from event %llu to %llu)", src,
                          (unsigned long long)seq,
                          (unsigned long long)wrote,
                          (unsigned long long)atomic_load_explicit(
                              &slot_of(h, src)->published,
                              memory_order_relaxed));

    buf = h->data != NULL ? buffer_of(h, seq) : NULL;
    for (i = 0; i < n; i++)
        if (items[i].nbytes > 0)
            memcpy(items[i].ptr, buf + items[i].offset, items[i].nbytes);
    return AD_OK;
}

void ad_shm_ack(ad_shm *h, uint64_t seq)
{
    if (h == NULL || h->ctl == NULL || !h->attached)
        return;
    raise_counter(&slot_of(h, h->rank)->ack, seq);
}
