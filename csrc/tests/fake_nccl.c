/*
 * fake_nccl.c -- a stand-in NCCL for the tests of csrc/gpu.c and
 * csrc/nccl.c on machines without a GPU, built as a shared library with
 * the soname of the real one:
 *
 *   cc -shared -fPIC -Wl,-soname,libnccl.so.2 fake_nccl.c -o libfakenccl.so -ldl
 *
 * Sends to and receives from the own rank are matched in order and copied
 * at ncclGroupEnd; a receive from another rank is filled with the byte
 * (peer + 1).  It checks what a real NCCL would reject (calls outside a
 * group, a config not made like NCCL_CONFIG_INITIALIZER, a unique id it did
 * not make, a NULL stream, another datatype than uint8, size mismatches)
 * and it can be told to be slow, to hang or to fail (FAKE_NCCL_*
 * variables).  fake_nccl_stats() tells the test program what was called.
 */
#define _GNU_SOURCE

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_gpu.h"

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
    if (env_long("FAKE_NCCL_INIT_ERROR", 0) != 0) /* e.g. 5: two ranks on one GPU */
        return (int)env_long("FAKE_NCCL_INIT_ERROR", 0);
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
    case 8: return "fake timeout";
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
