/*
 * partition.c -- exact min-max contiguous partition of block costs.
 *
 * Problem: blocks 0..B-1 with costs c[i] >= 0, cut them (in order) into n
 * non-empty runs; minimise the largest run cost.  A run [i, j) costs
 * P[j] - P[i] with the prefix sums P of partition.h.
 *
 * Why the floating-point arithmetic does not spoil the usual arguments:
 * IEEE addition and subtraction are correctly rounded, and rounding is
 * monotone.  Hence, with every c[i] >= 0 and all P finite,
 *   (F1) P is nondecreasing:            P[i+1] = fl(P[i] + c[i]) >= P[i];
 *   (F2) run costs are >= 0 and monotone under inclusion: if [a, b) lies
 *        inside [a', b') then P[b] - P[a] <= P[b'] - P[a'] (fl(x - y) grows
 *        with x and shrinks with y).
 * max/min are exact, so every optimum below is literally one of the numbers
 * P[j] - P[i]; a brute force over all cuts using the same differences finds
 * the same value bit for bit.
 *
 * DP.  D[m][j] = best largest cost when the first j blocks form m non-empty
 * runs (defined for j >= m):
 *     D[1][j] = P[j] - P[0]
 *     D[m][j] = min over i in [m-1, j-1] of max(D[m-1][i], P[j] - P[i]).
 * (M) D[m][j] is nondecreasing in j.  Take an optimal split of j+1 blocks and
 *     drop block j.  If its last run keeps a block, every run shrank or stayed
 *     (F2).  If the last run was block j alone, the first m-1 runs cover j >= m
 *     blocks, so one of them has two blocks and can be cut in two; by (F2) no
 *     run grows.  Either way we get a split of j blocks no worse than before.
 * So inside the min, D[m-1][i] is nondecreasing in i and P[j] - P[i] is
 * nonincreasing in i: the max of the two is minimised where they cross, and a
 * binary search finds the crossing.  Only D[n][B] is needed in the end, so
 * two rows suffice.
 *
 * Reconstruction (deterministic tie-breaking), with OPT = D[n][B]: walk from
 * the back.  With e blocks still unassigned and components 0..t still to
 * fill, component t (t >= 1) takes the run [s, e) with the smallest s such
 * that s >= t (one block left for each of components 0..t-1) and
 * P[e] - P[s] <= OPT; component 0 takes what is left, [0, e).
 * Why this always works -- invariant: D[t+1][e] <= OPT.  It holds at the
 * start (t = n-1, e = B).  Given it, some optimal split of the first e blocks
 * into t+1 runs has a last run [s', e) with s' >= t, cost <= OPT, and
 * D[t][s'] <= OPT.  So a valid s exists (s' is one; and s <= e - 1 always
 * works too since a run holding block e-1 costs at least P[e] - P[e-1] by
 * (F2)), the greedy s satisfies s <= s', and by (M) D[t][s] <= D[t][s'] <=
 * OPT, which is the invariant for the next step.  At t = 0 the invariant says
 * D[1][e] = P[e] - P[0] <= OPT: component 0 fits.  Every component is
 * non-empty because s <= e - 1 and s >= t >= 1 leaves e >= 1 for component 0.
 */
#include "partition.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Check the costs and fill P[0..nblocks] (P must hold nblocks + 1 values). */
static ad_status prefix_sums(const double *costs, size_t nblocks, double *P,
                             ad_err *err)
{
    P[0] = 0.0;
    for (size_t i = 0; i < nblocks; i++) {
        double c = costs[i];
        if (!isfinite(c) || c < 0.0)
            return AD_INVALID(err, "costs",
                              "costs must be finite and >= 0, got costs[%zu] = %g",
                              i, c);
        P[i + 1] = P[i] + c;
    }
    if (!isfinite(P[nblocks]))
        return AD_INVALID(err, "costs",
                          "the sum of costs overflows a double; rescale the costs");
    return AD_OK;
}

static double *alloc_doubles(size_t count)
{
    if (count == 0 || count > SIZE_MAX / sizeof(double))
        return NULL;
    return malloc(count * sizeof(double));
}

/* Checks shared by the partitioner and the summary. */
static ad_status check_common(const double *costs, size_t nblocks, int n,
                              ad_err *err)
{
    if (costs == NULL)
        return AD_INVALID(err, "costs", "costs must not be NULL");
    if (nblocks == 0)
        return AD_INVALID(err, "costs", "costs must not be empty");
    if (n < 1)
        return AD_INVALID(err, "n", "n must be >= 1, got %d", n);
    if ((size_t)n > nblocks)
        return AD_INVALID(err, "n",
                          "n must be at most the number of blocks (%zu), got %d",
                          nblocks, n);
    return AD_OK;
}

/*
 * min over i in [lo, j-1] of max(prev[i], P[j] - P[i]), where prev is
 * nondecreasing and P[j] - P[i] nonincreasing in i (lo < j).
 *
 * *cross carries the crossing point between calls of one DP row: for a
 * larger j every P[j] - P[i] is at least as large (P is nondecreasing), so
 * the first i where prev[i] >= P[j] - P[i] can only move right.  The binary
 * search therefore starts at the previous crossing.  Start a row with
 * *cross = 0.
 */
static double best_last_cut(const double *prev, const double *P, size_t lo,
                            size_t j, size_t *cross)
{
    const size_t first = lo;
    size_t hi = j - 1;

    if (prev[hi] < P[j] - P[hi]) {
        /* They never cross: the last run dominates everywhere and is
         * smallest at the largest i. */
        *cross = j;
        return P[j] - P[hi];
    }
    if (*cross > lo)
        lo = *cross; /* <= hi: the crossing for this j is in [lo, hi] */
    /* The crossing usually moves only a little from one j to the next, so
     * gallop first: probe lo + 1, lo + 2, lo + 4, ... to bracket it, which
     * keeps a row at about O(B) probes instead of O(B log B). */
    for (size_t step = 1; lo < hi; step *= 2) {
        size_t probe = (hi - lo > step) ? lo + step : hi;
        if (prev[probe] >= P[j] - P[probe]) {
            hi = probe; /* crossing in [lo, probe] */
            break;
        }
        lo = probe + 1; /* crossing in [probe + 1, hi] */
    }
    /* Find the first i where prev[i] >= P[j] - P[i]; it is in [lo, hi]. */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (prev[mid] >= P[j] - P[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    *cross = lo;
    /* At lo the max is prev[lo].  At lo - 1 it is the last run's cost; going
     * further left only grows the last run, going right only grows prev. */
    double best = prev[lo];
    if (lo > first) {
        double left = P[j] - P[lo - 1];
        if (left < best)
            best = left;
    }
    return best;
}

ad_status ad_partition_minmax(const double *costs, size_t nblocks, int n,
                              int32_t *assign_out, double *best_out, ad_err *err)
{
    ad_status st = AD_OK;
    double *P = NULL, *prev = NULL, *cur = NULL;

    st = check_common(costs, nblocks, n, err);
    if (st != AD_OK)
        goto done;
    if (assign_out == NULL) {
        st = AD_INVALID(err, "assign_out", "assign_out must not be NULL");
        goto done;
    }
    if (nblocks > (size_t)INT32_MAX) {
        st = AD_INVALID(err, "costs", "too many blocks (%zu)", nblocks);
        goto done;
    }

    P = alloc_doubles(nblocks + 1);
    prev = alloc_doubles(nblocks + 1);
    cur = alloc_doubles(nblocks + 1);
    if (P == NULL || prev == NULL || cur == NULL) {
        st = AD_NOMEM(err, "partition work arrays");
        goto done;
    }
    st = prefix_sums(costs, nblocks, P, err);
    if (st != AD_OK)
        goto done;

    const size_t B = nblocks;
    const size_t N = (size_t)n;

    /* Row m = 1.  Row m only needs j in [m, B - (N - m)]: each later
     * component still needs one block of its own; the last row needs only
     * j = B. */
    for (size_t j = 1; j <= B - (N - 1); j++)
        prev[j] = P[j] - P[0];
    for (size_t m = 2; m < N; m++) {
        size_t jmax = B - (N - m), cross = 0;
        for (size_t j = m; j <= jmax; j++)
            cur[j] = best_last_cut(prev, P, m - 1, j, &cross);
        double *tmp = prev;
        prev = cur;
        cur = tmp;
    }
    size_t last_cross = 0;
    const double opt =
        (N == 1) ? P[B] - P[0] : best_last_cut(prev, P, N - 1, B, &last_cross);

    /* Reconstruction from the back (argued at the top of this file). */
    size_t e = B;
    for (size_t t = N - 1; t >= 1; t--) {
        size_t s = e - 1; /* non-empty; cost <= opt by (F2) */
        while (s > t && P[e] - P[s - 1] <= opt)
            s--;
        for (size_t i = s; i < e; i++)
            assign_out[i] = (int32_t)t;
        e = s;
    }
    if (P[e] - P[0] > opt) {
        /* Cannot happen (see the argument above); kept as a tripwire. */
        st = ad_err_set(err, AD_EINTERNAL, NULL,
                        "partition reconstruction failed (component 0 over the optimum)");
        goto done;
    }
    for (size_t i = 0; i < e; i++)
        assign_out[i] = 0;
    if (best_out != NULL)
        *best_out = opt;

done:
    free(P);
    free(prev);
    free(cur);
    return st;
}

ad_status ad_assignment_validate(const int32_t *assign, size_t nblocks, int n,
                                 ad_err *err)
{
    ad_status st = AD_OK;
    unsigned char *seen = NULL;

    if (n < 1) {
        st = AD_INVALID(err, "n", "n must be >= 1, got %d", n);
        goto done;
    }
    if (assign == NULL) {
        st = AD_INVALID(err, "assign", "assign must not be NULL");
        goto done;
    }
    if (nblocks == 0) {
        st = AD_INVALID(err, "assign", "assign must not be empty");
        goto done;
    }
    if ((size_t)n > nblocks) {
        st = AD_INVALID(err, "n",
                        "n (%d) is larger than the number of blocks (%zu): "
                        "some component would be empty", n, nblocks);
        goto done;
    }
    seen = calloc((size_t)n, 1);
    if (seen == NULL) {
        st = AD_NOMEM(err, "assignment check");
        goto done;
    }
    for (size_t i = 0; i < nblocks; i++) {
        int32_t a = assign[i];
        if (a < 0 || a >= n) {
            st = AD_INVALID(err, "assign",
                            "assign values must be in [0, %d), got assign[%zu] = %ld",
                            n, i, (long)a);
            goto done;
        }
        seen[a] = 1;
    }
    for (int c = 0; c < n; c++) {
        if (!seen[c]) {
            st = AD_INVALID(err, "assign",
                            "assign leaves component %d without any block", c);
            goto done;
        }
    }

done:
    free(seen);
    return st;
}

ad_status ad_cost_summary(const double *costs, const int32_t *assign,
                          size_t nblocks, int n, double *per_component,
                          double *max_out, double *mean_out, ad_err *err)
{
    ad_status st = AD_OK;
    double *P = NULL;

    st = check_common(costs, nblocks, n, err);
    if (st != AD_OK)
        goto done;
    st = ad_assignment_validate(assign, nblocks, n, err);
    if (st != AD_OK)
        goto done;
    if (per_component == NULL) {
        st = AD_INVALID(err, "per_component", "per_component must not be NULL");
        goto done;
    }
    P = alloc_doubles(nblocks + 1);
    if (P == NULL) {
        st = AD_NOMEM(err, "cost summary");
        goto done;
    }
    st = prefix_sums(costs, nblocks, P, err);
    if (st != AD_OK)
        goto done;

    for (int c = 0; c < n; c++)
        per_component[c] = 0.0;
    /* Add each maximal run [start, i) of equal assignment in block order. */
    size_t start = 0;
    for (size_t i = 1; i <= nblocks; i++) {
        if (i == nblocks || assign[i] != assign[start]) {
            per_component[assign[start]] += P[i] - P[start];
            start = i;
        }
    }
    double mx = per_component[0], total = 0.0;
    for (int c = 0; c < n; c++) {
        if (per_component[c] > mx)
            mx = per_component[c];
        total += per_component[c];
    }
    if (max_out != NULL)
        *max_out = mx;
    if (mean_out != NULL)
        *mean_out = total / (double)n;

done:
    free(P);
    return st;
}
