/*
 * schedule.h -- what each rank does at each denoiser call (SPEC section 3).
 *
 * Pure C (no Python.h); returns ad_status, fills ad_err (status.h).
 *
 * Notation: N = model_n components, S = stride (1 or 2), W = warm_up (>= 1),
 * L = steps (number of denoiser calls in one pipeline call), ts = time_shift,
 * M = N + S - 1 ranks.  Rank r < N owns component r; with S = 2 rank N is the
 * extra rank.  k is the 0-based index of the denoiser call.
 */
#ifndef ASYNCDIFF_SCHEDULE_H
#define ASYNCDIFF_SCHEDULE_H

#include "status.h"

typedef struct {
    int warmup;            /* 1 if k < W */
    int sync;              /* before the forward, replace every cached block
                              output by its owner's */
    int compute_all;       /* 1: this rank computes every block (warm-up) */
    int compute_component; /* component this rank computes in the async
                              phase, -1 none */
    int store;             /* store outputs of the blocks computed now as
                              cached outputs */
    int publish;           /* this rank's stored outputs of its OWN
                              component's blocks are read by other ranks at a
                              later sync */
    int exchange;          /* same on all ranks: this call has a transport
                              event (someone publishes, or a result is
                              exchanged) */
    long timestep_index;   /* index into T for the denoiser's timestep
                              argument */
    int result_rank;       /* rank whose denoiser output replaces every rank's
                              output; -1 none */
} ad_plan;

/*
 * Check a configuration.  Names the offending argument: "model_n" (>= 1),
 * "stride" (1 or 2), "warm_up" (>= 1), "time_shift" (0 or 1), "steps" (>= 1).
 */
ad_status ad_schedule_validate(int n, int stride, int warm_up, int time_shift,
                               long steps, ad_err *err);

/* World size M = n + stride - 1 of a valid configuration. */
static inline int ad_schedule_world_size(int n, int stride)
{
    return n + stride - 1;
}

/*
 * The plan of rank `rank` (0 <= rank < M, else "rank") for denoiser call `k`
 * (0 <= k < steps, else "k").  Validates the configuration as above.
 * Constant time, no allocation.
 */
ad_status ad_schedule_plan(int n, int stride, int warm_up, int time_shift,
                           long steps, int rank, long k, ad_plan *out,
                           ad_err *err);

#endif /* ASYNCDIFF_SCHEDULE_H */
