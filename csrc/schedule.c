/*
 * schedule.c -- the per-call state machine of the asynchronous loop.
 *
 * The rules, in short (SPEC section 3):
 *
 *   warm-up, k < W      every rank computes everything; at k = W-1 everyone
 *                       stores every block output.  Those stored outputs are
 *                       "published" only if the next call exists and syncs.
 *   S = 1, k >= W       sync, then rank r computes component r with T[k-ts],
 *                       stores and (unless this is the last call) publishes;
 *                       the result comes from rank N-1.
 *   S = 2, k >= W, odd  compute call: no sync; ranks r < N compute component r
 *                       with T[k+1-ts] (T[k-ts] at the very last call), store,
 *                       publish for the next (even, syncing) call; the extra
 *                       rank N computes component N-1 with T[k-ts], stores
 *                       nothing, and its output is the result.
 *   S = 2, k >= W, even sync call: sync only; nothing computes, nothing is
 *                       exchanged; the replayed final block gives the output.
 *
 * "Call k+1 syncs": S = 1 -> k+1 >= W;  S = 2 -> k+1 >= W and k+1 even.
 */
#include "schedule.h"

#include <limits.h>

ad_status ad_schedule_validate(int n, int stride, int warm_up, int time_shift,
                               long steps, ad_err *err)
{
    if (n < 1)
        return AD_INVALID(err, "model_n", "model_n must be >= 1, got %d", n);
    if (stride != 1 && stride != 2)
        return AD_INVALID(err, "stride", "stride must be 1 or 2, got %d", stride);
    if (n > INT_MAX - (stride - 1))
        return AD_INVALID(err, "model_n", "model_n is too large (%d)", n);
    if (warm_up < 1)
        return AD_INVALID(err, "warm_up", "warm_up must be >= 1, got %d", warm_up);
    if (time_shift != 0 && time_shift != 1)
        return AD_INVALID(err, "time_shift",
                          "time_shift must be 0 or 1 (False or True), got %d",
                          time_shift);
    if (steps < 1)
        return AD_INVALID(err, "steps", "steps must be >= 1, got %ld", steps);
    return AD_OK;
}

/* Does denoiser call `k` start with a sync?  (k >= 0) */
static int call_syncs(int stride, int warm_up, long k)
{
    if (k < warm_up)
        return 0;
    return stride == 1 ? 1 : (k % 2 == 0);
}

ad_status ad_schedule_plan(int n, int stride, int warm_up, int time_shift,
                           long steps, int rank, long k, ad_plan *out,
                           ad_err *err)
{
    ad_status st = ad_schedule_validate(n, stride, warm_up, time_shift, steps, err);
    if (st != AD_OK)
        return st;
    const int world = ad_schedule_world_size(n, stride);
    if (rank < 0 || rank >= world)
        return AD_INVALID(err, "rank",
                          "rank must be in [0, %d) (model_n + stride - 1), got %d",
                          world, rank);
    if (k < 0 || k >= steps)
        return AD_INVALID(err, "k", "k must be in [0, %ld) (steps), got %ld",
                          steps, k);
    if (out == NULL)
        return AD_INVALID(err, "out", "out must not be NULL");

    const long ts = time_shift;
    /* Whether stored outputs made now will be read at the next call's sync. */
    const int next_reads = (k + 1 < steps) && call_syncs(stride, warm_up, k + 1);
    ad_plan p;

    if (k < warm_up) {
        p.warmup = 1;
        p.sync = 0;
        p.compute_all = 1;
        p.compute_component = -1;
        p.store = (k == (long)warm_up - 1);
        p.exchange = p.store && next_reads;
        p.publish = p.exchange && rank < n;
        p.timestep_index = k;
        p.result_rank = -1;
    } else if (stride == 1) {
        p.warmup = 0;
        p.sync = 1;
        p.compute_all = 0;
        p.compute_component = rank;
        p.store = 1;
        p.publish = (k + 1 < steps);
        p.exchange = 1;
        p.timestep_index = k - ts;
        p.result_rank = n - 1;
    } else if (k % 2 == 1) { /* stride 2, compute call */
        p.warmup = 0;
        p.sync = 0;
        p.compute_all = 0;
        p.exchange = 1;
        p.result_rank = n;
        if (rank < n) {
            p.compute_component = rank;
            p.store = 1;
            p.publish = (k + 1 < steps); /* k+1 is even: it syncs */
            p.timestep_index = (k == steps - 1) ? k - ts : k + 1 - ts;
        } else { /* the extra rank */
            p.compute_component = n - 1;
            p.store = 0;
            p.publish = 0;
            p.timestep_index = k - ts;
        }
    } else { /* stride 2, sync call */
        p.warmup = 0;
        p.sync = 1;
        p.compute_all = 0;
        p.compute_component = -1;
        p.store = 0;
        p.publish = 0;
        p.exchange = 0;
        p.timestep_index = k;
        p.result_rank = -1;
    }
    *out = p;
    return AD_OK;
}
