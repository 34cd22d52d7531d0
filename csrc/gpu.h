/*
 * gpu.h -- the CUDA runtime and NCCL, opened at run time (docs/design.md §5.3).
 *
 * Pure C (no Python.h, no CUDA or NCCL header): the few types and constants
 * we need are declared below with the values the libraries document, so the
 * extension builds on a machine without CUDA and the same build runs on a
 * GPU machine.  tests/test_abi.py compiles these declarations next to the
 * real cuda_runtime_api.h and nccl.h and checks every size, offset, value
 * and function type against them.  Nothing is linked against libcudart or
 * libnccl; both are found with dlopen by ad_gpu_load(), each in this order:
 *
 *   1. a copy the process has already loaded (dlopen with RTLD_NOLOAD):
 *      libnccl.so.2 and libcudart.so.13 / .12 / ... -- what a CUDA build of
 *      torch loaded, so that the process uses one NCCL;
 *   2. the file named by ASYNCDIFF_NCCL_LIBRARY / ASYNCDIFF_CUDART_LIBRARY
 *      (no fallback when it cannot be opened);
 *   3. the pip wheels under the Python search folders handed to
 *      ad_gpu_search_dirs() (the binding passes sys.path) and the folder
 *      above the one this module's shared object is in (site-packages of a
 *      normal install): nvidia/nccl/lib/libnccl.so.2,
 *      nvidia/cu13/lib/libcudart.so.13 (CUDA 13),
 *      nvidia/cuda_runtime/lib/libcudart.so.12 (CUDA 12) -- the files a
 *      CUDA build of torch loads itself;
 *   4. $CUDA_HOME/lib64 (else $CUDA_PATH/lib64);
 *   5. a plain dlopen of the sonames (LD_LIBRARY_PATH, ld.so.cache).
 *
 * Every function we call is listed ONCE, in AD_GPU_FUNCTIONS below; that
 * single table declares the function-pointer fields of ad_gpu_api and
 * drives the dlsym loop.  A missing required symbol makes the library
 * unusable (the message names it); optional ones (newer NCCL features) are
 * left NULL.
 *
 * A successful load is kept for the process (the table is read-only from
 * then on).  A failed one is not: the next ad_gpu_load() looks again (a
 * library may have been loaded or installed since), reusing any library it
 * already opened -- a library whose functions were called is never swapped
 * for another copy.  Errors are ad_status + ad_err (status.h):
 * AD_EUNSUPPORTED when NCCL cannot be used here (library not found, symbol
 * missing, no driver, no CUDA device), with a message naming what is
 * missing and what was found (file and version of each library).
 *
 * Check macros (AD_CUDA_CHECK, AD_NCCL_CHECK and their _GOTO forms) turn a
 * failed call into AD_EEXTERNAL with file:line, the call's text and the
 * library's own error string; they return or jump, never exit().
 */
#ifndef ASYNCDIFF_GPU_H
#define ASYNCDIFF_GPU_H

#include <stddef.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Types and constants, declared here instead of taken from headers. */

/* cudaError_t is an enum: an int in the C ABI. */
typedef int ad_cuda_error;
/* cudaStream_t / cudaEvent_t are opaque pointers. */
typedef void *ad_cuda_stream;
typedef void *ad_cuda_event;

enum {
    AD_CUDA_SUCCESS = 0,                 /* cudaSuccess */
    AD_CUDA_ERROR_INSUFFICIENT_DRIVER = 35, /* cudaErrorInsufficientDriver */
    AD_CUDA_ERROR_NO_DEVICE = 100,       /* cudaErrorNoDevice */
    AD_CUDA_ERROR_NOT_READY = 600        /* cudaErrorNotReady */
};

/* Sonames of the driver library the CUDA runtime loads (libcuda). */
#define AD_CUDA_DRIVER_SONAME "libcuda.so.1"

/* Flags of cudaStreamCreateWithFlags / cudaEventCreateWithFlags. */
#define AD_CUDA_STREAM_NON_BLOCKING 0x01u  /* cudaStreamNonBlocking */
#define AD_CUDA_EVENT_DISABLE_TIMING 0x02u /* cudaEventDisableTiming */

/* ncclResult_t (an enum: int). */
typedef int ad_nccl_result;
enum {
    AD_NCCL_SUCCESS = 0,             /* ncclSuccess */
    AD_NCCL_UNHANDLED_CUDA_ERROR = 1, /* ncclUnhandledCudaError */
    AD_NCCL_SYSTEM_ERROR = 2,        /* ncclSystemError */
    AD_NCCL_INTERNAL_ERROR = 3,      /* ncclInternalError */
    AD_NCCL_INVALID_ARGUMENT = 4,    /* ncclInvalidArgument */
    AD_NCCL_INVALID_USAGE = 5,       /* ncclInvalidUsage */
    AD_NCCL_REMOTE_ERROR = 6,        /* ncclRemoteError (2.13+) */
    AD_NCCL_IN_PROGRESS = 7,         /* ncclInProgress (2.14+) */
    AD_NCCL_TIMEOUT = 8              /* ncclTimeout (2.30+) */
};

/* ncclDataType_t (an enum: int).  We move bytes, so only uint8 is used;
 * the others are listed for reference. */
typedef int ad_nccl_datatype;
enum {
    AD_NCCL_INT8 = 0,
    AD_NCCL_UINT8 = 1,
    AD_NCCL_INT32 = 2,
    AD_NCCL_UINT32 = 3,
    AD_NCCL_INT64 = 4,
    AD_NCCL_UINT64 = 5,
    AD_NCCL_FLOAT16 = 6,
    AD_NCCL_FLOAT32 = 7,
    AD_NCCL_FLOAT64 = 8,
    AD_NCCL_BFLOAT16 = 9
};

/* ncclComm_t: opaque pointer. */
typedef void *ad_nccl_comm;

/* ncclUniqueId: 128 opaque bytes, passed BY VALUE to ncclCommInitRank*.
 * It must be a struct of exactly this size for the call ABI to match. */
#define AD_NCCL_UNIQUE_ID_BYTES 128
typedef struct ad_nccl_id {
    char internal[AD_NCCL_UNIQUE_ID_BYTES];
} ad_nccl_id;

/* ncclConfig_t, as far as the NCCL 2.17 layout (fields of later versions
 * follow netName; NCCL copies only `size` bytes of what we pass and takes
 * its defaults for the rest, and ignores fields newer than `version`).
 * See ad_nccl_config_init in nccl.c. */
typedef struct ad_nccl_config {
    size_t size;          /* sizeof what the caller passes */
    unsigned int magic;   /* AD_NCCL_CONFIG_MAGIC */
    unsigned int version; /* NCCL version code whose fields are filled in */
    int blocking;         /* 0: non-blocking communicator (2.14+) */
    int cgaClusterSize;   /* 2.17+ */
    int minCTAs;          /* 2.17+ */
    int maxCTAs;          /* 2.17+ */
    const char *netName;  /* 2.17+ */
} ad_nccl_config;

#define AD_NCCL_CONFIG_MAGIC 0xcafebeefu
#define AD_NCCL_CONFIG_UNDEF_INT (-2147483647 - 1) /* INT_MIN: "NCCL decides" */

/* NCCL's version code: major*10000 + minor*100 + patch since 2.9
 * (major*1000 + minor*100 + patch before). */
#define AD_NCCL_VERSION_CODE(major, minor, patch) \
    ((major) * 10000 + (minor) * 100 + (patch))

/*
 * The table: each function we call, once.
 *   X(library, required, return type, name, (parameters))
 * library: CUDART or NCCL.  required: 1 = the library is unusable without
 * it; 0 = optional (a newer feature), NULL when absent.
 */

#define AD_GPU_FUNCTIONS(X)                                                        \
    X(CUDART, 1, ad_cuda_error, cudaGetDeviceCount, (int *count))                  \
    X(CUDART, 1, ad_cuda_error, cudaSetDevice, (int device))                       \
    X(CUDART, 1, ad_cuda_error, cudaGetDevice, (int *device))                      \
    X(CUDART, 1, ad_cuda_error, cudaRuntimeGetVersion, (int *version))             \
    X(CUDART, 1, ad_cuda_error, cudaDriverGetVersion, (int *version))              \
    X(CUDART, 1, ad_cuda_error, cudaStreamCreateWithFlags,                         \
      (ad_cuda_stream *stream, unsigned int flags))                                \
    X(CUDART, 1, ad_cuda_error, cudaStreamDestroy, (ad_cuda_stream stream))        \
    X(CUDART, 1, ad_cuda_error, cudaEventCreateWithFlags,                          \
      (ad_cuda_event *event, unsigned int flags))                                  \
    X(CUDART, 1, ad_cuda_error, cudaEventRecord,                                   \
      (ad_cuda_event event, ad_cuda_stream stream))                                \
    X(CUDART, 1, ad_cuda_error, cudaStreamWaitEvent,                               \
      (ad_cuda_stream stream, ad_cuda_event event, unsigned int flags))            \
    X(CUDART, 1, ad_cuda_error, cudaEventQuery, (ad_cuda_event event))             \
    X(CUDART, 1, ad_cuda_error, cudaEventDestroy, (ad_cuda_event event))           \
    X(CUDART, 1, const char *, cudaGetErrorString, (ad_cuda_error error))          \
    X(NCCL, 1, ad_nccl_result, ncclGetVersion, (int *version))                     \
    X(NCCL, 1, ad_nccl_result, ncclGetUniqueId, (ad_nccl_id *id))           \
    X(NCCL, 1, ad_nccl_result, ncclCommInitRank,                                   \
      (ad_nccl_comm *comm, int nranks, ad_nccl_id id, int rank))            \
    X(NCCL, 0, ad_nccl_result, ncclCommInitRankConfig,                             \
      (ad_nccl_comm *comm, int nranks, ad_nccl_id id, int rank,             \
       ad_nccl_config *config))                                                    \
    X(NCCL, 0, ad_nccl_result, ncclCommFinalize, (ad_nccl_comm comm))              \
    X(NCCL, 1, ad_nccl_result, ncclCommDestroy, (ad_nccl_comm comm))               \
    X(NCCL, 1, ad_nccl_result, ncclCommAbort, (ad_nccl_comm comm))                 \
    X(NCCL, 1, ad_nccl_result, ncclCommGetAsyncError,                              \
      (ad_nccl_comm comm, ad_nccl_result *state))                                  \
    X(NCCL, 1, const char *, ncclGetErrorString, (ad_nccl_result result))          \
    X(NCCL, 0, const char *, ncclGetLastError, (ad_nccl_comm comm))                \
    X(NCCL, 1, ad_nccl_result, ncclGroupStart, (void))                             \
    X(NCCL, 1, ad_nccl_result, ncclGroupEnd, (void))                               \
    X(NCCL, 1, ad_nccl_result, ncclSend,                                           \
      (const void *buf, size_t count, ad_nccl_datatype type, int peer,             \
       ad_nccl_comm comm, ad_cuda_stream stream))                                  \
    X(NCCL, 1, ad_nccl_result, ncclRecv,                                           \
      (void *buf, size_t count, ad_nccl_datatype type, int peer,                   \
       ad_nccl_comm comm, ad_cuda_stream stream))

/* The loaded libraries: one function pointer per table entry, plus what
 * was found.  Read-only once ad_gpu_load() has succeeded. */
typedef struct ad_gpu_api {
#define AD_GPU_API_FIELD(which, required, ret, name, params) ret (*name) params;
    AD_GPU_FUNCTIONS(AD_GPU_API_FIELD)
#undef AD_GPU_API_FIELD
    int nccl_version;    /* ncclGetVersion's code, e.g. 22105 for 2.21.5 */
    int cudart_version;  /* cudaRuntimeGetVersion's code, e.g. 12040 */
    int driver_version;  /* cudaDriverGetVersion's code; 0: no driver */
    int device_count;    /* CUDA devices visible to this process (>= 1) */
} ad_gpu_api;

/* Python's search folders (sys.path) to look for the pip wheels in (step 3
 * above); copied, replacing the previous list.  Empty and non-absolute
 * entries are skipped.  May be called at any time, from any thread. */
void ad_gpu_search_dirs(const char *const *dirs, size_t n);

/* Load the CUDA runtime and NCCL and check that at least one CUDA device is
 * visible.  AD_OK (then for the rest of the process), or AD_EUNSUPPORTED
 * with a message naming everything that is missing; a failed load is tried
 * again by the next call. */
ad_status ad_gpu_load(ad_err *err);

/* The table, or NULL unless ad_gpu_load() succeeded (tries to load). */
const ad_gpu_api *ad_gpu_get(void);

/* The table if a load has succeeded, else NULL; never tries to load. */
const ad_gpu_api *ad_gpu_loaded(void);

/* A one-paragraph account of what was found (for each library: version,
 * file, how it was found; the devices) or why NCCL is not usable, from the
 * latest load (loads first when nothing was tried yet).  Always
 * NUL-terminates buf (n >= 1).  Returns buf. */
const char *ad_gpu_describe(char *buf, size_t n);

/* NCCL's version code as "2.21.5" into buf. */
const char *ad_nccl_version_string(int code, char *buf, size_t n);

/*
 * Check helpers.  They record "file:line: call: <library message>" in
 * err and return AD_EEXTERNAL (AD_OK when the call succeeded); for NCCL,
 * ncclRemoteError becomes AD_EPEERGONE and ncclTimeout AD_ETIMEDOUT.
 */

ad_status ad_cuda_status(const ad_gpu_api *api, ad_cuda_error code, const char *call,
                         const char *file, int line, ad_err *err);
ad_status ad_nccl_status(const ad_gpu_api *api, ad_nccl_comm comm, ad_nccl_result code,
                         const char *call, const char *file, int line, ad_err *err);

/* Return from the enclosing function (which returns ad_status) on failure. */
#define AD_CUDA_CHECK(api, err, call)                                              \
    do {                                                                           \
        ad_status ad_check_st_ =                                                   \
            ad_cuda_status((api), (api)->call, #call, __FILE__, __LINE__, (err));  \
        if (ad_check_st_ != AD_OK)                                                 \
            return ad_check_st_;                                                   \
    } while (0)

#define AD_NCCL_CHECK(api, comm, err, call)                                        \
    do {                                                                           \
        ad_status ad_check_st_ = ad_nccl_status((api), (comm), (api)->call, #call, \
                                                __FILE__, __LINE__, (err));        \
        if (ad_check_st_ != AD_OK)                                                 \
            return ad_check_st_;                                                   \
    } while (0)

/* Store the status in `st` and jump to `label` on failure (functions with
 * something to undo keep their single exit path). */
#define AD_CUDA_CHECK_GOTO(api, err, st, label, call)                               \
    do {                                                                           \
        (st) = ad_cuda_status((api), (api)->call, #call, __FILE__, __LINE__, (err)); \
        if ((st) != AD_OK)                                                         \
            goto label;                                                            \
    } while (0)

#define AD_NCCL_CHECK_GOTO(api, comm, err, st, label, call)                         \
    do {                                                                           \
        (st) = ad_nccl_status((api), (comm), (api)->call, #call, __FILE__,          \
                              __LINE__, (err));                                     \
        if ((st) != AD_OK)                                                         \
            goto label;                                                            \
    } while (0)

#ifdef __cplusplus
}
#endif

#endif /* ASYNCDIFF_GPU_H */
