/*
 * fake_gpu.h -- what the stand-in CUDA runtime (fake_cudart.c) and NCCL
 * (fake_nccl.c) count, read by the test program (gpu_test.c) through the
 * exported functions fake_cuda_stats() and fake_nccl_stats().
 */
#ifndef ASYNCDIFF_TESTS_FAKE_GPU_H
#define ASYNCDIFF_TESTS_FAKE_GPU_H

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
    int bad_device_calls; /* NCCL calls made while another device was current */
    int last_datatype;
    void *last_stream;
    int last_comm_device;
};

void fake_cuda_stats(struct fake_cuda_stats *out);
void fake_nccl_stats(struct fake_nccl_stats *out);

#endif /* ASYNCDIFF_TESTS_FAKE_GPU_H */
