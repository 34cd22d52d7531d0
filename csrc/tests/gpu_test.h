/*
 * gpu_test.h -- what the files of the test_gpu_loader program share.
 *
 * The program tests csrc/gpu.c and csrc/nccl.c against the stand-in
 * libraries (fake_cudart.c, fake_nccl.c).  Run as
 * `test_gpu_loader FAKE_CUDART FAKE_NCCL`; every scenario runs in a forked
 * child (the libraries load once per process) and the program ends with
 * "N passed, M failed".  test_gpu_loader.c has main and the loading
 * scenarios, test_nccl_transport.c the transport's.
 */
#ifndef ASYNCDIFF_TESTS_GPU_TEST_H
#define ASYNCDIFF_TESTS_GPU_TEST_H

#include "check.h"
#include "fake_gpu.h"
#include "gpu.h"
#include "nccl.h"

/* The stand-in libraries' paths (the program's arguments). */
extern const char *fake_cudart, *fake_nccl;

/* The stand-ins' counters (a failed check when they cannot be read). */
void cuda_stats(struct fake_cuda_stats *out);
void nccl_stats(struct fake_nccl_stats *out);

/* Point ASYNCDIFF_CUDART_LIBRARY / ASYNCDIFF_NCCL_LIBRARY at the stand-ins. */
void use_fakes(void);

/* A fresh handle of world `world` on `device` through the stand-ins; the
 * status in *st_out (may be NULL). */
ad_nccl *open_handle(int world, int rank, int device, double timeout, ad_status *st_out,
                     ad_err *err);

/* The transport's scenarios (test_nccl_transport.c). */
void t_argument_checks(void);
void t_check_items_random(void);
void t_self_exchange(void);
void t_unique_id_roundtrip(void);
void t_peers(void);
void t_blocking_nccl(void);
void t_device_switch(void);
void t_init_timeout(void);
void t_group_timeout(void);
void t_async_error(void);
void t_async_timeout(void);
void t_shared_gpu_refused(void);
void t_gpu_hang(void);
void t_wait_timeout(void);
void t_graceful_destroy_falls_back_to_abort(void);
void t_op_failure_closes_group(void);
void t_abort_destroy(void);

#endif /* ASYNCDIFF_TESTS_GPU_TEST_H */
