/*
 * schedule.c -- the per-call state machine of the asynchronous loop.
 *
 * The rules, in short (docs/design.md §3):
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
 *
 * receive (same on every rank): some owner publishes at this call, so the
 * call's transport event delivers owners' stored outputs.  result_cached:
 * a stride-2 sync call, whose output is the replayed final block.
 */
#include "schedule.h"

#include <limits.h>
#include <string.h>

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

ad_status ad_schedule_check_rank(int n, int stride, int rank, ad_err *err)
{
    const int world = ad_schedule_world_size(n, stride);
    if (rank < 0 || rank >= world)
        return AD_INVALID(err, "rank",
                          "rank must be in [0, %d) (model_n + stride - 1), got %d",
                          world, rank);
    return AD_OK;
}

int ad_schedule_component_of(int n, int stride, int rank)
{
    if (ad_schedule_validate(n, stride, 1, 0, 1, NULL) != AD_OK ||
        ad_schedule_check_rank(n, stride, rank, NULL) != AD_OK)
        return -1;
    return rank < n ? rank : n - 1;
}

ad_status ad_schedule_plan(int n, int stride, int warm_up, int time_shift,
                           long steps, int rank, long k, ad_plan *out,
                           ad_err *err)
{
    ad_status st = ad_schedule_validate(n, stride, warm_up, time_shift, steps, err);
    if (st != AD_OK)
        return st;
    st = ad_schedule_check_rank(n, stride, rank, err);
    if (st != AD_OK)
        return st;
    if (k < 0 || k >= steps)
        return AD_INVALID(err, "k", "k must be in [0, %ld) (steps), got %ld",
                          steps, k);
    if (out == NULL)
        return AD_INVALID(err, "out", "out must not be NULL");

    const long ts = time_shift;
    /* Whether stored outputs made now will be read at the next call's sync. */
    const int next_reads = (k + 1 < steps) && call_syncs(stride, warm_up, k + 1);
    /* Whether the owners (ranks < N) publish at this call. */
    int owners_publish;
    ad_plan p;

    if (k < warm_up) {
        p.warmup = 1;
        p.sync = 0;
        p.compute_all = 1;
        p.compute_component = -1;
        p.store = (k == (long)warm_up - 1);
        p.exchange = p.store && next_reads;
        owners_publish = p.exchange;
        p.timestep_index = k;
        p.result_rank = -1;
        p.result_cached = 0;
    } else if (stride == 1) {
        p.warmup = 0;
        p.sync = 1;
        p.compute_all = 0;
        p.compute_component = ad_schedule_component_of(n, stride, rank);
        p.store = 1;
        owners_publish = (k + 1 < steps);
        p.exchange = 1;
        p.timestep_index = k - ts;
        p.result_rank = n - 1;
        p.result_cached = 0;
    } else if (k % 2 == 1) { /* stride 2, compute call */
        p.warmup = 0;
        p.sync = 0;
        p.compute_all = 0;
        p.compute_component = ad_schedule_component_of(n, stride, rank);
        p.exchange = 1;
        p.result_rank = n;
        p.result_cached = 0;
        owners_publish = (k + 1 < steps); /* k+1 is even: it syncs */
        if (rank < n) {
            p.store = 1;
            p.timestep_index = (k == steps - 1) ? k - ts : k + 1 - ts;
        } else { /* the extra rank stores nothing */
            p.store = 0;
            p.timestep_index = k - ts;
        }
    } else { /* stride 2, sync call */
        p.warmup = 0;
        p.sync = 1;
        p.compute_all = 0;
        p.compute_component = -1;
        p.store = 0;
        owners_publish = 0;
        p.exchange = 0;
        p.timestep_index = k;
        p.result_rank = -1;
        p.result_cached = 1;
    }
    p.publish = owners_publish && rank < n;
    p.receive = owners_publish;
    *out = p;
    return AD_OK;
}

/* Check the arguments of ad_schedule_receives (see schedule.h).  `out`
 * serves as scratch for the "every component owns a unit" check. */
static ad_status check_receives(int n, int stride, const int32_t *owner, size_t units,
                                const unsigned char *reads, size_t reads_rows,
                                size_t reads_cols, long final, unsigned char *out,
                                ad_err *err)
{
    ad_status st = ad_schedule_validate(n, stride, 1, 0, 1, err);
    const size_t world = (size_t)(st == AD_OK ? ad_schedule_world_size(n, stride) : 1);
    size_t u, v;

    if (st != AD_OK)
        return st;
    if (owner == NULL)
        return AD_INVALID(err, "owner", "owner must not be NULL");
    if (units == 0)
        return AD_INVALID(err, "owner", "owner must hold at least one unit");
    if (units > SIZE_MAX / world)
        return AD_INVALID(err, "owner", "owner has too many units (%zu)", units);
    if (out == NULL)
        return AD_INVALID(err, "out", "out must not be NULL");
    if ((size_t)n > units)
        return AD_INVALID(err, "owner",
                          "owner has %zu units for %d components: every component "
                          "must own at least one unit", units, n);
    memset(out, 0, (size_t)n);
    for (u = 0; u < units; u++) {
        if (owner[u] < 0 || owner[u] >= n)
            return AD_INVALID(err, "owner", "owner values must be in [0, %d), got owner[%zu] = %d",
                              n, u, (int)owner[u]);
        out[owner[u]] = 1;
    }
    for (int c = 0; c < n; c++)
        if (!out[c])
            return AD_INVALID(err, "owner",
                              "component %d owns no unit in owner: every component in "
                              "[0, %d) must own at least one", c, n);
    if (reads == NULL)
        return AD_INVALID(err, "reads", "reads must not be NULL");
    if (reads_rows != units || reads_cols != units)
        return AD_INVALID(err, "reads",
                          "reads must be a %zu x %zu matrix (a row and a column per unit "
                          "of owner), got %zu x %zu", units, units, reads_rows, reads_cols);
    for (u = 0; u < units; u++)
        for (v = 0; v < units; v++)
            if (reads[u * units + v] > 1)
                return AD_INVALID(err, "reads",
                                  "reads values must be 0 or 1, got reads[%zu, %zu] = %u", u,
                                  v, (unsigned)reads[u * units + v]);
    if (final < 0 || (unsigned long)final >= units)
        return AD_INVALID(err, "final",
                          "final must be in [0, %zu) (a unit of owner), got %ld", units, final);
    if (owner[final] != n - 1)
        return AD_INVALID(err, "final",
                          "the final unit (%ld) is owned by component %d, but it must be "
                          "owned by the last component (%d)", final, (int)owner[final], n - 1);
    return AD_OK;
}

ad_status ad_schedule_receives(int n, int stride, const int32_t *owner, size_t units,
                               const unsigned char *reads, size_t reads_rows,
                               size_t reads_cols, long final, unsigned char *out,
                               ad_err *err)
{
    ad_status st = check_receives(n, stride, owner, units, reads, reads_rows, reads_cols,
                                  final, out, err);
    if (st != AD_OK)
        return st;
    const int world = ad_schedule_world_size(n, stride);
    memset(out, 0, (size_t)world * units);
    for (int r = 0; r < world; r++) {
        unsigned char *row = out + (size_t)r * units;
        const int c = ad_schedule_component_of(n, stride, r);
        /* what the computed units read, less what they compute */
        for (size_t u = 0; u < units; u++) {
            if (owner[u] != c)
                continue;
            for (size_t v = 0; v < units; v++)
                row[v] |= reads[u * units + v];
        }
        for (size_t u = 0; u < units; u++)
            if (owner[u] == c)
                row[u] = 0;
        /* stride 2: sync calls replay the final unit on every rank */
        if (stride == 2)
            row[final] = 1;
        /* a rank already holds what it owns (the extra rank owns nothing) */
        for (size_t u = 0; u < units; u++)
            if (owner[u] == r)
                row[u] = 0;
    }
    return AD_OK;
}
