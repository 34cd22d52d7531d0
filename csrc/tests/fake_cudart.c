/*
 * fake_cudart.c -- a stand-in CUDA runtime for the tests of csrc/gpu.c and
 * csrc/nccl.c on machines without a GPU, built as a shared library with
 * the soname of the real one:
 *
 *   cc -shared -fPIC -Wl,-soname,libcudart.so.12 fake_cudart.c -o libfakecudart.so
 *
 * Streams and events are small host objects, "device memory" is host
 * memory, events complete at once (or after FAKE_CUDA_EVENT_POLLS queries,
 * or never with FAKE_CUDA_HANG=1), FAKE_CUDA_DEVICES devices (default 1;
 * "error": cudaGetDeviceCount fails with cudaErrorNoDevice; "nodriver": it
 * fails with cudaErrorInsufficientDriver as the real runtime does without
 * a driver), a driver of CUDA FAKE_CUDA_DRIVER (default 12040; 0: none).
 * fake_cuda_stats() tells the test program what was called.
 */
#define _GNU_SOURCE

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_gpu.h"

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
    if (v != NULL && strcmp(v, "nodriver") == 0)
        return 35; /* cudaErrorInsufficientDriver */
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

int cudaDriverGetVersion(int *version)
{
    *version = (int)env_long("FAKE_CUDA_DRIVER", 12040);
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

