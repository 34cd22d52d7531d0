/*
 * gpu.c -- finds the CUDA runtime and NCCL at run time (see gpu.h for the
 * search order; docs/design.md §5.3).
 *
 * Pure C: no Python.h, no CUDA or NCCL header, no link-time dependency on
 * either library.  The only process-wide state is `g` below: a process has
 * one CUDA runtime and one NCCL, so one table is the right amount.  A mutex
 * serialises loading; once a load succeeded, `loaded` is set (release) and
 * the table is only read from then on, without the lock.
 */
#define _GNU_SOURCE /* dladdr, RTLD_NOLOAD */

#include "gpu.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Which library a table entry belongs to (the X-macro's first column). */
enum { LIB_CUDART = 0, LIB_NCCL = 1, LIB_COUNT = 2 };
#define AD_LIB_CUDART LIB_CUDART
#define AD_LIB_NCCL LIB_NCCL

/* Candidate sonames, newest first.  The RTLD_NOLOAD probe walks all of them
 * before anything is opened, so the copy torch loaded wins whatever its
 * CUDA major version. */
static const char *const cudart_names[] = {
    "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so", NULL,
};
static const char *const nccl_names[] = {"libnccl.so.2", "libnccl.so", NULL};

/* Where NVIDIA's pip wheels put the libraries, under a Python search folder
 * (nvidia-cuda-runtime for CUDA 13, nvidia-cuda-runtime-cu12/-cu11 before,
 * nvidia-nccl-cu13/-cu12). */
static const char *const cudart_wheel_files[] = {
    "nvidia/cu13/lib/libcudart.so.13", "nvidia/cuda_runtime/lib/libcudart.so.12",
    "nvidia/cuda_runtime/lib/libcudart.so.11.0", NULL,
};
static const char *const nccl_wheel_files[] = {"nvidia/nccl/lib/libnccl.so.2", NULL};

#define MAX_DIRS 64     /* Python search folders kept */
#define PATH_BYTES 1024 /* longest file name tried */

typedef struct lib_info {
    const char *what;                /* "CUDA runtime" / "NCCL" */
    const char *env;                 /* environment variable that may name a file */
    const char *const *names;        /* sonames to try */
    const char *const *wheel_files;  /* files under a Python search folder */
    void *handle;                    /* NULL while not found */
    const char *how;                 /* how it was found (a literal) */
    char path[PATH_BYTES];           /* file it came from (dladdr), or the name */
} lib_info;

static struct {
    pthread_mutex_t lock;
    atomic_int loaded; /* 1 once a load succeeded: `api` is final */
    int tried;         /* a load was attempted (message is set) */
    ad_status status;
    char message[2048]; /* the full account of the latest load (ad_gpu_describe) */
    ad_gpu_api api;
    lib_info lib[LIB_COUNT];
    char *dirs[MAX_DIRS]; /* copy of the folders given to ad_gpu_search_dirs */
    size_t ndirs;
} g = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .status = AD_EINTERNAL,
    .lib = {
        {"CUDA runtime", "ASYNCDIFF_CUDART_LIBRARY", cudart_names, cudart_wheel_files, NULL,
         NULL, ""},
        {"NCCL", "ASYNCDIFF_NCCL_LIBRARY", nccl_names, nccl_wheel_files, NULL, NULL, ""},
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

void ad_gpu_search_dirs(const char *const *dirs, size_t n)
{
    pthread_mutex_lock(&g.lock);
    for (size_t i = 0; i < g.ndirs; i++)
        free(g.dirs[i]);
    g.ndirs = 0;
    for (size_t i = 0; dirs != NULL && i < n && g.ndirs < MAX_DIRS; i++)
        if (dirs[i] != NULL && dirs[i][0] == '/') {
            char *copy = strdup(dirs[i]);
            if (copy != NULL)
                g.dirs[g.ndirs++] = copy;
        }
    pthread_mutex_unlock(&g.lock);
}

/* The folder above the one holding this code's shared object: site-packages
 * when asyncdiff is installed there.  "" when unknown. */
static void module_site_dir(char *out, size_t n)
{
    Dl_info info;
    char *slash;
    out[0] = '\0';
    if (dladdr(&g, &info) == 0 || info.dli_fname == NULL || info.dli_fname[0] != '/')
        return;
    set_text(out, n, "%s", info.dli_fname);
    for (int up = 0; up < 2; up++) {
        slash = strrchr(out, '/');
        if (slash == NULL || slash == out) {
            out[0] = '\0';
            return;
        }
        *slash = '\0';
    }
}

/* dlopen one file if it exists; on success the library is found `how`. */
static int try_file(lib_info *lib, const char *file, const char *how, char *tried, size_t n)
{
    void *h;
    if (access(file, F_OK) != 0)
        return 0;
    h = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        append(tried, n, "; %s", last_dlerror());
        return 0;
    }
    lib->handle = h;
    lib->how = how;
    set_text(lib->path, sizeof lib->path, "%s", file);
    return 1;
}

/* Find one library (the order of gpu.h).  Fills lib->handle, or `problem`. */
static void open_library(lib_info *lib, char *const *dirs, size_t ndirs, char *problem,
                         size_t n)
{
    const char *env = getenv(lib->env);
    const char *home = getenv("CUDA_HOME");
    char file[PATH_BYTES];
    char tried[512] = "";

    /* 1. A copy the process already has (torch's).  RTLD_NOLOAD never loads
     *    anything; it only hands back a reference to a loaded object. */
    for (const char *const *name = lib->names; *name != NULL; name++) {
        lib->handle = dlopen(*name, RTLD_LAZY | RTLD_NOLOAD);
        if (lib->handle != NULL) {
            lib->how = (env != NULL && env[0] != '\0')
                           ? "already loaded by the process; the environment variable is "
                             "ignored so that the process keeps a single copy"
                           : "already loaded by the process";
            set_text(lib->path, sizeof lib->path, "%s", *name);
            return;
        }
    }
    (void)dlerror(); /* forget the NOLOAD misses */

    /* 2. The file the user named.  No fallback when it fails: a silent
     *    switch to another copy would be harder to debug than the error. */
    if (env != NULL && env[0] != '\0') {
        lib->handle = dlopen(env, RTLD_NOW | RTLD_LOCAL);
        if (lib->handle == NULL) {
            set_text(problem, n, "%s=%s cannot be opened: %s", lib->env, env, last_dlerror());
            return;
        }
        lib->how = lib->env;
        set_text(lib->path, sizeof lib->path, "%s", env);
        return;
    }

    /* 3. The pip wheels under the Python search folders. */
    for (size_t d = 0; d < ndirs; d++)
        for (const char *const *rel = lib->wheel_files; *rel != NULL; rel++) {
            set_text(file, sizeof file, "%s/%s", dirs[d], *rel);
            if (try_file(lib, file, "pip wheel on the Python path", tried, sizeof tried))
                return;
        }

    /* 4. The CUDA toolkit the user pointed at. */
    if (home == NULL || home[0] == '\0')
        home = getenv("CUDA_PATH");
    if (home != NULL && home[0] != '\0')
        for (const char *const *name = lib->names; *name != NULL; name++) {
            set_text(file, sizeof file, "%s/lib64/%s", home, *name);
            if (try_file(lib, file, "CUDA_HOME", tried, sizeof tried))
                return;
        }

    /* 5. The sonames, through the usual search path. */
    for (const char *const *name = lib->names; *name != NULL; name++) {
        lib->handle = dlopen(*name, RTLD_NOW | RTLD_LOCAL);
        if (lib->handle != NULL) {
            lib->how = "found by the dynamic linker";
            set_text(lib->path, sizeof lib->path, "%s", *name);
            return;
        }
        (void)dlerror();
    }
    set_text(problem, n,
             "%s library not found (not loaded by this process, %s not set, no %s under the "
             "%zu Python search folder%s, %s, dlopen failed for %s%s%s)",
             lib->what, lib->env, lib->wheel_files[0], ndirs, ndirs == 1 ? "" : "s",
             home != NULL && home[0] != '\0' ? "not in $CUDA_HOME/lib64" : "CUDA_HOME not set",
             lib->names[0], lib->names[1] != NULL ? ", ..." : "", tried);
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

/* Why cudaGetDeviceCount failed, in words: without a driver the runtime
 * says "insufficient driver", which hides that there is none at all. */
static void device_problem(const ad_gpu_api *api, ad_cuda_error e, char *problem, size_t n)
{
    const char *text = api->cudaGetErrorString(e);
    if (e == AD_CUDA_ERROR_INSUFFICIENT_DRIVER) {
        void *driver = dlopen(AD_CUDA_DRIVER_SONAME, RTLD_LAZY | RTLD_NOLOAD);
        if (driver == NULL)
            driver = dlopen(AD_CUDA_DRIVER_SONAME, RTLD_LAZY | RTLD_LOCAL);
        (void)dlerror();
        if (driver == NULL) {
            set_text(problem, n,
                     "no usable CUDA device: no NVIDIA driver (%s) found (cudaGetDeviceCount: "
                     "CUDA error %d)",
                     AD_CUDA_DRIVER_SONAME, e);
            return;
        }
        dlclose(driver);
        set_text(problem, n,
                 "no usable CUDA device: the NVIDIA driver supports CUDA %d.%d, older than the "
                 "CUDA runtime %d.%d (cudaGetDeviceCount: %s, CUDA error %d)",
                 api->driver_version / 1000, (api->driver_version % 1000) / 10,
                 api->cudart_version / 1000, (api->cudart_version % 1000) / 10,
                 text != NULL ? text : "?", e);
        return;
    }
    set_text(problem, n, "no usable CUDA device: cudaGetDeviceCount failed: %s (CUDA error %d)",
             text != NULL ? text : "?", e);
}

/* "NCCL 2.21.5 from FILE (HOW)" / "CUDA runtime 12.4 from FILE (HOW)". */
static void describe_library(const ad_gpu_api *api, int i, char *buf, size_t n)
{
    const lib_info *lib = &g.lib[i];
    char version[32] = "";
    if (i == LIB_NCCL && api->nccl_version > 0)
        ad_nccl_version_string(api->nccl_version, version, sizeof version);
    else if (i == LIB_CUDART && api->cudart_version > 0)
        set_text(version, sizeof version, "%d.%d", api->cudart_version / 1000,
                 (api->cudart_version % 1000) / 10);
    append(buf, n, "%s%s%s from %s (%s)", lib->what, version[0] ? " " : "", version, lib->path,
           lib->how);
}

/* One load attempt (g.lock held).  Libraries found by an earlier attempt
 * are kept; the rest are looked for again. */
static void attempt(void)
{
    ad_gpu_api api;
    char problem[LIB_COUNT][640] = {"", ""};
    char missing[LIB_COUNT][384] = {"", ""};
    char site[PATH_BYTES];
    char *dirs[MAX_DIRS + 1];
    size_t ndirs = 0;
    int devices = 0;

    memset(&api, 0, sizeof api);
    for (size_t i = 0; i < g.ndirs; i++)
        dirs[ndirs++] = g.dirs[i];
    module_site_dir(site, sizeof site);
    if (site[0] != '\0')
        dirs[ndirs++] = site;
    for (int i = 0; i < LIB_COUNT; i++)
        if (g.lib[i].handle == NULL)
            open_library(&g.lib[i], dirs, ndirs, problem[i], sizeof problem[i]);

    /* Resolve every table entry of each library that was found.  (dlsym
     * also resolves the weak symbols NCCL's wheels export.) */
#define AD_GPU_RESOLVE(which, required, ret, name, params)                            \
    if (g.lib[AD_LIB_##which].handle != NULL) {                                       \
        *(void **)(&api.name) = dlsym(g.lib[AD_LIB_##which].handle, #name);           \
        if (api.name == NULL && (required))                                         \
            append(missing[AD_LIB_##which], sizeof missing[0], "%s%s",                \
                   missing[AD_LIB_##which][0] ? ", " : "", #name);                    \
    }
    AD_GPU_FUNCTIONS(AD_GPU_RESOLVE)
#undef AD_GPU_RESOLVE

    /* A library without what we need is let go (none of it was called), so
     * that a later attempt may find a better copy. */
    for (int i = 0; i < LIB_COUNT; i++) {
        lib_info *lib = &g.lib[i];
        if (lib->handle != NULL && missing[i][0] != '\0') {
            set_text(problem[i], sizeof problem[i], "%s library %s lacks required symbol(s): %s",
                     lib->what, lib->path, missing[i]);
            dlclose(lib->handle);
            lib->handle = NULL;
        }
    }
    if (g.lib[LIB_NCCL].handle != NULL) {
        ad_nccl_result r;
        locate(&g.lib[LIB_NCCL], *(void **)&api.ncclGetVersion);
        r = api.ncclGetVersion(&api.nccl_version);
        if (r != AD_NCCL_SUCCESS)
            set_text(problem[LIB_NCCL], sizeof problem[LIB_NCCL],
                     "ncclGetVersion failed (NCCL error %d)", r);
    }
    if (g.lib[LIB_CUDART].handle != NULL) {
        ad_cuda_error e;
        locate(&g.lib[LIB_CUDART], *(void **)&api.cudaGetDeviceCount);
        (void)api.cudaRuntimeGetVersion(&api.cudart_version);
        (void)api.cudaDriverGetVersion(&api.driver_version);
        e = api.cudaGetDeviceCount(&devices);
        if (e != AD_CUDA_SUCCESS) {
            device_problem(&api, e, problem[LIB_CUDART], sizeof problem[LIB_CUDART]);
            devices = 0;
        } else if (devices < 1) {
            const char *visible = getenv("CUDA_VISIBLE_DEVICES");
            set_text(problem[LIB_CUDART], sizeof problem[LIB_CUDART],
                     "no CUDA device visible to this process (CUDA_VISIBLE_DEVICES=%s)",
                     visible != NULL ? visible : "<unset>");
        }
        api.device_count = devices;
    }

    g.tried = 1;
    if (problem[LIB_NCCL][0] == '\0' && problem[LIB_CUDART][0] == '\0') {
        g.message[0] = '\0';
        describe_library(&api, LIB_NCCL, g.message, sizeof g.message);
        append(g.message, sizeof g.message, "; ");
        describe_library(&api, LIB_CUDART, g.message, sizeof g.message);
        append(g.message, sizeof g.message, "; %d CUDA device%s", devices, devices == 1 ? "" : "s");
        g.api = api;
        g.status = AD_OK;
        atomic_store_explicit(&g.loaded, 1, memory_order_release);
        return;
    }
    /* NCCL's problem first (it is what the user asked about), then what was
     * found: which copy, which version, even when it cannot be used. */
    g.status = AD_EUNSUPPORTED;
    set_text(g.message, sizeof g.message, "NCCL transport unavailable: ");
    for (int i = LIB_COUNT - 1, first = 1; i >= 0; i--)
        if (problem[i][0] != '\0') {
            append(g.message, sizeof g.message, "%s%s", first ? "" : "; ", problem[i]);
            first = 0;
        }
    for (int i = LIB_COUNT - 1; i >= 0; i--)
        if (g.lib[i].handle != NULL) {
            append(g.message, sizeof g.message, "; ");
            describe_library(&api, i, g.message, sizeof g.message);
        }
}

ad_status ad_gpu_load(ad_err *err)
{
    ad_status st;
    if (atomic_load_explicit(&g.loaded, memory_order_acquire))
        return AD_OK;
    pthread_mutex_lock(&g.lock);
    if (!atomic_load_explicit(&g.loaded, memory_order_relaxed))
        attempt();
    st = g.status;
    if (st != AD_OK)
        ad_err_set(err, st, NULL, "%s", g.message);
    pthread_mutex_unlock(&g.lock);
    return st;
}

const ad_gpu_api *ad_gpu_get(void)
{
    if (ad_gpu_load(NULL) != AD_OK)
        return NULL;
    return &g.api;
}

const ad_gpu_api *ad_gpu_loaded(void)
{
    return atomic_load_explicit(&g.loaded, memory_order_acquire) ? &g.api : NULL;
}

const char *ad_gpu_describe(char *buf, size_t n)
{
    if (n == 0)
        return buf;
    pthread_mutex_lock(&g.lock);
    if (!g.tried)
        attempt();
    snprintf(buf, n, "%s", g.message);
    pthread_mutex_unlock(&g.lock);
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
    return ad_err_set(err,
                      code == AD_NCCL_REMOTE_ERROR ? AD_EPEERGONE
                      : code == AD_NCCL_TIMEOUT    ? AD_ETIMEDOUT
                                                   : AD_EEXTERNAL,
                      NULL,
                      "%s:%d: %s failed: %s (NCCL error %d)%s%s", file, line, call,
                      text != NULL ? text : "unknown error", code,
                      (detail != NULL && detail[0] != '\0') ? ": " : "",
                      (detail != NULL) ? detail : "");
}
