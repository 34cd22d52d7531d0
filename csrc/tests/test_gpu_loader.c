/*
 * test_gpu_loader.c -- checks csrc/gpu.c and csrc/nccl.c without a GPU,
 * against the stand-in libraries fake_cudart.c and fake_nccl.c
 * (tests/test_nccl.py builds all three):
 *
 *   cc -I csrc test_gpu_loader.c test_nccl_transport.c gpu_test.c check.c \
 *      ../gpu.c ../nccl.c -ldl -pthread -o test_gpu_loader
 *   test_gpu_loader libfakecudart.so libfakenccl.so
 *
 * This file: main, which runs every scenario in a forked child, and the
 * scenarios of loading the libraries.  The stand-ins export counters
 * (fake_gpu.h) that the scenarios read to check what the transport did:
 * which stream carried the transfers, that streams and events are all
 * destroyed again, that the caller's device is restored, that an error
 * aborts the communicator.
 */
#define _GNU_SOURCE

#include "gpu_test.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

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
    /* what was found is named with its version and file */
    CHECK_MSG(strstr(text, "CUDA runtime 12.4 from ") != NULL, text);
    CHECK_MSG(strstr(text, "libfakecudart") != NULL, text);
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

static void t_no_driver(void)
{
    /* what the real runtime says without a driver (cudaErrorInsufficientDriver):
     * the message must say that there is no driver, if there is none */
    ad_err err = {0};
    char text[1536];
    void *driver = dlopen(AD_CUDA_DRIVER_SONAME, RTLD_LAZY);
    use_fakes();
    setenv("FAKE_CUDA_DEVICES", "nodriver", 1);
    setenv("FAKE_NCCL_VERSION", "23206", 1);
    CHECK(ad_gpu_load(&err) == AD_EUNSUPPORTED);
    if (driver == NULL)
        CHECK_MSG(strstr(err.msg, "no NVIDIA driver (libcuda.so.1) found") != NULL, err.msg);
    else
        CHECK_MSG(strstr(err.msg, "older than the CUDA runtime 12.4") != NULL, err.msg);
    CHECK_MSG(strstr(err.msg, "insufficient") == NULL || driver != NULL, err.msg);
    /* the NCCL version that was read is not dropped */
    ad_gpu_describe(text, sizeof text);
    CHECK_MSG(strstr(text, "NCCL 2.32.6 from ") != NULL, text);
    CHECK_MSG(strstr(text, "libfakenccl") != NULL, text);
    CHECK(ad_gpu_get() == NULL);
}

static void t_failure_not_cached(void)
{
    /* a failed load is tried again: the library may be there later */
    ad_err err = {0};
    char text[1536];
    setenv("ASYNCDIFF_CUDART_LIBRARY", fake_cudart, 1);
    setenv("ASYNCDIFF_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
    CHECK(ad_gpu_load(&err) == AD_EUNSUPPORTED);
    setenv("ASYNCDIFF_NCCL_LIBRARY", fake_nccl, 1);
    CHECK_MSG(ad_gpu_load(&err) == AD_OK, err.msg);
    ad_gpu_describe(text, sizeof text);
    CHECK_MSG(strncmp(text, "NCCL 2.21.5 from ", 17) == 0, text);
    CHECK(ad_gpu_get() != NULL && ad_gpu_get()->device_count == 1);
    /* a success is kept: a broken variable no longer matters */
    setenv("ASYNCDIFF_NCCL_LIBRARY", "/nonexistent/libnccl.so.2", 1);
    CHECK(ad_gpu_load(&err) == AD_OK);
}

/* Make DIR/REL a symbolic link to TARGET, creating the folders. */
static int link_into(const char *dir, const char *rel, const char *target)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    for (char *p = path + strlen(dir) + 1; *p != '\0'; p++)
        if (*p == '/') {
            *p = '\0';
            (void)mkdir(path, 0700);
            *p = '/';
        }
    return symlink(target, path);
}

static void t_pip_wheel_folders(void)
{
    /* the layout of nvidia-nccl-cu13 / nvidia-cuda-runtime under a sys.path
     * folder; the variables unset, so only the folders can find them */
    ad_err err = {0};
    char dir[] = "/tmp/asyncdiff-wheels-XXXXXX", text[1536], expect[1200];
    const char *dirs[2] = {"relative/is/skipped", dir};
    unsetenv("ASYNCDIFF_CUDART_LIBRARY");
    unsetenv("ASYNCDIFF_NCCL_LIBRARY");
    unsetenv("CUDA_HOME");
    unsetenv("CUDA_PATH");
    if (!CHECK(mkdtemp(dir) != NULL))
        return;
    CHECK(link_into(dir, "nvidia/nccl/lib/libnccl.so.2", fake_nccl) == 0);
    CHECK(link_into(dir, "nvidia/cu13/lib/libcudart.so.13", fake_cudart) == 0);
    ad_gpu_search_dirs(dirs, 2);
    CHECK_MSG(ad_gpu_load(&err) == AD_OK, err.msg);
    ad_gpu_describe(text, sizeof text);
    snprintf(expect, sizeof expect,
             "NCCL 2.21.5 from %s/nvidia/nccl/lib/libnccl.so.2 (pip wheel on the Python path); "
             "CUDA runtime 12.4 from %s/nvidia/cu13/lib/libcudart.so.13 (pip wheel on the "
             "Python path); 1 CUDA device",
             dir, dir);
    CHECK_MSG(strcmp(text, expect) == 0, text);
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
    CHECK_MSG(strstr(text, "NCCL 2.18.3 from ") != NULL, text);
    CHECK_MSG(strstr(text, "(ASYNCDIFF_NCCL_LIBRARY)") != NULL, text);
    CHECK_MSG(strstr(text, "CUDA runtime 12.4 from ") != NULL, text);
    {
        char v[32];
        CHECK(strcmp(ad_nccl_version_string(22105, v, sizeof v), "2.21.5") == 0);
        CHECK(strcmp(ad_nccl_version_string(2708, v, sizeof v), "2.7.8") == 0);
    }
}

struct scenario {
    const char *name;
    void (*fn)(void);
};

static const struct scenario scenarios[] = {
    {"library not found", t_library_not_found},
    {"missing symbols", t_missing_symbols},
    {"no device", t_no_device},
    {"device count fails", t_device_count_fails},
    {"no driver", t_no_driver},
    {"a failed load is not cached", t_failure_not_cached},
    {"pip wheel folders", t_pip_wheel_folders},
    {"already loaded copy wins", t_already_loaded_wins},
    {"library from the environment", t_env_library},
    {"argument checks", t_argument_checks},
    {"exchange item checks on random items", t_check_items_random},
    {"self exchange (non-blocking NCCL)", t_self_exchange},
    {"unique id round trip", t_unique_id_roundtrip},
    {"exchange with peers", t_peers},
    {"blocking NCCL (< 2.14)", t_blocking_nccl},
    {"device switch", t_device_switch},
    {"init timeout aborts", t_init_timeout},
    {"group launch timeout aborts", t_group_timeout},
    {"async error aborts", t_async_error},
    {"NCCL timeout is a timeout", t_async_timeout},
    {"two ranks on one GPU: the error says so", t_shared_gpu_refused},
    {"GPU hang seen at the next exchange", t_gpu_hang},
    {"wait timeout aborts", t_wait_timeout},
    {"graceful destroy falls back to abort", t_graceful_destroy_falls_back_to_abort},
    {"failed send/recv still closes the group", t_op_failure_closes_group},
    {"destroy with abort", t_abort_destroy},
};

int main(int argc, char **argv)
{
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
            check_reset();
            scenarios[i].fn();
            fflush(stderr);
            exit(check_failed == 0 ? 0 : 1); /* exit, not _exit: LeakSanitizer runs at exit */
        }
        if (waitpid(pid, &status, 0) < 0) {
            perror("waitpid");
            return 2;
        }
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            check_report(scenarios[i].name, 1, NULL);
        } else {
            char how[32];
            snprintf(how, sizeof how, "%s %d", WIFEXITED(status) ? "exit" : "signal",
                     WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            check_report(scenarios[i].name, 0, how);
        }
    }
    return check_summary();
}
