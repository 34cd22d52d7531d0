/*
 * status.h -- status codes and the error record shared by every part of the
 * asyncdiff C core (partitioner, schedule, transports); how errors and
 * timeouts reach the user is docs/design.md §8.
 *
 * Rules for C code in csrc/ other than the binding:
 *   - never include Python.h;
 *   - a function that can fail returns an ad_status (AD_OK == 0 on success)
 *     and, when it fails, fills the caller's ad_err (which may be NULL when
 *     the caller does not care about the message);
 *   - a failure caused by one argument records that argument's name in
 *     ad_err.arg (a string literal: it must outlive the record).
 *
 * The binding (_coremodule.c) turns a status into a Python exception in one
 * place: AD_ETYPE -> TypeError, AD_EINVAL -> ValueError, AD_ENOMEM ->
 * MemoryError, AD_ETIMEDOUT -> TimeoutError, AD_EIO -> OSError (with
 * ad_err.sys_errno), AD_EPEERGONE -> asyncdiff._core.AsyncDiffPeerError (with
 * ad_err.peer as its `rank`), anything else -> asyncdiff._core.AsyncDiffError.
 *
 * Everything here is header-only (static inline) so that any C file, a test
 * program or a sanitizer build can use it without an extra object file.
 */
#ifndef ASYNCDIFF_STATUS_H
#define ASYNCDIFF_STATUS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

typedef enum ad_status {
    AD_OK = 0,
    AD_EINVAL = 1,       /* an argument has a bad value (names the argument) */
    AD_ETYPE = 2,        /* an argument has the wrong kind (names the argument) */
    AD_ENOMEM = 3,       /* allocation failed or a size would overflow */
    AD_ETIMEDOUT = 4,    /* a wait ran past its deadline */
    AD_EIO = 5,          /* a system call failed; ad_err.sys_errno says why */
    AD_EPEERGONE = 6,    /* the process or device on the other side went away */
    AD_ESTATE = 7,       /* call not allowed in the object's current state */
    AD_EUNSUPPORTED = 8, /* feature not available in this build / on this host */
    AD_EEXTERNAL = 9,    /* a library we call (CUDA, NCCL, ...) reported an error */
    AD_EINTERNAL = 10    /* a broken invariant: a bug in asyncdiff itself */
} ad_status;

/* Number of distinct codes (for tables indexed by status). */
#define AD_STATUS_COUNT 11

/* The error record.  Zero-initialise it (ad_err e = {0};) before use. */
typedef struct ad_err {
    char msg[512];   /* human-readable message, always NUL-terminated */
    const char *arg; /* name of the offending argument, or NULL */
    int sys_errno;   /* errno for AD_EIO, else 0 */
    int peer;        /* AD_EPEERGONE: the rank that went away, -1 unknown
                      * (ad_err_set/ad_err_sys/ad_err_clear reset it to -1;
                      * the failing code sets it after them) */
} ad_err;

/* Short stable name of a status, e.g. "timeout"; used for exception
 * attributes and logs. */
static inline const char *ad_status_name(int st)
{
    switch (st) {
    case AD_OK: return "ok";
    case AD_EINVAL: return "invalid_argument";
    case AD_ETYPE: return "wrong_type";
    case AD_ENOMEM: return "out_of_memory";
    case AD_ETIMEDOUT: return "timeout";
    case AD_EIO: return "io_error";
    case AD_EPEERGONE: return "peer_gone";
    case AD_ESTATE: return "bad_state";
    case AD_EUNSUPPORTED: return "unsupported";
    case AD_EEXTERNAL: return "external_error";
    case AD_EINTERNAL: return "internal_error";
    default: return "unknown";
    }
}

static inline void ad_err_clear(ad_err *err)
{
    if (err != NULL) {
        err->msg[0] = '\0';
        err->arg = NULL;
        err->sys_errno = 0;
        err->peer = -1;
    }
}

/* Fill *err (if not NULL) and hand back `st`, so that a failing branch can
 * be written as `return ad_err_set(err, AD_EINVAL, "n", "...", ...);`. */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 4, 5)))
#endif
static inline ad_status ad_err_set(ad_err *err, ad_status st, const char *arg,
                                   const char *fmt, ...)
{
    if (err != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->arg = arg;
        err->sys_errno = 0;
        err->peer = -1;
    }
    return st;
}

/* Same for a failed system call: records errno; st is normally AD_EIO. */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 4, 5)))
#endif
static inline ad_status ad_err_sys(ad_err *err, int errnum, const char *arg,
                                   const char *fmt, ...)
{
    if (err != NULL) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->arg = arg;
        err->sys_errno = errnum;
        err->peer = -1;
    }
    return AD_EIO;
}

/* Shorthands for the common cases. */
#define AD_INVALID(err, arg, ...) ad_err_set((err), AD_EINVAL, (arg), __VA_ARGS__)
#define AD_NOMEM(err, what) \
    ad_err_set((err), AD_ENOMEM, NULL, "out of memory while allocating %s", (what))

#endif /* ASYNCDIFF_STATUS_H */
