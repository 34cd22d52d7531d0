/*
 * schedule.h -- what each rank does at each denoiser call (docs/design.md §3),
 * and what each rank receives at the events where owners' outputs move.
 *
 * Pure C (no Python.h); returns ad_status, fills ad_err (status.h).
 *
 * Notation: N = model_n components, S = stride (1 or 2), W = warm_up (>= 1),
 * L = steps (number of denoiser calls in one pipeline call), ts = time_shift,
 * M = N + S - 1 ranks.  Rank r < N owns component r; with S = 2 rank N is the
 * extra rank.  k is the 0-based index of the denoiser call.
 *
 * This file is the one place that knows the schedule: a caller asks it
 * rather than re-deriving any rule (who computes what, when outputs move,
 * where the result comes from).
 */
#ifndef ASYNCDIFF_SCHEDULE_H
#define ASYNCDIFF_SCHEDULE_H

#include <stddef.h>
#include <stdint.h>

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
    int receive;           /* same on all ranks: at this call's transport
                              event the owners' stored outputs are delivered
                              to the ranks that read them (some rank r < N
                              publishes) */
    int result_cached;     /* same on all ranks: this call's denoiser output
                              is the replayed final block's cached output
                              (stride 2 sync calls, k >= W and k even) */
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
 * Check a rank: 0 <= rank < M, else AD_EINVAL naming "rank".  The
 * configuration (n, stride) must be valid.
 */
ad_status ad_schedule_check_rank(int n, int stride, int rank, ad_err *err);

/*
 * The component rank `rank` computes in the asynchronous phase: rank r < N
 * computes component r; with stride 2 the extra rank N computes component
 * N-1 (the one that holds the final block).  -1 when rank is not in
 * [0, M) or the configuration is not valid.
 */
int ad_schedule_component_of(int n, int stride, int rank);

/*
 * The plan of rank `rank` (0 <= rank < M, else "rank") for denoiser call `k`
 * (0 <= k < steps, else "k").  Validates the configuration as above.
 * Constant time, no allocation.
 */
ad_status ad_schedule_plan(int n, int stride, int warm_up, int time_shift,
                           long steps, int rank, long k, ad_plan *out,
                           ad_err *err);

/*
 * What each rank must receive at the events where owners' outputs are
 * delivered (plan.receive), for a model cut into `units` units:
 *
 *   owner      units values: the component in [0, n) that owns unit u;
 *              every component owns at least one unit         ("owner")
 *   reads      a reads_rows x reads_cols matrix (row-major) of 0/1 that must
 *              be units x units: reads[u * units + v] = 1 when unit v's
 *              output reaches unit u's input through glue code ("reads")
 *   final      the unit whose output is the denoiser output, owned by
 *              component n-1                                  ("final")
 *   out        M * units bytes (M = n + stride - 1): out[r * units + u] is
 *              set to 1 when rank r receives unit u, else 0   ("out")
 *
 * The rule, for each rank r with c = ad_schedule_component_of(n, stride, r):
 * the units read by the units of component c, less component c's own
 * units; with stride 2 (where sync calls replay the final block) also the
 * final unit; less the units rank r owns (those of component r for r < N,
 * none for the extra rank).  Independent of warm_up, time_shift and steps.
 * Time O(M * units^2) at worst, no allocation.
 */
ad_status ad_schedule_receives(int n, int stride, const int32_t *owner, size_t units,
                               const unsigned char *reads, size_t reads_rows,
                               size_t reads_cols, long final, unsigned char *out,
                               ad_err *err);

#endif /* ASYNCDIFF_SCHEDULE_H */
