/*
 * test_gpu_loader.c -- checks csrc/gpu.c and csrc/nccl.c without a GPU.
 *
 * One file, three builds (tests/test_nccl.py does all three):
 *
 *   cc -DAD_FAKE_CUDART -shared -fPIC -Wl,-soname,libcudart.so.12 \
 *      test_gpu_loader.c -o libfakecudart.so
 *       a stand-in CUDA runtime: streams and events are small host
 *       objects, "device memory" is host memory, events complete at once
 *       (or after FAKE_CUDA_EVENT_POLLS queries, or never with
 *       FAKE_CUDA_HANG=1), FAKE_CUDA_DEVICES devices (default 1; "error":
 *       cudaGetDeviceCount fails);
 *
 *   cc -DAD_FAKE_NCCL -shared -fPIC -Wl,-soname,libnccl.so.2 \
 *      test_gpu_loader.c -o libfakenccl.so
 *       a stand-in NCCL: sends to and receives from the own rank are
 *       matched in order and copied at ncclGroupEnd; a receive from another
 *       rank is filled with the byte (peer + 1); it checks what a real NCCL
 *       would reject (calls outside a group, a config not made like
 *       NCCL_CONFIG_INITIALIZER, a unique id it did not make, a NULL
 *       stream, another datatype than uint8, size mismatches) and it can be
 *       told to be slow, to hang or to fail (FAKE_NCCL_* below);
 *
 *   cc -I csrc test_gpu_loader.c ../gpu.c ../nccl.c -ldl -pthread -o test_gpu_loader
 *       the test program.  Run as `test_gpu_loader FAKE_CUDART FAKE_NCCL`;
 *       every scenario runs in a forked child (the libraries load once per
 *       process) and the program ends with "N passed, M failed".
 *
 * Both fakes export counters (fake_cuda_stats / fake_nccl_stats) that the
 * program reads to check what the transport did: which stream carried the
 * transfers, that streams and events are all destroyed again, that the
 * caller's device is restored, that an error aborts the communicator.
 */
#define _GNU_SOURCE

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ====================================================================== */
#if defined(AD_FAKE_CUDART)
/* ====================================================================== */

#define STREAM_MAGIC 0x57524541u
#define EVENT_MAGIC 0x45564e54u

struct fake_stream {
    unsigned magic;
    unsigned flags;
    int device;
};

struct fake_event {
    unsigned magic;
    int recorded;
    long polls_left; /* -1: never completes */
};

struct fake_cuda_stats {
    int current_device;
    int set_device_calls;
    int streams_created, streams_destroyed;
    int events_created, events_destroyed;
    int records, waits, queries;
    unsigned last_stream_flags, last_event_flags;
    int last_stream_device;
};

static struct fake_cuda_stats stats;
static int device_chosen; /* cudaSetDevice called at least once */

static long env_long(const char *name, long fallback)
{
    const char *v = getenv(name);
    return (v != NULL && v[0] != '\0') ? strtol(v, NULL, 10) : fallback;
}

void fake_cuda_stats(struct fake_cuda_stats *out) { *out = stats; }
int fake_cuda_current_device(void) { return stats.current_device; }
int fake_cuda_is_stream(void *s)
{
    return s != NULL && ((struct fake_stream *)s)->magic == STREAM_MAGIC;
}

int cudaGetDeviceCount(int *count)
{
    const char *v = getenv("FAKE_CUDA_DEVICES");
    if (v != NULL && strcmp(v, "error") == 0)
        return 100; /* cudaErrorNoDevice */
    *count = (int)env_long("FAKE_CUDA_DEVICES", 1);
    return 0;
}

int cudaSetDevice(int device)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != 0 || device < 0 || device >= n)
        return 101; /* cudaErrorInvalidDevice */
    stats.current_device = device;
    stats.set_device_calls++;
    device_chosen = 1;
    return 0;
}

int cudaGetDevice(int *device)
{
    *device = stats.current_device;
    return 0;
}

int cudaRuntimeGetVersion(int *version)
{
    *version = 12040;
    return 0;
}

int cudaStreamCreateWithFlags(void **stream, unsigned flags)
{
    struct fake_stream *s = calloc(1, sizeof *s);
    if (s == NULL)
        return 2; /* cudaErrorMemoryAllocation */
    s->magic = STREAM_MAGIC;
    s->flags = flags;
    s->device = stats.current_device;
    stats.streams_created++;
    stats.last_stream_flags = flags;
    stats.last_stream_device = s->device;
    *stream = s;
    return 0;
}

int cudaStreamDestroy(void *stream)
{
    struct fake_stream *s = stream;
    if (s == NULL || s->magic != STREAM_MAGIC)
        return 400; /* cudaErrorInvalidResourceHandle */
    s->magic = 0;
    free(s);
    stats.streams_destroyed++;
    return 0;
}

int cudaEventCreateWithFlags(void **event, unsigned flags)
{
    struct fake_event *e = calloc(1, sizeof *e);
    if (e == NULL)
        return 2;
    e->magic = EVENT_MAGIC;
    stats.events_created++;
    stats.last_event_flags = flags;
    *event = e;
    return 0;
}

int cudaEventRecord(void *event, void *stream)
{
    struct fake_event *e = event;
    if (e == NULL || e->magic != EVENT_MAGIC)
        return 400;
    if (stream != NULL && ((struct fake_stream *)stream)->magic != STREAM_MAGIC)
        return 400;
    e->recorded = 1;
    e->polls_left = env_long("FAKE_CUDA_HANG", 0) ? -1 : env_long("FAKE_CUDA_EVENT_POLLS", 0);
    stats.records++;
    return 0;
}

int cudaStreamWaitEvent(void *stream, void *event, unsigned flags)
{
    struct fake_event *e = event;
    (void)flags;
    if (e == NULL || e->magic != EVENT_MAGIC)
        return 400;
    if (stream != NULL && ((struct fake_stream *)stream)->magic != STREAM_MAGIC)
        return 400;
    stats.waits++;
    return 0;
}

int cudaEventQuery(void *event)
{
    struct fake_event *e = event;
    if (e == NULL || e->magic != EVENT_MAGIC)
        return 400;
    stats.queries++;
    if (!e->recorded || e->polls_left == 0)
        return 0;
    if (e->polls_left > 0)
        e->polls_left--;
    return 600; /* cudaErrorNotReady */
}

int cudaEventDestroy(void *event)
{
    struct fake_event *e = event;
    if (e == NULL || e->magic != EVENT_MAGIC)
        return 400;
    e->magic = 0;
    free(e);
    stats.events_destroyed++;
    return 0;
}

const char *cudaGetErrorString(int error)
{
    static char text[64];
    snprintf(text, sizeof text, "fake CUDA error %d", error);
    return text;
}

/* ====================================================================== */
#elif defined(AD_FAKE_NCCL)
/* ====================================================================== */

#include <dlfcn.h>

#define COMM_MAGIC 0x434f4d4du
#define MAX_OPS 4096
#define ID_BYTES 128

typedef struct fake_id {
    char internal[ID_BYTES];
} fake_id;

/* The layout NCCL 2.17 reads (ours is the same in gpu.h). */
typedef struct fake_config {
    size_t size;
    unsigned magic, version;
    int blocking, cgaClusterSize, minCTAs, maxCTAs;
    const char *netName;
} fake_config;

struct fake_op {
    int send;
    void *ptr;
    size_t count;
    int peer;
};

struct fake_comm {
    unsigned magic;
    int nranks, rank, blocking, device;
    int state;      /* what ncclCommGetAsyncError reports after the polls */
    long polls;     /* InProgress answers still to give; -1: forever */
};

struct fake_nccl_stats {
    int inits_blocking, inits_nonblocking;
    int config_size, config_version, config_blocking, config_undef_ok;
    int sends, recvs, groups, group_depth;
    long long bytes;
    int aborts, destroys, finalizes, live_comms;
    int bad_device_calls; /* NCCL calls made while another device was current */
    int last_datatype;
    void *last_stream;
    int last_comm_device;
};

static struct fake_nccl_stats stats;
static struct fake_op ops[MAX_OPS];
static int nops;
static struct fake_comm *group_comm;

static long env_long(const char *name, long fallback)
{
    const char *v = getenv(name);
    return (v != NULL && v[0] != '\0') ? strtol(v, NULL, 10) : fallback;
}

void fake_nccl_stats(struct fake_nccl_stats *out) { *out = stats; }

/* The fake CUDA runtime's notion of the current device, to check that the
 * transport made the communicator's device current before calling us. */
static int current_device(void)
{
    static int (*get)(void);
    static int looked;
    if (!looked) {
        const char *path = getenv("ASYNCDIFF_CUDART_LIBRARY");
        void *h = path != NULL ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : NULL;
        if (h == NULL)
            h = dlopen("libcudart.so.12", RTLD_NOW | RTLD_NOLOAD);
        if (h != NULL)
            *(void **)&get = dlsym(h, "fake_cuda_current_device");
        looked = 1;
    }
    return get != NULL ? get() : -1;
}

static void check_device(struct fake_comm *c)
{
    if (c != NULL && current_device() != c->device)
        stats.bad_device_calls++;
}

static int valid(struct fake_comm *c) { return c != NULL && c->magic == COMM_MAGIC; }

int ncclGetVersion(int *version)
{
    *version = (int)env_long("FAKE_NCCL_VERSION", 22105);
    return 0;
}

int ncclGetUniqueId(fake_id *id)
{
    memcpy(id->internal, "FAKE", 4);
    for (int i = 4; i < ID_BYTES; i++)
        id->internal[i] = (char)(i ^ 0x5a);
    return 0;
}

static int id_ok(const fake_id *id)
{
    if (memcmp(id->internal, "FAKE", 4) != 0)
        return 0;
    for (int i = 4; i < ID_BYTES; i++)
        if (id->internal[i] != (char)(i ^ 0x5a))
            return 0;
    return 1;
}

static int new_comm(struct fake_comm **out, int nranks, fake_id id, int rank, int blocking)
{
    struct fake_comm *c;
    if (out == NULL || nranks < 1 || rank < 0 || rank >= nranks || !id_ok(&id))
        return 4; /* ncclInvalidArgument */
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return 2;
    c->magic = COMM_MAGIC;
    c->nranks = nranks;
    c->rank = rank;
    c->blocking = blocking;
    c->device = current_device();
    stats.last_comm_device = c->device;
    c->polls = blocking ? 0
                        : (env_long("FAKE_NCCL_INIT_HANG", 0) ? -1 : env_long("FAKE_NCCL_INIT_POLLS", 0));
    stats.live_comms++;
    *out = c;
    return 0;
}

int ncclCommInitRank(struct fake_comm **comm, int nranks, fake_id id, int rank)
{
    int r = new_comm(comm, nranks, id, rank, 1);
    if (r == 0)
        stats.inits_blocking++;
    return r;
}

int ncclCommInitRankConfig(struct fake_comm **comm, int nranks, fake_id id, int rank,
                           fake_config *config)
{
    int r, blocking = 1;
    if (config != NULL) {
        /* What NCCL checks: the magic, a version it knows, a sane size. */
        if (config->magic != 0xcafebeefu || config->version < 21400 || config->size < 24)
            return 4;
        stats.config_size = (int)config->size;
        stats.config_version = (int)config->version;
        stats.config_blocking = config->blocking;
        stats.config_undef_ok = config->size >= sizeof(fake_config) &&
                                config->cgaClusterSize == (-2147483647 - 1) &&
                                config->minCTAs == (-2147483647 - 1) &&
                                config->maxCTAs == (-2147483647 - 1) && config->netName == NULL;
        if (config->blocking == 0)
            blocking = 0;
        else if (config->blocking != 1 && config->blocking != (-2147483647 - 1))
            return 4;
    }
    r = new_comm(comm, nranks, id, rank, blocking);
    if (r != 0)
        return r;
    if (blocking)
        stats.inits_blocking++;
    else
        stats.inits_nonblocking++;
    return (*comm)->polls != 0 ? 7 /* ncclInProgress */ : 0;
}

int ncclCommGetAsyncError(struct fake_comm *c, int *state)
{
    if (!valid(c) || state == NULL)
        return 4;
    if (c->polls != 0) {
        if (c->polls > 0)
            c->polls--;
        *state = 7;
        return 0;
    }
    *state = c->state;
    return 0;
}

static void free_comm(struct fake_comm *c)
{
    c->magic = 0;
    free(c);
    stats.live_comms--;
}

int ncclCommFinalize(struct fake_comm *c)
{
    if (!valid(c))
        return 4;
    stats.finalizes++;
    if (!c->blocking && env_long("FAKE_NCCL_FINALIZE_POLLS", 0) > 0) {
        c->polls = env_long("FAKE_NCCL_FINALIZE_POLLS", 0);
        return 7;
    }
    return 0;
}

int ncclCommDestroy(struct fake_comm *c)
{
    if (!valid(c))
        return 4;
    stats.destroys++;
    free_comm(c);
    return 0;
}

int ncclCommAbort(struct fake_comm *c)
{
    if (c == NULL)
        return 0;
    if (!valid(c))
        return 4;
    stats.aborts++;
    if (group_comm == c) { /* an abort inside a group drops it */
        group_comm = NULL;
        nops = 0;
        stats.group_depth = 0;
    }
    free_comm(c);
    return 0;
}

const char *ncclGetErrorString(int result)
{
    switch (result) {
    case 6: return "fake remote error";
    case 7: return "fake in progress";
    default: return "fake NCCL error";
    }
}

const char *ncclGetLastError(struct fake_comm *c)
{
    (void)c;
    return "fake last error detail";
}

int ncclGroupStart(void)
{
    stats.group_depth++;
    return 0;
}

static int queue(int send, void *ptr, size_t count, int type, int peer, struct fake_comm *c,
                 void *stream)
{
    if (!valid(c) || stats.group_depth < 1 || peer < 0 || peer >= c->nranks || stream == NULL ||
        nops >= MAX_OPS || (group_comm != NULL && group_comm != c))
        return 5; /* ncclInvalidUsage */
    check_device(c);
    stats.last_datatype = type;
    stats.last_stream = stream;
    if (type != 1 /* ncclUint8 */)
        return 4;
    if ((long)nops == env_long("FAKE_NCCL_FAIL_OP", -1))
        return 3; /* ncclInternalError */
    group_comm = c;
    ops[nops].send = send;
    ops[nops].ptr = ptr;
    ops[nops].count = count;
    ops[nops].peer = peer;
    nops++;
    if (send)
        stats.sends++;
    else
        stats.recvs++;
    stats.bytes += (long long)count;
    return 0;
}

int ncclSend(const void *buf, size_t count, int type, int peer, struct fake_comm *c,
             void *stream)
{
    return queue(1, (void *)buf, count, type, peer, c, stream);
}

int ncclRecv(void *buf, size_t count, int type, int peer, struct fake_comm *c, void *stream)
{
    return queue(0, buf, count, type, peer, c, stream);
}

/* Match the i-th send to self with the i-th receive from self. */
static int run_ops(struct fake_comm *c)
{
    int si = 0, ri = 0, result = 0;
    for (;;) {
        while (si < nops && !(ops[si].send && ops[si].peer == c->rank))
            si++;
        while (ri < nops && !(!ops[ri].send && ops[ri].peer == c->rank))
            ri++;
        if (si >= nops || ri >= nops)
            break;
        if (ops[si].count != ops[ri].count)
            result = 5;
        else
            memcpy(ops[ri].ptr, ops[si].ptr, ops[si].count);
        si++;
        ri++;
    }
    if (si < nops || ri < nops) {
        /* an unmatched send or receive to self: a real NCCL would hang */
        for (; si < nops; si++)
            if (ops[si].send && ops[si].peer == c->rank)
                result = 5;
        for (; ri < nops; ri++)
            if (!ops[ri].send && ops[ri].peer == c->rank)
                result = 5;
    }
    for (int i = 0; i < nops; i++)
        if (!ops[i].send && ops[i].peer != c->rank)
            memset(ops[i].ptr, ops[i].peer + 1, ops[i].count);
    return result;
}

int ncclGroupEnd(void)
{
    struct fake_comm *c = group_comm;
    int r = 0;
    if (stats.group_depth < 1)
        return 5;
    if (--stats.group_depth > 0)
        return 0;
    stats.groups++;
    if (c != NULL) {
        check_device(c);
        r = run_ops(c);
        if (r == 0 && !c->blocking) {
            long err = env_long("FAKE_NCCL_ASYNC_ERROR", 0);
            c->polls = env_long("FAKE_NCCL_GROUP_HANG", 0) ? -1 : env_long("FAKE_NCCL_GROUP_POLLS", 0);
            if (err != 0)
                c->state = (int)err;
            if (c->polls != 0)
                r = 7;
        }
    }
    nops = 0;
    group_comm = NULL;
    return r;
}

/* ====================================================================== */
#else /* the test program */
/* ====================================================================== */

#include <dlfcn.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "gpu.h"
#include "nccl.h"

/* Must match the fakes above. */
struct fake_cuda_stats {
    int current_device;
    int set_device_calls;
    int streams_created, streams_destroyed;
    int events_created, events_destroyed;
    int records, waits, queries;
    unsigned last_stream_flags, last_event_flags;
    int last_stream_device;
};
struct fake_nccl_stats {
    int inits_blocking, inits_nonblocking;
    int config_size, config_version, config_blocking, config_undef_ok;
    int sends, recvs, groups, group_depth;
    long long bytes;
    int aborts, destroys, finalizes, live_comms;
    int bad_device_calls;
    int last_datatype;
    void *last_stream;
    int last_comm_device;
};

static const char *fake_cudart, *fake_nccl;
static int child_failures;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "  check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            child_failures++;                                                         \
        }                                                                             \
    } while (0)

#define CHECK_MSG(cond, msg)                                                          \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "  check failed at %s:%d: %s -- message: %s\n", __FILE__,  \
                    __LINE__, #cond, (msg));                                          \
            child_failures++;                                                         \
        }                                                                             \
    } while (0)

static void cuda_stats(struct fake_cuda_stats *out)
{
    void (*get)(struct fake_cuda_stats *) = NULL;
    void *h = dlopen(fake_cudart, RTLD_NOW | RTLD_NOLOAD);
    memset(out, 0, sizeof *out);
    if (h != NULL)
        *(void **)&get = dlsym(h, "fake_cuda_stats");
    if (get != NULL)
        get(out);
    else
        child_failures++;
}

static void nccl_stats(struct fake_nccl_stats *out)
{
    void (*get)(struct fake_nccl_stats *) = NULL;
    void *h = dlopen(fake_nccl, RTLD_NOW | RTLD_NOLOAD);
    memset(out, 0, sizeof *out);
    if (h != NULL)
        *(void **)&get = dlsym(h, "fake_nccl_stats");
    if (get != NULL)
        get(out);
    else
        child_failures++;
}

static void use_fakes(void)
{
    setenv("ASYNCDIFF_CUDART_LIBRARY", fake_cudart, 1);
    setenv("ASYNCDIFF_NCCL_LIBRARY", fake_nccl, 1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A fresh handle of world `world` on `device` through the fakes. */
static ad_nccl *open_handle(int world, int rank, int device, double timeout, ad_status *st_out,
                            ad_err *err)
{
    unsigned char id[AD_NCCL_UNIQUE_ID_BYTES];
    ad_nccl *h = NULL;
    ad_status st = ad_nccl_unique_id(id, err);
    if (st == AD_OK)
        st = ad_nccl_init(id, world, rank, device, timeout, &h, err);
    if (st_out != NULL)
        *st_out = st;
    return h;
}

/* ---------------------------------------------------------------- scenarios */

static void t_library_not_found(void)
{
    ad_err err = {0};
    char text[1536];
    setenv("ASYNCDIFF_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
    setenv("ASYNCDIFF_CUDART_LIBRARY", fake_cudart, 1);
    CHECK(ad_gpu_load(&err) == AD_EUNSUPPORTED);
    CHECK_MSG(strstr(err.msg, "ASYNCDIFF_NCCL_LIBRARY=/nonexistent/libnccl.so.2") != NULL, err.msg);
    CHECK(ad_gpu_get() == NULL);
    /* the same answer again, without loading twice */
    CHECK(ad_gpu_load(NULL) == AD_EUNSUPPORTED);
    ad_gpu_describe(text, sizeof text);
    CHECK_MSG(strstr(text, "NCCL transport unavailable") != NULL, text);
    CHECK_MSG(strstr(text, "CUDA runtime found") != NULL, text);
    /* init refuses with the same status and creates nothing */
    {
        unsigned char id[AD_NCCL_UNIQUE_ID_BYTES] = {0};
        ad_nccl *h = (ad_nccl *)&err; /* must be reset to NULL */
        CHECK(ad_nccl_init(id, 1, 0, 0, 1.0, &h, &err) == AD_EUNSUPPORTED);
        CHECK(h == NULL);
        CHECK(ad_nccl_unique_id(id, &err) == AD_EUNSUPPORTED);
    }
}

static void t_missing_symbols(void)
{
    ad_err err = {0};
    /* the CUDA runtime fake has none of NCCL's functions */
    setenv("ASYNCDIFF_NCCL_LIBRARY", fake_cudart, 1);
    setenv("ASYNCDIFF_CUDART_LIBRARY", fake_cudart, 1);
    CHECK(ad_gpu_load(&err) == AD_EUNSUPPORTED);
    CHECK_MSG(strstr(err.msg, "lacks required symbol(s)") != NULL, err.msg);
    CHECK_MSG(strstr(err.msg, "ncclGetVersion") != NULL, err.msg);
    CHECK_MSG(strstr(err.msg, "ncclSend") != NULL, err.msg);
    /* optional entries are not reported as missing */
    CHECK_MSG(strstr(err.msg, "ncclCommInitRankConfig") == NULL, err.msg);
}

static void t_no_device(void)
{
    ad_err err = {0};
    use_fakes();
    setenv("FAKE_CUDA_DEVICES", "0", 1);
    CHECK(ad_gpu_load(&err) == AD_EUNSUPPORTED);
    CHECK_MSG(strstr(err.msg, "no CUDA device visible") != NULL, err.msg);
}

static void t_device_count_fails(void)
{
    ad_err err = {0};
    use_fakes();
    setenv("FAKE_CUDA_DEVICES", "error", 1);
    CHECK(ad_gpu_load(&err) == AD_EUNSUPPORTED);
    CHECK_MSG(strstr(err.msg, "cudaGetDeviceCount failed: fake CUDA error 100") != NULL, err.msg);
}

static void t_already_loaded_wins(void)
{
    ad_err err = {0};
    char text[1536];
    /* what torch does: the libraries are in the process before we look */
    void *c = dlopen(fake_cudart, RTLD_NOW | RTLD_GLOBAL);
    void *n = dlopen(fake_nccl, RTLD_NOW | RTLD_GLOBAL);
    CHECK(c != NULL && n != NULL);
    /* a variable pointing elsewhere must not make a second copy */
    setenv("ASYNCDIFF_NCCL_LIBRARY", "/nonexistent/other-libnccl.so", 1);
    unsetenv("ASYNCDIFF_CUDART_LIBRARY");
    CHECK_MSG(ad_gpu_load(&err) == AD_OK, err.msg);
    ad_gpu_describe(text, sizeof text);
    CHECK_MSG(strstr(text, "NCCL 2.21.5") != NULL, text);
    CHECK_MSG(strstr(text, "already loaded by the process") != NULL, text);
    CHECK_MSG(strstr(text, "environment variable is ignored") != NULL, text);
    CHECK_MSG(strstr(text, "libfakenccl") != NULL, text); /* the real file, via dladdr */
    CHECK(ad_gpu_get() != NULL && ad_gpu_get()->device_count == 1);
}

static void t_env_library(void)
{
    ad_err err = {0};
    char text[1536];
    use_fakes();
    setenv("FAKE_NCCL_VERSION", "21803", 1);
    CHECK_MSG(ad_gpu_load(&err) == AD_OK, err.msg);
    ad_gpu_describe(text, sizeof text);
    CHECK_MSG(strstr(text, "NCCL 2.18.3") != NULL, text);
    CHECK_MSG(strstr(text, "(ASYNCDIFF_NCCL_LIBRARY)") != NULL, text);
    CHECK_MSG(strstr(text, "CUDA runtime 12.4") != NULL, text);
    {
        char v[32];
        CHECK(strcmp(ad_nccl_version_string(22105, v, sizeof v), "2.21.5") == 0);
        CHECK(strcmp(ad_nccl_version_string(2708, v, sizeof v), "2.7.8") == 0);
    }
}

static void t_argument_checks(void)
{
    ad_err err = {0};
    unsigned char id[AD_NCCL_UNIQUE_ID_BYTES] = {0};
    ad_nccl *h = NULL;
    char buf[8];
    ad_nccl_send s = {0, buf, sizeof buf};
    ad_nccl_recv r = {0, buf, sizeof buf};

    /* no library needed for any of these */
    setenv("ASYNCDIFF_NCCL_LIBRARY", "/nonexistent", 1);
    CHECK(ad_nccl_check_init(0, 0, 0, 1.0, &err) == AD_EINVAL && strcmp(err.arg, "world_size") == 0);
    CHECK(ad_nccl_check_init(AD_NCCL_MAX_WORLD + 1, 0, 0, 1.0, &err) == AD_EINVAL);
    CHECK(ad_nccl_check_init(2, 2, 0, 1.0, &err) == AD_EINVAL && strcmp(err.arg, "rank") == 0);
    CHECK(ad_nccl_check_init(2, -1, 0, 1.0, &err) == AD_EINVAL && strcmp(err.arg, "rank") == 0);
    CHECK(ad_nccl_check_init(2, 1, -1, 1.0, &err) == AD_EINVAL && strcmp(err.arg, "device") == 0);
    CHECK(ad_nccl_check_init(2, 1, 0, -1.0, &err) == AD_EINVAL && strcmp(err.arg, "timeout") == 0);
    CHECK(ad_nccl_check_init(2, 1, 0, 1.0 / 0.0, &err) == AD_EINVAL);
    CHECK(ad_nccl_check_init(2, 1, 0, 0.0 / 0.0, &err) == AD_EINVAL);
    CHECK(ad_nccl_check_init(2, 1, 0, 0.0, &err) == AD_OK);

    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_OK);
    CHECK(ad_nccl_check_items(2, NULL, 0, NULL, 0, &err) == AD_OK);
    CHECK(ad_nccl_check_items(2, NULL, 1, NULL, 0, &err) == AD_EINVAL && strcmp(err.arg, "sends") == 0);
    CHECK(ad_nccl_check_items(2, NULL, 0, NULL, 3, &err) == AD_EINVAL && strcmp(err.arg, "recvs") == 0);
    s.peer = 2;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL && strcmp(err.arg, "sends") == 0);
    CHECK_MSG(strstr(err.msg, "peer 2") != NULL, err.msg);
    s.peer = -1;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL);
    s.peer = 1;
    r.ptr = NULL;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL && strcmp(err.arg, "recvs") == 0);
    r.ptr = buf;
    r.nbytes = 0;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL);
    CHECK_MSG(strstr(err.msg, "nbytes must be > 0") != NULL, err.msg);
    r.nbytes = SIZE_MAX;
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL);
    r.nbytes = 8;
    r.ptr = (void *)(UINTPTR_MAX - 3);
    CHECK(ad_nccl_check_items(2, &s, 1, &r, 1, &err) == AD_EINVAL);

    /* init: argument errors come before any loading */
    CHECK(ad_nccl_init(id, 1, 0, 0, 1.0, NULL, &err) == AD_EINVAL);
    CHECK(ad_nccl_init(NULL, 1, 0, 0, 1.0, &h, &err) == AD_EINVAL && h == NULL);
    CHECK(ad_nccl_init(id, 1, 1, 0, 1.0, &h, &err) == AD_EINVAL && h == NULL);
    CHECK(ad_nccl_unique_id(NULL, &err) == AD_EINVAL);
    /* NULL handles */
    CHECK(ad_nccl_exchange(NULL, NULL, 0, NULL, 0, NULL, 1.0, &err) == AD_EINVAL);
    CHECK(ad_nccl_wait(NULL, 1.0, &err) == AD_EINVAL);
    ad_nccl_destroy(NULL, 0);
    ad_nccl_destroy(NULL, 1);
    CHECK(ad_nccl_world(NULL) == 0 && ad_nccl_failed(NULL) == 1 && ad_nccl_stream(NULL) == NULL);
}

/* Fill `n` bytes with a pattern that depends on `seed`. */
static void pattern(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)((i * 131u + seed * 7u + (i >> 8)) & 0xffu);
}

static void t_self_exchange(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_cuda_stats cs;
    struct fake_nccl_stats ns;
    size_t big = 1u << 20;
    unsigned char *a = malloc(big), *b = malloc(big), *c = malloc(4096), *d = malloc(4096);
    void *compute = NULL;
    ad_nccl *h;

    use_fakes();
    setenv("FAKE_NCCL_INIT_POLLS", "3", 1);   /* init reports "in progress" a few times */
    setenv("FAKE_NCCL_GROUP_POLLS", "2", 1);  /* and so does every group launch */
    setenv("FAKE_CUDA_EVENT_POLLS", "2", 1);  /* and transfers take a few polls */
    h = open_handle(1, 0, 0, 5.0, &st, &err);
    CHECK_MSG(st == AD_OK && h != NULL, err.msg);
    if (h == NULL)
        goto done;
    nccl_stats(&ns);
    CHECK(ns.inits_nonblocking == 1 && ns.inits_blocking == 0);
    CHECK(ns.config_blocking == 0);
    CHECK(ns.config_version == 21700); /* our layout's version, not the library's */
    CHECK(ns.config_size == (int)sizeof(ad_nccl_config));
    CHECK(ns.config_undef_ok);
    CHECK(!ad_nccl_is_blocking(h) && ad_nccl_world(h) == 1 && ad_nccl_rank(h) == 0);
    cuda_stats(&cs);
    CHECK(cs.streams_created == 1 && cs.last_stream_flags == AD_CUDA_STREAM_NON_BLOCKING);
    CHECK(cs.events_created == 2 && cs.last_event_flags == AD_CUDA_EVENT_DISABLE_TIMING);
    /* a compute stream of the caller's own */
    CHECK(ad_gpu_get()->cudaStreamCreateWithFlags(&compute, 0) == 0);

    for (unsigned round = 0; round < 5; round++) {
        ad_nccl_send sends[2] = {{0, a, big}, {0, c, 4096}};
        ad_nccl_recv recvs[2] = {{0, b, big}, {0, d, 4096}};
        pattern(a, big, round);
        pattern(c, 4096, round + 100);
        memset(b, 0, big);
        memset(d, 0, 4096);
        st = ad_nccl_exchange(h, sends, 2, recvs, 2, round % 2 ? compute : NULL, 5.0, &err);
        CHECK_MSG(st == AD_OK, err.msg);
        CHECK(memcmp(a, b, big) == 0);
        CHECK(memcmp(c, d, 4096) == 0);
    }
    nccl_stats(&ns);
    CHECK(ns.sends == 10 && ns.recvs == 10 && ns.groups == 5);
    CHECK(ns.bytes == 2 * 5 * (long long)(big + 4096));
    CHECK(ns.last_datatype == AD_NCCL_UINT8);
    CHECK(ns.last_stream == ad_nccl_stream(h)); /* NCCL ran on the comm stream */
    CHECK(ns.last_stream != compute && ns.last_stream != NULL);
    CHECK(ns.bad_device_calls == 0);
    cuda_stats(&cs);
    CHECK(cs.records == 10); /* ready + done per exchange */
    CHECK(cs.waits == 10);   /* comm waits for compute, compute waits for comm */

    /* nothing to move: nothing queued */
    CHECK(ad_nccl_exchange(h, NULL, 0, NULL, 0, NULL, 1.0, &err) == AD_OK);
    nccl_stats(&ns);
    CHECK(ns.groups == 5);
    /* bad items are refused without harming the handle */
    {
        ad_nccl_send bad = {1, a, 16};
        CHECK(ad_nccl_exchange(h, &bad, 1, NULL, 0, NULL, 1.0, &err) == AD_EINVAL);
        CHECK(!ad_nccl_failed(h));
        CHECK(ad_nccl_exchange(h, NULL, 0, NULL, 0, NULL, -1.0, &err) == AD_EINVAL);
    }
    CHECK_MSG(ad_nccl_wait(h, 5.0, &err) == AD_OK, err.msg);
    (void)ad_gpu_get()->cudaStreamDestroy(compute);
    setenv("FAKE_NCCL_FINALIZE_POLLS", "2", 1);
    ad_nccl_destroy(h, 0);
    nccl_stats(&ns);
    CHECK(ns.finalizes == 1 && ns.destroys == 1 && ns.aborts == 0 && ns.live_comms == 0);
    cuda_stats(&cs);
    CHECK(cs.streams_created == cs.streams_destroyed);
    CHECK(cs.events_created == cs.events_destroyed);
done:
    free(a);
    free(b);
    free(c);
    free(d);
}

static void t_unique_id_roundtrip(void)
{
    ad_err err = {0};
    unsigned char id[AD_NCCL_UNIQUE_ID_BYTES];
    ad_nccl *h = NULL;
    use_fakes();
    CHECK_MSG(ad_nccl_unique_id(id, &err) == AD_OK, err.msg);
    CHECK(memcmp(id, "FAKE", 4) == 0);
    /* the bytes reach ncclCommInitRank* intact (passed by value, 128 bytes) */
    CHECK_MSG(ad_nccl_init(id, 3, 2, 0, 2.0, &h, &err) == AD_OK, err.msg);
    ad_nccl_destroy(h, 0);
    id[77] ^= 1;
    h = NULL;
    CHECK(ad_nccl_init(id, 3, 2, 0, 2.0, &h, &err) == AD_EEXTERNAL && h == NULL);
    CHECK_MSG(strstr(err.msg, "ncclCommInitRankConfig") != NULL, err.msg);
    CHECK_MSG(strstr(err.msg, "nccl.c:") != NULL, err.msg); /* file:line */
    CHECK_MSG(strstr(err.msg, "fake NCCL error") != NULL, err.msg);
    CHECK_MSG(strstr(err.msg, "fake last error detail") != NULL, err.msg);
}

static void t_peers(void)
{
    /* world 3, rank 1: sends to 0 and 2, receives from 0 and 2 */
    ad_err err = {0};
    ad_status st;
    unsigned char out[64], in0[32], in2[16];
    ad_nccl *h;
    use_fakes();
    h = open_handle(3, 1, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send sends[2] = {{0, out, 64}, {2, out, 64}};
        ad_nccl_recv recvs[2] = {{0, in0, sizeof in0}, {2, in2, sizeof in2}};
        CHECK_MSG(ad_nccl_exchange(h, sends, 2, recvs, 2, NULL, 2.0, &err) == AD_OK, err.msg);
        CHECK(in0[0] == 1 && in0[31] == 1 && in2[0] == 3 && in2[15] == 3);
    }
    ad_nccl_destroy(h, 0);
}

static void t_blocking_nccl(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    unsigned char a[100], b[100];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_VERSION", "21305", 1); /* before non-blocking communicators */
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    CHECK(ad_nccl_is_blocking(h));
    nccl_stats(&ns);
    CHECK(ns.inits_blocking == 1 && ns.inits_nonblocking == 0);
    pattern(a, sizeof a, 9);
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 2.0, &err) == AD_OK, err.msg);
        CHECK(memcmp(a, b, sizeof a) == 0);
    }
    ad_nccl_destroy(h, 0);
    nccl_stats(&ns);
    CHECK(ns.finalizes == 0 && ns.destroys == 1 && ns.live_comms == 0);
}

static void t_device_switch(void)
{
    /* the caller works on device 0; the communicator lives on device 1 */
    ad_err err = {0};
    ad_status st;
    struct fake_cuda_stats cs;
    struct fake_nccl_stats ns;
    unsigned char a[10], b[10];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_CUDA_DEVICES", "2", 1);
    CHECK(ad_gpu_load(&err) == AD_OK);
    CHECK(ad_gpu_get()->device_count == 2);
    CHECK(ad_gpu_get()->cudaSetDevice(0) == 0);
    h = open_handle(1, 0, 1, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    cuda_stats(&cs);
    CHECK(cs.current_device == 0); /* put back */
    CHECK(cs.last_stream_device == 1); /* the comm stream belongs to device 1 */
    nccl_stats(&ns);
    CHECK(ns.last_comm_device == 1); /* so does the communicator */
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 2.0, &err) == AD_OK, err.msg);
    }
    cuda_stats(&cs);
    CHECK(cs.current_device == 0);
    nccl_stats(&ns);
    CHECK(ns.bad_device_calls == 0); /* NCCL was always called on device 1 */
    ad_nccl_destroy(h, 0);
    cuda_stats(&cs);
    CHECK(cs.current_device == 0);
    /* a device that does not exist */
    h = open_handle(1, 0, 2, 2.0, &st, &err);
    CHECK(st == AD_EINVAL && h == NULL && strcmp(err.arg, "device") == 0);
}

static void t_init_timeout(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    struct fake_cuda_stats cs;
    double t0;
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_INIT_HANG", "1", 1); /* a rank that never shows up */
    t0 = now_s();
    h = open_handle(2, 0, 0, 0.3, &st, &err);
    CHECK(st == AD_ETIMEDOUT && h == NULL);
    CHECK_MSG(strstr(err.msg, "within the timeout") != NULL, err.msg);
    CHECK(now_s() - t0 >= 0.29 && now_s() - t0 < 5.0);
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.live_comms == 0);
    cuda_stats(&cs);
    CHECK(cs.streams_created == cs.streams_destroyed && cs.events_created == cs.events_destroyed);
}

/* An exchange that fails one way or another leaves an aborted handle that
 * refuses further work and can still be destroyed. */
static void expect_aborted(ad_nccl *h)
{
    ad_err err = {0};
    struct fake_nccl_stats ns;
    unsigned char a[4] = {0};
    ad_nccl_send s = {0, a, 4};
    CHECK(ad_nccl_failed(h));
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.live_comms == 0);
    CHECK(ad_nccl_exchange(h, &s, 1, NULL, 0, NULL, 1.0, &err) == AD_ESTATE);
    CHECK(ad_nccl_wait(h, 1.0, &err) == AD_ESTATE);
    ad_nccl_destroy(h, 0);
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.destroys == 0);
}

static void t_group_timeout(void)
{
    ad_err err = {0};
    ad_status st;
    unsigned char a[64], b[64];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_GROUP_HANG", "1", 1);
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 0.2, &err) == AD_ETIMEDOUT);
        CHECK_MSG(strstr(err.msg, "ncclGroupEnd") != NULL, err.msg);
        CHECK(err.arg != NULL && strcmp(err.arg, "timeout") == 0);
    }
    expect_aborted(h);
}

static void t_async_error(void)
{
    ad_err err = {0};
    ad_status st;
    unsigned char a[64], b[64];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_ASYNC_ERROR", "6", 1); /* ncclRemoteError: a peer died */
    setenv("FAKE_NCCL_GROUP_POLLS", "1", 1);
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 2.0, &err) == AD_EPEERGONE);
        CHECK_MSG(strstr(err.msg, "fake remote error") != NULL, err.msg);
    }
    expect_aborted(h);
}

static void t_gpu_hang(void)
{
    /* transfers queued but never finishing: seen at the next exchange */
    ad_err err = {0};
    ad_status st;
    unsigned char a[64], b[64];
    ad_nccl *h;
    double t0;
    use_fakes();
    setenv("FAKE_CUDA_HANG", "1", 1);
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 0.2, &err) == AD_OK, err.msg);
        t0 = now_s();
        CHECK(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 0.2, &err) == AD_ETIMEDOUT);
        CHECK(now_s() - t0 >= 0.19);
        CHECK_MSG(strstr(err.msg, "previous exchange") != NULL, err.msg);
    }
    expect_aborted(h);
}

static void t_wait_timeout(void)
{
    ad_err err = {0};
    ad_status st;
    unsigned char a[64], b[64];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_CUDA_HANG", "1", 1);
    h = open_handle(1, 0, 0, 0.2, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 0.2, &err) == AD_OK, err.msg);
        CHECK(ad_nccl_wait(h, 0.1, &err) == AD_ETIMEDOUT);
    }
    expect_aborted(h);
}

static void t_graceful_destroy_falls_back_to_abort(void)
{
    /* queued work that never ends: destroy(abort=0) gives up after the
     * init timeout and aborts instead of hanging */
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    unsigned char a[64], b[64];
    ad_nccl *h;
    double t0;
    use_fakes();
    setenv("FAKE_CUDA_HANG", "1", 1);
    h = open_handle(1, 0, 0, 0.2, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK_MSG(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 1.0, &err) == AD_OK, err.msg);
    }
    t0 = now_s();
    ad_nccl_destroy(h, 0);
    CHECK(now_s() - t0 < 3.0);
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.destroys == 0 && ns.live_comms == 0);
}

static void t_op_failure_closes_group(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    unsigned char a[64], b[64];
    ad_nccl *h;
    use_fakes();
    setenv("FAKE_NCCL_FAIL_OP", "1", 1); /* the second call of the group fails */
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    if (h == NULL)
        return;
    {
        ad_nccl_send s = {0, a, sizeof a};
        ad_nccl_recv r = {0, b, sizeof b};
        CHECK(ad_nccl_exchange(h, &s, 1, &r, 1, NULL, 2.0, &err) == AD_EEXTERNAL);
        CHECK_MSG(strstr(err.msg, "ncclRecv") != NULL, err.msg);
    }
    nccl_stats(&ns);
    CHECK(ns.group_depth == 0); /* ncclGroupEnd was still called */
    expect_aborted(h);
}

static void t_abort_destroy(void)
{
    ad_err err = {0};
    ad_status st;
    struct fake_nccl_stats ns;
    ad_nccl *h;
    use_fakes();
    h = open_handle(1, 0, 0, 2.0, &st, &err);
    CHECK_MSG(st == AD_OK, err.msg);
    ad_nccl_destroy(h, 1);
    nccl_stats(&ns);
    CHECK(ns.aborts == 1 && ns.destroys == 0 && ns.finalizes == 0 && ns.live_comms == 0);
}

/* ------------------------------------------------------------------ driver */

struct scenario {
    const char *name;
    void (*fn)(void);
};

static const struct scenario scenarios[] = {
    {"library not found", t_library_not_found},
    {"missing symbols", t_missing_symbols},
    {"no device", t_no_device},
    {"device count fails", t_device_count_fails},
    {"already loaded copy wins", t_already_loaded_wins},
    {"library from the environment", t_env_library},
    {"argument checks", t_argument_checks},
    {"self exchange (non-blocking NCCL)", t_self_exchange},
    {"unique id round trip", t_unique_id_roundtrip},
    {"exchange with peers", t_peers},
    {"blocking NCCL (< 2.14)", t_blocking_nccl},
    {"device switch", t_device_switch},
    {"init timeout aborts", t_init_timeout},
    {"group launch timeout aborts", t_group_timeout},
    {"async error aborts", t_async_error},
    {"GPU hang seen at the next exchange", t_gpu_hang},
    {"wait timeout aborts", t_wait_timeout},
    {"graceful destroy falls back to abort", t_graceful_destroy_falls_back_to_abort},
    {"failed send/recv still closes the group", t_op_failure_closes_group},
    {"destroy with abort", t_abort_destroy},
};

int main(int argc, char **argv)
{
    int passed = 0, failed = 0;
    size_t n = sizeof scenarios / sizeof scenarios[0];

    if (argc != 3) {
        fprintf(stderr, "usage: %s FAKE_CUDART_SO FAKE_NCCL_SO\n", argv[0]);
        return 2;
    }
    fake_cudart = argv[1];
    fake_nccl = argv[2];
    /* scenarios set these themselves */
    unsetenv("ASYNCDIFF_NCCL_LIBRARY");
    unsetenv("ASYNCDIFF_CUDART_LIBRARY");
    for (size_t i = 0; i < n; i++) {
        pid_t pid;
        int status = 0;
        fflush(stdout);
        fflush(stderr);
        pid = fork();
        if (pid < 0) {
            perror("fork");
            return 2;
        }
        if (pid == 0) {
            scenarios[i].fn();
            fflush(stderr);
            exit(child_failures == 0 ? 0 : 1); /* exit, not _exit: LeakSanitizer runs at exit */
        }
        if (waitpid(pid, &status, 0) < 0) {
            perror("waitpid");
            return 2;
        }
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            printf("ok   %s\n", scenarios[i].name);
            passed++;
        } else {
            printf("FAIL %s (%s %d)\n", scenarios[i].name,
                   WIFEXITED(status) ? "exit" : "signal",
                   WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            failed++;
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}

#endif
