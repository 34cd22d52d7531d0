/*
 * partition.h -- splitting a denoiser's blocks into components
 * (docs/design.md §2).
 *
 * Pure C (no Python.h).  Every function returns an ad_status and fills the
 * caller's ad_err on failure (see status.h).
 *
 * Cost convention used everywhere in this file: with prefix sums
 *     P[0] = 0,  P[i+1] = P[i] + costs[i]   (left to right, in double)
 * the cost of the contiguous run of blocks [i, j) is P[j] - P[i].  A Python
 * reference that computes run costs the same way gets bit-identical numbers.
 */
#ifndef ASYNCDIFF_PARTITION_H
#define ASYNCDIFF_PARTITION_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/*
 * Split blocks 0..nblocks-1 (kept in order) into exactly n non-empty
 * contiguous components so that the largest component cost is as small as
 * possible (the exact optimum).
 *
 *   costs      nblocks finite values >= 0           (else AD_EINVAL "costs")
 *   n          1 <= n <= nblocks                    (else AD_EINVAL "n")
 *   assign_out nblocks entries: component of each block (0..n-1, nondecreasing)
 *   best_out   optional (may be NULL): the optimal largest component cost
 *
 * Ties are broken deterministically: the last component takes as many
 * trailing blocks as it can, then the one before it, and so on.
 * Time O(n * nblocks * log nblocks), memory O(nblocks).
 */
ad_status ad_partition_minmax(const double *costs, size_t nblocks, int n,
                              int32_t *assign_out, double *best_out, ad_err *err);

/*
 * Check an assignment of nblocks blocks to n components: every value is in
 * [0, n) and every component has at least one block.  Components need not be
 * contiguous (the paper's SDXL presets are not).  Failures name "assign"
 * (or "n" when n < 1).
 */
ad_status ad_assignment_validate(const int32_t *assign, size_t nblocks, int n,
                                 ad_err *err);

/*
 * Cost of each component of a (validated) assignment.
 *
 * per_component[c] is the sum, over the maximal runs of consecutive blocks
 * assigned to c, of the run cost P[end] - P[start] (summed in block order).
 * For a contiguous assignment this is exactly the number the partitioner
 * minimises, so max_out of ad_partition_minmax's output equals its best_out
 * bit for bit.  mean_out is the sum of per_component divided by n.
 * per_component must have room for n values; max_out / mean_out may be NULL.
 */
ad_status ad_cost_summary(const double *costs, const int32_t *assign,
                          size_t nblocks, int n, double *per_component,
                          double *max_out, double *mean_out, ad_err *err);

#endif /* ASYNCDIFF_PARTITION_H */
