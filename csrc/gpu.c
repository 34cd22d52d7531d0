/*
 * gpu.c -- finds the CUDA runtime and NCCL at run time (see gpu.h).
 *
 * Pure C: no Python.h, no CUDA or NCCL header, no link-time dependency on
 * either library.  The only process-wide state is the loaded table below;
 * a process has one CUDA runtime and one NCCL, so one table is the right
 * amount, and pthread_once makes the first load safe from any thread.
 */
#define _GNU_SOURCE /* dladdr, RTLD_NOLOAD */

#include "gpu.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Which library a table entry belongs to (the X-macro's first column). */
enum { LIB_CUDART = 0, LIB_NCCL = 1, LIB_COUNT = 2 };
#define AD_LIB_CUDART LIB_CUDART
#define AD_LIB_NCCL LIB_NCCL

/* Candidate sonames, newest first.  The RTLD_NOLOAD probe walks all of them
 * before anything is opened, so the copy torch loaded wins whatever its
 * CUDA major version. */
static const char *const cudart_names[] = {
    "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.11",
    "libcudart.so.10.2", "libcudart.so", NULL,
};
static const char *const nccl_names[] = {"libnccl.so.2", "libnccl.so", NULL};

typedef struct lib_info {
    const char *what;              /* "CUDA runtime" / "NCCL" */
    const char *env;               /* environment variable that may name a file */
    const char *const *names;      /* sonames to try */
    void *handle;                  /* NULL when not found */
    const char *how;               /* how it was found */
    char path[512];                /* file it came from (dladdr), or the name */
    char problem[512];             /* why it is unusable, "" when fine */
} lib_info;

static struct {
    pthread_once_t once;
    ad_status status;
    char message[1536]; /* the full account (ad_gpu_describe) */
    ad_gpu_api api;
    lib_info lib[LIB_COUNT];
} g = {
    .once = PTHREAD_ONCE_INIT,
    .status = AD_EINTERNAL,
    .lib = {
        {"CUDA runtime", "ASYNCDIFF_CUDART_LIBRARY", cudart_names, NULL, NULL, "", ""},
        {"NCCL", "ASYNCDIFF_NCCL_LIBRARY", nccl_names, NULL, NULL, "", ""},
    },
};

/* printf into a buffer, truncating quietly (the messages are for people). */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 3, 4)))
#endif
static void set_text(char *buf, size_t n, const char *fmt, ...)
{
    va_list ap;
    if (n == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, n, fmt, ap);
    va_end(ap);
}

/* Append printf-style text to a NUL-terminated buffer, truncating quietly. */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((format(printf, 3, 4)))
#endif
static void append(char *buf, size_t n, const char *fmt, ...)
{
    size_t used = strlen(buf);
    va_list ap;
    if (used + 1 >= n)
        return;
    va_start(ap, fmt);
    vsnprintf(buf + used, n - used, fmt, ap);
    va_end(ap);
}

/* dlerror() text, never NULL. */
static const char *last_dlerror(void)
{
    const char *e = dlerror();
    return e != NULL ? e : "unknown dlopen error";
}

/* Find one library: already in the process, then the environment variable,
 * then the dynamic linker's search path.  Fills lib->handle or
 * lib->problem. */
static void open_library(lib_info *lib)
{
    const char *env = getenv(lib->env);
    char tried[384] = "";

    /* 1. A copy the process already has (torch's).  RTLD_NOLOAD never loads
     *    anything; it only hands back a reference to a loaded object. */
    for (const char *const *name = lib->names; *name != NULL; name++) {
        lib->handle = dlopen(*name, RTLD_LAZY | RTLD_NOLOAD);
        if (lib->handle != NULL) {
            lib->how = "already loaded by the process";
            set_text(lib->path, sizeof lib->path, "%s", *name);
            if (env != NULL && env[0] != '\0')
                lib->how = "already loaded by the process; the environment variable is "
                           "ignored so that the process keeps a single copy";
            return;
        }
    }
    (void)dlerror(); /* forget the NOLOAD misses */

    /* 2. The file the user named.  No fallback when it fails: a silent
     *    switch to another copy would be harder to debug than the error. */
    if (env != NULL && env[0] != '\0') {
        lib->handle = dlopen(env, RTLD_NOW | RTLD_LOCAL);
        if (lib->handle == NULL) {
            set_text(lib->problem, sizeof lib->problem, "%s=%s cannot be opened: %s",
                     lib->env, env, last_dlerror());
            return;
        }
        lib->how = lib->env;
        set_text(lib->path, sizeof lib->path, "%s", env);
        return;
    }

    /* 3. The sonames, through the usual search path. */
    for (const char *const *name = lib->names; *name != NULL; name++) {
        lib->handle = dlopen(*name, RTLD_NOW | RTLD_LOCAL);
        if (lib->handle != NULL) {
            lib->how = "found by the dynamic linker";
            set_text(lib->path, sizeof lib->path, "%s", *name);
            return;
        }
        append(tried, sizeof tried, "%s%s", tried[0] ? ", " : "", *name);
        (void)dlerror();
    }
    set_text(lib->problem, sizeof lib->problem,
             "%s library not found (not loaded by this process, %s not set, "
             "dlopen failed for %s)",
             lib->what, lib->env, tried);
}

/* Replace lib->path by the file a resolved symbol lives in, when known. */
static void locate(lib_info *lib, void *symbol)
{
    Dl_info info;
    if (symbol != NULL && dladdr(symbol, &info) != 0 && info.dli_fname != NULL &&
        info.dli_fname[0] != '\0')
        set_text(lib->path, sizeof lib->path, "%s", info.dli_fname);
}

const char *ad_nccl_version_string(int code, char *buf, size_t n)
{
    int major, minor, patch;
    if (n == 0)
        return buf;
    if (code >= 10000) { /* 2.9 and later */
        major = code / 10000;
        minor = (code % 10000) / 100;
    } else {
        major = code / 1000;
        minor = (code % 1000) / 100;
    }
    patch = code % 100;
    snprintf(buf, n, "%d.%d.%d", major, minor, patch);
    return buf;
}

static void load_once(void)
{
    char missing[LIB_COUNT][384] = {"", ""};
    char problems[1024] = "";
    int devices = 0;

    for (int i = 0; i < LIB_COUNT; i++)
        open_library(&g.lib[i]);

    /* Resolve every table entry of each library that was found. */
#define AD_GPU_RESOLVE(which, required, ret, name, params)                            \
    if (g.lib[AD_LIB_##which].handle != NULL) {                                       \
        *(void **)(&g.api.name) = dlsym(g.lib[AD_LIB_##which].handle, #name);         \
        if (g.api.name == NULL && (required))                                       \
            append(missing[AD_LIB_##which], sizeof missing[0], "%s%s",                \
                   missing[AD_LIB_##which][0] ? ", " : "", #name);                    \
    }
    AD_GPU_FUNCTIONS(AD_GPU_RESOLVE)
#undef AD_GPU_RESOLVE

    for (int i = 0; i < LIB_COUNT; i++) {
        lib_info *lib = &g.lib[i];
        if (lib->handle != NULL && missing[i][0] != '\0')
            set_text(lib->problem, sizeof lib->problem,
                     "%s library %s lacks required symbol(s): %s", lib->what,
                     lib->path, missing[i]);
    }
    if (g.lib[LIB_CUDART].problem[0] == '\0' && g.lib[LIB_CUDART].handle != NULL) {
        ad_cuda_error e;
        locate(&g.lib[LIB_CUDART], *(void **)&g.api.cudaGetDeviceCount);
        (void)g.api.cudaRuntimeGetVersion(&g.api.cudart_version);
        e = g.api.cudaGetDeviceCount(&devices);
        if (e != AD_CUDA_SUCCESS) {
            const char *text = g.api.cudaGetErrorString(e);
            set_text(g.lib[LIB_CUDART].problem, sizeof g.lib[LIB_CUDART].problem,
                     "no usable CUDA device: cudaGetDeviceCount failed: %s (CUDA error %d; "
                     "CUDA runtime %s)",
                     text != NULL ? text : "?", e, g.lib[LIB_CUDART].path);
            devices = 0;
        } else if (devices < 1) {
            const char *visible = getenv("CUDA_VISIBLE_DEVICES");
            set_text(g.lib[LIB_CUDART].problem, sizeof g.lib[LIB_CUDART].problem,
                     "no CUDA device visible to this process (CUDA_VISIBLE_DEVICES=%s; "
                     "CUDA runtime %s)",
                     visible != NULL ? visible : "<unset>", g.lib[LIB_CUDART].path);
        }
        g.api.device_count = devices;
    }
    if (g.lib[LIB_NCCL].problem[0] == '\0' && g.lib[LIB_NCCL].handle != NULL) {
        ad_nccl_result r;
        locate(&g.lib[LIB_NCCL], *(void **)&g.api.ncclGetVersion);
        r = g.api.ncclGetVersion(&g.api.nccl_version);
        if (r != AD_NCCL_SUCCESS)
            set_text(g.lib[LIB_NCCL].problem, sizeof g.lib[LIB_NCCL].problem,
                     "ncclGetVersion failed (NCCL error %d)", r);
    }

    /* NCCL first: it is what the user asked about. */
    for (int i = LIB_COUNT - 1; i >= 0; i--)
        if (g.lib[i].problem[0] != '\0')
            append(problems, sizeof problems, "%s%s", problems[0] ? "; " : "",
                   g.lib[i].problem);

    if (problems[0] == '\0') {
        char version[32];
        g.status = AD_OK;
        set_text(g.message, sizeof g.message,
                 "NCCL %s from %s (%s); CUDA runtime %d.%d from %s (%s); %d CUDA device%s",
                 ad_nccl_version_string(g.api.nccl_version, version, sizeof version),
                 g.lib[LIB_NCCL].path, g.lib[LIB_NCCL].how, g.api.cudart_version / 1000,
                 (g.api.cudart_version % 1000) / 10, g.lib[LIB_CUDART].path,
                 g.lib[LIB_CUDART].how, devices, devices == 1 ? "" : "s");
    } else {
        g.status = AD_EUNSUPPORTED;
        set_text(g.message, sizeof g.message, "NCCL transport unavailable: %s", problems);
        /* Say what was found as well: it helps to see which copy was used. */
        for (int i = LIB_COUNT - 1; i >= 0; i--)
            if (g.lib[i].handle != NULL && g.lib[i].problem[0] == '\0')
                append(g.message, sizeof g.message, "; %s found: %s (%s)", g.lib[i].what,
                       g.lib[i].path, g.lib[i].how);
        /* A table that is only half usable must not be handed out. */
        memset(&g.api, 0, sizeof g.api);
    }
}

ad_status ad_gpu_load(ad_err *err)
{
    if (pthread_once(&g.once, load_once) != 0)
        return ad_err_set(err, AD_EINTERNAL, NULL, "pthread_once failed while loading NCCL");
    if (g.status != AD_OK)
        return ad_err_set(err, g.status, NULL, "%s", g.message);
    return AD_OK;
}

const ad_gpu_api *ad_gpu_get(void)
{
    if (ad_gpu_load(NULL) != AD_OK)
        return NULL;
    return &g.api;
}

const char *ad_gpu_describe(char *buf, size_t n)
{
    if (n == 0)
        return buf;
    (void)ad_gpu_load(NULL);
    snprintf(buf, n, "%s", g.message);
    return buf;
}

ad_status ad_cuda_status(const ad_gpu_api *api, ad_cuda_error code, const char *call,
                         const char *file, int line, ad_err *err)
{
    const char *text = NULL;
    if (code == AD_CUDA_SUCCESS)
        return AD_OK;
    if (api != NULL && api->cudaGetErrorString != NULL)
        text = api->cudaGetErrorString(code);
    return ad_err_set(err, AD_EEXTERNAL, NULL, "%s:%d: %s failed: %s (CUDA error %d)", file,
                      line, call, text != NULL ? text : "unknown error", code);
}

ad_status ad_nccl_status(const ad_gpu_api *api, ad_nccl_comm comm, ad_nccl_result code,
                         const char *call, const char *file, int line, ad_err *err)
{
    const char *text = NULL, *detail = NULL;
    if (code == AD_NCCL_SUCCESS)
        return AD_OK;
    if (api != NULL && api->ncclGetErrorString != NULL)
        text = api->ncclGetErrorString(code);
    if (api != NULL && api->ncclGetLastError != NULL)
        detail = api->ncclGetLastError(comm);
    return ad_err_set(err, code == AD_NCCL_REMOTE_ERROR ? AD_EPEERGONE : AD_EEXTERNAL, NULL,
                      "%s:%d: %s failed: %s (NCCL error %d)%s%s", file, line, call,
                      text != NULL ? text : "unknown error", code,
                      (detail != NULL && detail[0] != '\0') ? ": " : "",
                      (detail != NULL) ? detail : "");
}
