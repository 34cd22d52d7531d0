/*
 * gpu_test.c -- the shared part of the test_gpu_loader program
 * (gpu_test.h): where the stand-ins are, their counters, a handle made
 * through them.
 */
#define _GNU_SOURCE

#include "gpu_test.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

const char *fake_cudart, *fake_nccl;

void cuda_stats(struct fake_cuda_stats *out)
{
    void (*get)(struct fake_cuda_stats *) = NULL;
    void *h = dlopen(fake_cudart, RTLD_NOW | RTLD_NOLOAD);
    memset(out, 0, sizeof *out);
    if (h != NULL)
        *(void **)&get = dlsym(h, "fake_cuda_stats");
    if (CHECK_MSG(get != NULL, "the stand-in library does not export its counters"))
        get(out);
}

void nccl_stats(struct fake_nccl_stats *out)
{
    void (*get)(struct fake_nccl_stats *) = NULL;
    void *h = dlopen(fake_nccl, RTLD_NOW | RTLD_NOLOAD);
    memset(out, 0, sizeof *out);
    if (h != NULL)
        *(void **)&get = dlsym(h, "fake_nccl_stats");
    if (CHECK_MSG(get != NULL, "the stand-in library does not export its counters"))
        get(out);
}

void use_fakes(void)
{
    setenv("ASYNCDIFF_CUDART_LIBRARY", fake_cudart, 1);
    setenv("ASYNCDIFF_NCCL_LIBRARY", fake_nccl, 1);
}

/* A fresh handle of world `world` on `device` through the fakes. */
ad_nccl *open_handle(int world, int rank, int device, double timeout, ad_status *st_out,
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
