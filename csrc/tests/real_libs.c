/*
 * real_libs.c -- csrc/gpu.c against the REAL CUDA runtime and NCCL of the
 * pip wheels, on any machine (tests/test_abi.py builds and runs it):
 *
 *   cc -I csrc real_libs.c check.c ../gpu.c -ldl -pthread -o real_libs
 *   real_libs SITE_PACKAGES NCCL_VERSION_CODE
 *
 * 1. The loader finds the wheels under SITE_PACKAGES (as the binding does
 *    with sys.path) and names each library's file and version; without a
 *    GPU it refuses with the reason (no driver, no device).
 * 2. The same files, resolved through gpu.h's table into ad_gpu_api (our
 *    declared types), are called wherever the result needs no GPU: versions,
 *    error strings, a unique id, the argument checks NCCL makes on a NULL
 *    communicator, the device count.  Their answers must be the documented
 *    ones, which they can only be if our declarations match the ABI.
 * Ends with check.c's "N passed, M failed" line.
 */
#define _GNU_SOURCE

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "gpu.h"

static int called;

/* Resolve every entry of one library of the table from `file`. */
static void resolve(ad_gpu_api *t, const char *file, int nccl)
{
    void *h = dlopen(file, RTLD_NOW | RTLD_NOLOAD); /* the loader's copy */
    if (!CHECK_MSG(h != NULL, file))
        return;
#define RESOLVE(lib, required, ret, name, params)                                      \
    if (nccl == (strcmp(#lib, "NCCL") == 0)) {                                         \
        *(void **)&t->name = dlsym(h, #name);                                          \
        CHECK_MSG(t->name != NULL || !(required), #name);                              \
    }
    AD_GPU_FUNCTIONS(RESOLVE)
#undef RESOLVE
}

static void nccl_without_gpu(ad_gpu_api *t, int expect_version)
{
    ad_nccl_id id;
    ad_nccl_result state = AD_NCCL_SUCCESS;
    ad_err err = {0};
    char buf[16] = {0};
    const char *text;
    int version = 0, nonzero = 0;

    CHECK(t->ncclGetVersion(&version) == AD_NCCL_SUCCESS);
    CHECK_MSG(version == expect_version, "ncclGetVersion differs from the wheel's nccl.h");
    for (int code = 1; code <= AD_NCCL_IN_PROGRESS; code++) {
        text = t->ncclGetErrorString(code);
        CHECK(text != NULL && text[0] != '\0' && strcmp(text, t->ncclGetErrorString(0)) != 0);
    }
    text = t->ncclGetErrorString(AD_NCCL_INVALID_USAGE);
    CHECK_MSG(strstr(text, "invalid usage") != NULL, text);
    text = t->ncclGetErrorString(AD_NCCL_REMOTE_ERROR);
    CHECK_MSG(strstr(text, "remote") != NULL, text);
    if (version >= AD_NCCL_VERSION_CODE(2, 30, 0)) {
        text = t->ncclGetErrorString(AD_NCCL_TIMEOUT);
        CHECK_MSG(strstr(text, "timeout") != NULL, text);
    }
    called += 2;

    /* How gpu.c turns the codes into statuses, with the real texts. */
    CHECK(ad_nccl_status(t, NULL, AD_NCCL_REMOTE_ERROR, "x", "f", 1, &err) == AD_EPEERGONE);
    CHECK(ad_nccl_status(t, NULL, AD_NCCL_TIMEOUT, "x", "f", 1, &err) == AD_ETIMEDOUT);
    CHECK(ad_nccl_status(t, NULL, AD_NCCL_INVALID_USAGE, "call()", "f.c", 7, &err) == AD_EEXTERNAL);
    CHECK_MSG(strstr(err.msg, "f.c:7: call() failed: invalid usage") != NULL, err.msg);

    /* A unique id needs no GPU (a socket of the bootstrap). */
    memset(&id, 0, sizeof id);
    CHECK(t->ncclGetUniqueId(&id) == AD_NCCL_SUCCESS);
    for (size_t i = 0; i < sizeof id.internal; i++)
        nonzero |= id.internal[i] != 0;
    CHECK(nonzero);

    /* NCCL's own checks of a NULL communicator, and its last-error text. */
    CHECK(t->ncclCommGetAsyncError(NULL, &state) == AD_NCCL_INVALID_ARGUMENT);
    if (t->ncclGetLastError != NULL) {
        text = t->ncclGetLastError(NULL);
        CHECK_MSG(text != NULL && strstr(text, "NULL") != NULL, text);
        called++;
    }
    CHECK(t->ncclCommDestroy(NULL) == AD_NCCL_SUCCESS);
    CHECK(t->ncclCommAbort(NULL) == AD_NCCL_SUCCESS);
    CHECK(t->ncclGroupStart() == AD_NCCL_SUCCESS);
    CHECK(t->ncclSend(buf, sizeof buf, AD_NCCL_UINT8, 0, NULL, NULL) == AD_NCCL_INVALID_ARGUMENT);
    CHECK(t->ncclRecv(buf, sizeof buf, AD_NCCL_UINT8, 0, NULL, NULL) == AD_NCCL_INVALID_ARGUMENT);
    (void)t->ncclGroupEnd(); /* closes the group; the result carries the errors above */
    called += 8;
}

static void cudart_without_gpu(ad_gpu_api *t, int have_device)
{
    int runtime = 0, driver = -1, count = -1;
    ad_cuda_error e;
    CHECK(t->cudaRuntimeGetVersion(&runtime) == AD_CUDA_SUCCESS && runtime >= 11000);
    CHECK(t->cudaDriverGetVersion(&driver) == AD_CUDA_SUCCESS && driver >= 0);
    e = t->cudaGetDeviceCount(&count);
    if (have_device) {
        CHECK(e == AD_CUDA_SUCCESS && count >= 1);
    } else {
        const char *text = t->cudaGetErrorString(e);
        CHECK_MSG(e != AD_CUDA_SUCCESS || count == 0, "a device without a usable one?");
        CHECK(text != NULL && text[0] != '\0');
        if (driver == 0) /* no driver at all: what the runtime answers then */
            CHECK(e == AD_CUDA_ERROR_INSUFFICIENT_DRIVER);
    }
    called += 4;
    printf("CUDA runtime %d, driver %d, cudaGetDeviceCount: error %d, %d device(s)\n", runtime,
           driver, e, count);
}

int main(int argc, char **argv)
{
    ad_gpu_api t;
    ad_err err = {0};
    char text[2048], nccl_file[1024], cudart_file[1024];
    const char *dirs[1];
    ad_status st;

    if (argc != 3) {
        fprintf(stderr, "usage: %s SITE_PACKAGES NCCL_VERSION_CODE\n", argv[0]);
        return 2;
    }
    unsetenv("ASYNCDIFF_NCCL_LIBRARY");
    unsetenv("ASYNCDIFF_CUDART_LIBRARY");
    dirs[0] = argv[1];
    ad_gpu_search_dirs(dirs, 1);
    st = ad_gpu_load(&err);
    ad_gpu_describe(text, sizeof text);
    printf("gpu_status: %s\n", text);
    snprintf(nccl_file, sizeof nccl_file, "%s/nvidia/nccl/lib/libnccl.so.2", argv[1]);
    CHECK_MSG(strstr(text, nccl_file) != NULL, text);
    CHECK_MSG(strstr(text, "(pip wheel on the Python path)") != NULL, text);
    if (st != AD_OK) {
        CHECK_MSG(st == AD_EUNSUPPORTED && strstr(err.msg, "no usable CUDA device") != NULL,
                  err.msg);
        if (dlopen(AD_CUDA_DRIVER_SONAME, RTLD_LAZY) == NULL)
            CHECK_MSG(strstr(text, "no NVIDIA driver (libcuda.so.1) found") != NULL, text);
    }
    /* the CUDA runtime's file, as the loader names it */
    {
        const char *at = strstr(text, "CUDA runtime ");
        const char *from = at != NULL ? strstr(at, " from ") : NULL;
        size_t len = from != NULL ? strcspn(from + 6, " ") : 0;
        if (CHECK_MSG(from != NULL && len > 0 && len < sizeof cudart_file, text)) {
            memcpy(cudart_file, from + 6, len);
            cudart_file[len] = '\0';
        } else {
            return check_summary();
        }
    }
    memset(&t, 0, sizeof t);
    resolve(&t, nccl_file, 1);
    resolve(&t, cudart_file, 0);
    if (t.ncclGetVersion != NULL && t.ncclSend != NULL)
        nccl_without_gpu(&t, atoi(argv[2]));
    if (t.cudaGetDeviceCount != NULL)
        cudart_without_gpu(&t, st == AD_OK);
    printf("%d of the table's entry points called\n", called);
    return check_summary();
}
