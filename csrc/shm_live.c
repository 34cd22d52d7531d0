/*
 * shm_live.c -- shared-memory transport, liveness: whether a peer is still
 * there (its state, its pid, its error record, its heartbeat), the one wait
 * loop every other part uses, the heartbeat thread, and marking our own
 * rank failed.  The protocol is in shm.h, the layout in shm_internal.h,
 * the design in docs/design.md §5.1 and §8.
 *
 * Pure C (POSIX shm, pthreads, C11 atomics); never includes Python.h.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* A hint to the CPU that we are in a spin loop. */
static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

ad_status ad_shm_check_timeout(double timeout_s, ad_err *err)
{
    /* isfinite rejects NaN and infinities: every wait must be bounded. */
    if (!isfinite(timeout_s) || timeout_s < 0.0)
        return AD_INVALID(err, "timeout_s",
                          "timeout_s must be a finite number >= 0, got %g",
                          timeout_s);
    return AD_OK;
}

ad_status ad_shm_check_handle(const ad_shm *h, ad_err *err)
{
    if (h == NULL || h->ctl == NULL)
        return AD_INVALID(err, "shm", "shared-memory handle is NULL or closed");
    if (h->failed)
        return ad_err_set(err, AD_ESTATE, NULL,
                          "shared-memory transport of rank %d is unusable "
                          "after an earlier failure%s%s%s", h->rank,
                          h->why[0] ? " (" : "", h->why, h->why[0] ? ")" : "");
    return AD_OK;
}

/* ------------------------------------------------------------ failing */

void ad_shm_fail(ad_shm *h, const char *message)
{
    size_t n = 0;

    if (h == NULL || h->failed || h->owner != getpid())
        return; /* the first failure's message is the one kept; a forked
                   child does not speak for the rank */
    h->failed = 1;
    if (message != NULL) {
        n = strlen(message);
        if (n > AD_SHM_MAX_ERROR) {
            /* Cut at a character boundary: message[n] is the first byte
             * dropped; while it continues a UTF-8 sequence, drop more. */
            n = AD_SHM_MAX_ERROR;
            while (n > 0 && ((unsigned char)message[n] & 0xC0) == 0x80)
                n--;
        }
        memcpy(h->why, message, n);
    }
    h->why[n] = '\0';
    if (h->ctl == NULL || !h->attached)
        return;
    /* The record is written only here, once, while our state is still
     * ATTACHED; the release store below publishes it with the state. */
    memcpy(record_of(h, h->rank)->error, h->why, n + 1);
    atomic_store_explicit(&slot_of(h, h->rank)->state, SLOT_FAILED,
                          memory_order_release);
}

/* The message rank r left when it failed ("" if none), into buf. */
static void failure_message(const ad_shm *h, int r, char *buf, size_t len)
{
    const char *src = record_of(h, r)->error;
    size_t i;
    for (i = 0; i + 1 < len && i < AD_SHM_MAX_ERROR && src[i] != '\0'; i++)
        buf[i] = src[i];
    buf[i] = '\0';
}

/* ---------------------------------------------------------- heartbeat */

/*
 * While the rank is busy, store the time into its slot every
 * AD_SHM_BEAT_MS.  The thread sleeps on a condition variable (monotonic
 * clock) so that detach can wake and join it at once.  It costs one wake-up,
 * one clock read and one store per period; it never touches Python.
 */
static void *beat_main(void *arg)
{
    ad_shm *h = arg;
    _Atomic uint64_t *beat = &slot_of(h, h->rank)->beat;

    pthread_mutex_lock(&h->beat_mu);
    while (!h->beat_stop) {
        struct timespec next;
        if (atomic_load_explicit(&h->busy, memory_order_relaxed))
            atomic_store_explicit(beat, shm_now_ns(), memory_order_relaxed);
        clock_gettime(CLOCK_MONOTONIC, &next);
        next.tv_nsec += AD_SHM_BEAT_MS * 1000000L;
        next.tv_sec += next.tv_nsec / 1000000000L;
        next.tv_nsec %= 1000000000L;
        while (!h->beat_stop &&
               pthread_cond_timedwait(&h->beat_cv, &h->beat_mu, &next) !=
                   ETIMEDOUT)
            ; /* a spurious wake-up: keep the period */
    }
    pthread_mutex_unlock(&h->beat_mu);
    return NULL;
}

ad_status ad_shm_beat_start(ad_shm *h, ad_err *err)
{
    pthread_condattr_t ca;
    sigset_t all, old;
    int rc;

    if ((rc = pthread_mutex_init(&h->beat_mu, NULL)) != 0)
        return ad_err_sys(err, rc, NULL, "heartbeat: pthread_mutex_init "
                          "failed: %s", strerror(rc));
    if ((rc = pthread_condattr_init(&ca)) != 0) {
        pthread_mutex_destroy(&h->beat_mu);
        return ad_err_sys(err, rc, NULL, "heartbeat: pthread_condattr_init "
                          "failed: %s", strerror(rc));
    }
    rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(&h->beat_cv, &ca);
    pthread_condattr_destroy(&ca);
    if (rc != 0) {
        pthread_mutex_destroy(&h->beat_mu);
        return ad_err_sys(err, rc, NULL, "heartbeat: pthread_cond_init "
                          "failed: %s", strerror(rc));
    }
    /* The thread starts with every signal blocked (it inherits our mask):
     * signals go to the threads that handle them, Python's main thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&h->beat_thread, NULL, beat_main, h);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        pthread_cond_destroy(&h->beat_cv);
        pthread_mutex_destroy(&h->beat_mu);
        return ad_err_sys(err, rc, NULL, "heartbeat: cannot start its thread "
                          "(pthread_create: %s)", strerror(rc));
    }
    h->beat_running = 1;
    return AD_OK;
}

void ad_shm_beat_stop(ad_shm *h)
{
    if (!h->beat_running)
        return;
    pthread_mutex_lock(&h->beat_mu);
    h->beat_stop = 1;
    pthread_cond_signal(&h->beat_cv);
    pthread_mutex_unlock(&h->beat_mu);
    pthread_join(h->beat_thread, NULL);
    pthread_cond_destroy(&h->beat_cv);
    pthread_mutex_destroy(&h->beat_mu);
    h->beat_running = 0;
}

void ad_shm_set_busy(ad_shm *h, int busy)
{
    if (h == NULL || h->ctl == NULL || !h->attached || h->owner != getpid())
        return;
    atomic_store_explicit(&h->busy, busy != 0, memory_order_relaxed);
    if (busy) /* the first beat now, not a period later */
        atomic_store_explicit(&slot_of(h, h->rank)->beat, shm_now_ns(),
                              memory_order_relaxed);
}

/* ------------------------------------------------------------ peers */

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

/* AD_EPEERGONE for rank r, which `why` (peer_gone's answer) stopped while
 * rank `awaited` was awaited.  A failed rank's own message, if it left one,
 * is the whole story: "<op>: rank R failed: <message>". */
static ad_status report_gone(const ad_shm *h, const wait_spec *w, int r,
                             int awaited, const char *why, const char *op,
                             ad_err *err)
{
    char msg[AD_SHM_MAX_ERROR + 1];
    ad_status st;

    msg[0] = '\0';
    if (atomic_load_explicit(&slot_of(h, r)->state, memory_order_acquire) ==
        SLOT_FAILED)
        failure_message(h, r, msg, sizeof msg);
    if (msg[0] != '\0')
        st = ad_err_set(err, AD_EPEERGONE, NULL, "%s: rank %d failed: %s", op,
                        r, msg);
    else if (r == awaited)
        st = ad_err_set(err, AD_EPEERGONE, NULL,
                        "%s: rank %d %s while rank %d waited for it to %s "
                        "%llu", op, r, why, h->rank, wait_what(w->kind),
                        (unsigned long long)w->target);
    else
        st = ad_err_set(err, AD_EPEERGONE, NULL,
                        "%s: rank %d %s while rank %d waited for rank %d to "
                        "%s %llu", op, r, why, h->rank, awaited,
                        wait_what(w->kind), (unsigned long long)w->target);
    if (err != NULL)
        err->peer = r;
    return st;
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
/* How often a waiter asks the kernel whether awaited peers still live, and
 * looks for a failed rank among the others. */
#define PID_CHECK_US 2000
/* How long "ranks waiting for each other" must be seen before a wait gives
 * up on it: the masks of a chain are read one after the other, and a rank
 * that has just been released still shows its old wait for a moment. */
#define CHAIN_GRACE_S (AD_SHM_BEAT_MS * 1e-3)

/*
 * When rank r last showed progress, in CLOCK_MONOTONIC seconds (0: never):
 * if r is not inside a wait, its last heartbeat; if it is, the freshest
 * heartbeat of the ranks it waits for that are not waiting themselves,
 * following the chain (rank masks, so W <= 64 loads per step).  A rank
 * that waits, directly or not, only for waiting ranks -- ranks waiting for
 * each other -- shows no progress: its heartbeat proves it lives, not that
 * the wait will end.  *chained: whether r itself waits (then the answer
 * comes from several ranks' slots read at slightly different times).
 */
static double last_progress(const ad_shm *h, int r, int *chained)
{
    uint64_t seen = UINT64_C(1) << r, todo = seen, freshest = 0;

    *chained = 0;
    while (todo != 0) {
        int q = __builtin_ctzll(todo);
        uint64_t m;
        todo &= todo - 1;
        if (q == h->rank)
            continue; /* we wait: we are no progress for anyone */
        m = atomic_load_explicit(&slot_of(h, q)->waiting, memory_order_relaxed);
        if (m == 0) {
            uint64_t b = atomic_load_explicit(&slot_of(h, q)->beat,
                                              memory_order_relaxed);
            if (b > freshest)
                freshest = b;
        } else {
            if (q == r)
                *chained = 1;
            todo |= m & ~seen;
            seen |= m;
        }
    }
    return 1e-9 * (double)freshest;
}

/* The first awaited rank in [lo, hi) that has not reached the target, or -1
 * when the wait is met. */
static int first_pending(const ad_shm *h, const wait_spec *w, int lo, int hi)
{
    for (int r = lo; r < hi; r++)
        if ((w->only >= 0 || r != h->rank) &&
            counter_of(h, w->kind, r) < w->target)
            return r;
    return -1;
}

/* ETIMEDOUT for rank r, silent for `quiet` seconds. */
static ad_status report_silent(const ad_shm *h, const wait_spec *w, int r,
                               double quiet, double timeout_s, const char *op,
                               ad_err *err)
{
    uint64_t m = atomic_load_explicit(&slot_of(h, r)->waiting,
                                      memory_order_relaxed);
    char whom[160];
    size_t used = 0;

    whom[0] = '\0';
    for (int q = 0; q < h->world && m != 0 && used + 8 < sizeof whom; q++)
        if (m & (UINT64_C(1) << q))
            used += (size_t)snprintf(whom + used, sizeof whom - used, "%s%d",
                                     used ? ", " : "", q);
    if (m != 0)
        return ad_err_set(
            err, AD_ETIMEDOUT, NULL,
            "%s: timed out: rank %d waited %.3g s (timeout %.3g s) for rank %d "
            "to %s %llu, but rank %d is itself waiting for rank(s) %s and no "
            "rank in that chain is making progress: the ranks are waiting for "
            "each other (were they given different arguments?)",
            op, h->rank, quiet, timeout_s, r, wait_what(w->kind),
            (unsigned long long)w->target, r, whom);
    return ad_err_set(
        err, AD_ETIMEDOUT, NULL,
        "%s: timed out: rank %d has been silent for %.3g s (no progress and "
        "no heartbeat; timeout %.3g s) while rank %d waited for it to %s %llu "
        "(it is at %llu)",
        op, r, quiet, timeout_s, h->rank, wait_what(w->kind),
        (unsigned long long)w->target,
        (unsigned long long)counter_of(h, w->kind, r));
}

/*
 * Poll until the spec is met, an awaited rank is gone or silent, or any
 * rank failed.  Awaited peers' states (closed/failed flags) are read on
 * every round, one atomic load each; their pids, and the other ranks'
 * states, every PID_CHECK_US.  Heartbeats are read only once the wait is
 * older than the timeout (before that nobody can have been silent long
 * enough), so they cost nothing in the short waits of normal use.  While
 * it waits, our slot says for whom (slot.waiting), so that others can tell
 * a rank waiting for a computing rank from ranks waiting for each other.
 */
static ad_status wait_loop(ad_shm *h, const wait_spec *w, double timeout_s,
                           const char *op, uint64_t *shown, ad_err *err)
{
    _Atomic uint64_t *waiting = &slot_of(h, h->rank)->waiting;
    const double start = shm_now_s();
    double next_pid_check = start + PID_CHECK_US * 1e-6;
    long nap_ns = 1000;
    const double grace = timeout_s < CHAIN_GRACE_S ? timeout_s : CHAIN_GRACE_S;
    int lo = w->only >= 0 ? w->only : 0;
    int hi = w->only >= 0 ? w->only + 1 : h->world;
    char why_buf[128];
    double stuck_since[AD_SHM_MAX_WORLD] = {0}; /* chains seen stuck */

    for (;;) {
        int pending = -1, silent = -1, r, check_pid = 0;
        double t = shm_now_s(), waited = t - start, silence = 0.0;
        uint64_t mask = 0;

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
            mask |= UINT64_C(1) << r;
            why = peer_gone(h, r, check_pid, why_buf, sizeof why_buf);
            /* The acquire load of the state orders the re-check after
             * anything the peer published before leaving. */
            if (why != NULL && counter_of(h, w->kind, r) < w->target)
                return report_gone(h, w, r, r, why, op, err);
            if (waited >= timeout_s && silent < 0) {
                int chained;
                double last = last_progress(h, r, &chained);
                double quiet = t - (last > start ? last : start);
                if (quiet < timeout_s)
                    stuck_since[r] = 0.0;
                else if (!chained || (stuck_since[r] > 0.0 &&
                                      t - stuck_since[r] >= grace)) {
                    silent = r;
                    silence = quiet;
                } else if (stuck_since[r] == 0.0)
                    stuck_since[r] = t;
            }
        }
        if (pending < 0)
            return AD_OK;
        if (mask != *shown) {
            atomic_store_explicit(waiting, mask, memory_order_relaxed);
            *shown = mask;
        }
        /* A failure anywhere dooms this collective protocol: say so now
         * rather than when the failure reaches us through the ranks we
         * wait for. */
        if (check_pid)
            for (r = 0; r < h->world; r++)
                if (r != h->rank &&
                    atomic_load_explicit(&slot_of(h, r)->state,
                                         memory_order_acquire) == SLOT_FAILED) {
                    /* What we waited for may have come meanwhile (from r
                     * itself, before it failed): then the wait is met. */
                    pending = first_pending(h, w, lo, hi);
                    if (pending < 0)
                        return AD_OK;
                    return report_gone(h, w, r, pending,
                                       "has failed (detached after an error)",
                                       op, err);
                }
        if (silent >= 0)
            return report_silent(h, w, silent, silence, timeout_s, op, err);

        if (waited < AD_SHM_SPIN_US * 1e-6) {
            for (int i = 0; i < 16; i++)
                cpu_relax();
        } else if (waited < AD_SHM_YIELD_US * 1e-6) {
            sched_yield();
        } else {
            shm_sleep_ns(nap_ns);
            if (nap_ns < SLEEP_CAP_US * 1000L)
                nap_ns *= 2;
        }
    }
}

ad_status ad_shm_wait_for(ad_shm *h, const wait_spec *w, double timeout_s, const char *op,
                          ad_err *err)
{
    uint64_t shown = 0;
    ad_status st = wait_loop(h, w, timeout_s, op, &shown, err);
    if (shown != 0) /* no longer waiting (a wait met at once never said so) */
        atomic_store_explicit(&slot_of(h, h->rank)->waiting, 0,
                              memory_order_relaxed);
    return st;
}
