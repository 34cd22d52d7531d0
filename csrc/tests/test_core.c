/*
 * test_core.c -- plain C tests of the core (no Python), built and run under
 * AddressSanitizer + UndefinedBehaviorSanitizer by tests/test_sanitize.py:
 *
 *   gcc -std=c11 -Icsrc csrc/tests/test_core.c csrc/tests/check.c \
 *       csrc/partition.c csrc/schedule.c -lm -o test_core && ./test_core
 *
 * Prints "N passed, M failed" and exits non-zero when something failed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "partition.h"
#include "schedule.h"
#include "status.h"

static int arg_is(const ad_err *e, const char *name)
{
    return e->arg != NULL && strcmp(e->arg, name) == 0 && strstr(e->msg, name) != NULL;
}

/* Small deterministic generator (64-bit LCG, high bits). */
static uint64_t g_rng = 0x9e3779b97f4a7c15ULL;
static uint32_t rnd(void)
{
    g_rng = g_rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(g_rng >> 33);
}

/* Random costs with many ties: small integers, zeros, and some fractions. */
static void random_costs(double *c, size_t nb)
{
    int style = (int)(rnd() % 3);
    for (size_t i = 0; i < nb; i++) {
        if (style == 0)
            c[i] = (double)(rnd() % 4);
        else if (style == 1)
            c[i] = (double)(rnd() % 1000) / 7.0;
        else
            c[i] = (rnd() % 5 == 0) ? 0.0 : (double)(rnd() % 100000) * 1e-3;
    }
}

/* Best largest run cost over all ways to cut nb blocks into n runs; run
 * [i, j) costs P[j] - P[i] exactly as in partition.c. */
static double brute_best(const double *P, size_t start, size_t nb, int n)
{
    if (n == 1)
        return P[nb] - P[start];
    double best = INFINITY;
    /* the first run is [start, cut); leave n-1 blocks for the others */
    for (size_t cut = start + 1; cut + (size_t)(n - 1) <= nb; cut++) {
        double first = P[cut] - P[start];
        double rest = brute_best(P, cut, nb, n - 1);
        double worst = first > rest ? first : rest;
        if (worst < best)
            best = worst;
    }
    return best;
}

/* The tie-breaking rule, written out directly: from the back, each
 * component takes as many blocks as it can. */
static void greedy_from_back(const double *P, size_t nb, int n, double opt,
                             int32_t *out)
{
    size_t e = nb;
    for (int t = n - 1; t >= 1; t--) {
        size_t s = e - 1;
        while (s - 1 >= (size_t)t && P[e] - P[s - 1] <= opt)
            s--;
        for (size_t i = s; i < e; i++)
            out[i] = t;
        e = s;
    }
    for (size_t i = 0; i < e; i++)
        out[i] = 0;
}

static void test_partition_small(void)
{
    double c[10], P[11], per[10];
    int32_t a[10], ref[10];
    for (int round = 0; round < 3000; round++) {
        size_t nb = 1 + rnd() % 10;
        int n = 1 + (int)(rnd() % nb);
        random_costs(c, nb);
        P[0] = 0.0;
        for (size_t i = 0; i < nb; i++)
            P[i + 1] = P[i] + c[i];

        ad_err e = {0};
        double best = -1.0, mx = -1.0, mean = -1.0;
        ad_status st = ad_partition_minmax(c, nb, n, a, &best, &e);
        CHECK(st == AD_OK);
        if (st != AD_OK)
            continue;
        CHECK(best == brute_best(P, 0, nb, n));

        /* contiguous, starts at 0, ends at n-1, steps of at most 1 */
        int ok = (a[0] == 0) && (a[nb - 1] == n - 1);
        for (size_t i = 1; i < nb; i++)
            ok = ok && (a[i] == a[i - 1] || a[i] == a[i - 1] + 1);
        CHECK(ok);
        CHECK(ad_assignment_validate(a, nb, n, &e) == AD_OK);

        greedy_from_back(P, nb, n, best, ref);
        CHECK(memcmp(a, ref, nb * sizeof a[0]) == 0);

        CHECK(ad_cost_summary(c, a, nb, n, per, &mx, &mean, &e) == AD_OK);
        CHECK(mx == best);

        /* determinism */
        int32_t again[10];
        double best2 = -1.0;
        CHECK(ad_partition_minmax(c, nb, n, again, &best2, NULL) == AD_OK);
        CHECK(best2 == best && memcmp(a, again, nb * sizeof a[0]) == 0);
    }
}

/* O(n B^2) DP without any search, for medium sizes. */
static double quadratic_best(const double *P, size_t nb, int n, double *row, double *next)
{
    for (size_t j = 0; j <= nb; j++)
        row[j] = P[j] - P[0];
    for (int m = 2; m <= n; m++) {
        for (size_t j = 0; j <= nb; j++) {
            next[j] = INFINITY;
            for (size_t i = (size_t)m - 1; i < j; i++) {
                double last = P[j] - P[i];
                double worst = row[i] > last ? row[i] : last;
                if (worst < next[j])
                    next[j] = worst;
            }
        }
        memcpy(row, next, (nb + 1) * sizeof *row);
    }
    return row[nb];
}

static void test_partition_medium(void)
{
    enum { MAXB = 120 };
    double c[MAXB], P[MAXB + 1], row[MAXB + 1], next[MAXB + 1];
    int32_t a[MAXB], ref[MAXB];
    for (int round = 0; round < 150; round++) {
        size_t nb = 1 + rnd() % MAXB;
        int n = 1 + (int)(rnd() % (nb < 16 ? nb : 16));
        random_costs(c, nb);
        P[0] = 0.0;
        for (size_t i = 0; i < nb; i++)
            P[i + 1] = P[i] + c[i];
        double best = -1.0;
        CHECK(ad_partition_minmax(c, nb, n, a, &best, NULL) == AD_OK);
        double q = quadratic_best(P, nb, n, row, next);
        CHECK(best == q);
        greedy_from_back(P, nb, n, q, ref);
        CHECK(memcmp(a, ref, nb * sizeof a[0]) == 0);
    }
}

static void test_partition_large(void)
{
    const size_t nb = 10000;
    const int n = 8;
    double *c = malloc(nb * sizeof *c);
    int32_t *a = malloc(nb * sizeof *a);
    double per[8], best = 0.0, mx = 0.0, mean = 0.0;
    ad_err e = {0};
    CHECK(c != NULL && a != NULL);
    if (c == NULL || a == NULL)
        goto done;
    for (size_t i = 0; i < nb; i++)
        c[i] = (double)(rnd() % 100000) / 1000.0;
    CHECK(ad_partition_minmax(c, nb, n, a, &best, &e) == AD_OK);
    CHECK(ad_assignment_validate(a, nb, n, &e) == AD_OK);
    CHECK(ad_cost_summary(c, a, nb, n, per, &mx, &mean, &e) == AD_OK);
    CHECK(mx == best);
    /* the optimum is at least the mean and at least the largest block */
    double total = 0.0, biggest = 0.0;
    for (size_t i = 0; i < nb; i++) {
        total += c[i];
        if (c[i] > biggest)
            biggest = c[i];
    }
    CHECK(best >= biggest);
    CHECK(best * n >= total * (1.0 - 1e-12));
    CHECK(fabs(mean * n - total) <= 1e-9 * total);
done:
    free(c);
    free(a);
}

static void test_partition_errors(void)
{
    double c[4] = {1.0, 2.0, 3.0, 4.0};
    int32_t a[4];
    ad_err e = {0};

    c[2] = NAN;
    CHECK(ad_partition_minmax(c, 4, 2, a, NULL, &e) == AD_EINVAL && arg_is(&e, "costs"));
    c[2] = INFINITY;
    CHECK(ad_partition_minmax(c, 4, 2, a, NULL, &e) == AD_EINVAL && arg_is(&e, "costs"));
    c[2] = -1.0;
    CHECK(ad_partition_minmax(c, 4, 2, a, NULL, &e) == AD_EINVAL && arg_is(&e, "costs"));
    c[2] = -0.0; /* negative zero is zero */
    CHECK(ad_partition_minmax(c, 4, 2, a, NULL, &e) == AD_OK);
    c[2] = 3.0;

    double huge[2] = {1.5e308, 1.5e308}; /* sum overflows */
    CHECK(ad_partition_minmax(huge, 2, 1, a, NULL, &e) == AD_EINVAL && arg_is(&e, "costs"));

    CHECK(ad_partition_minmax(c, 4, 0, a, NULL, &e) == AD_EINVAL && arg_is(&e, "n"));
    CHECK(ad_partition_minmax(c, 4, -3, a, NULL, &e) == AD_EINVAL && arg_is(&e, "n"));
    CHECK(ad_partition_minmax(c, 4, 5, a, NULL, &e) == AD_EINVAL && arg_is(&e, "n"));
    CHECK(ad_partition_minmax(c, 0, 1, a, NULL, &e) == AD_EINVAL && arg_is(&e, "costs"));
    CHECK(ad_partition_minmax(NULL, 4, 1, a, NULL, &e) == AD_EINVAL && arg_is(&e, "costs"));
    CHECK(ad_partition_minmax(c, 4, 1, NULL, NULL, &e) == AD_EINVAL);
    /* a NULL error record is allowed */
    CHECK(ad_partition_minmax(c, 4, 0, a, NULL, NULL) == AD_EINVAL);

    /* n == nblocks: one block each; n == 1: everything in 0 */
    double best = 0.0;
    CHECK(ad_partition_minmax(c, 4, 4, a, &best, &e) == AD_OK);
    CHECK(a[0] == 0 && a[1] == 1 && a[2] == 2 && a[3] == 3 && best == 4.0);
    CHECK(ad_partition_minmax(c, 4, 1, a, &best, &e) == AD_OK);
    CHECK(a[0] == 0 && a[3] == 0 && best == 10.0);

    /* all zero: the last components take one block each (they could take
     * more, but each must leave a block for those before it) */
    double z[5] = {0, 0, 0, 0, 0};
    int32_t za[5];
    CHECK(ad_partition_minmax(z, 5, 3, za, &best, &e) == AD_OK);
    CHECK(best == 0.0 && za[0] == 0 && za[1] == 1 && za[2] == 2 && za[3] == 2 && za[4] == 2);
}

static void test_validate_and_summary(void)
{
    ad_err e = {0};
    int32_t nc[5] = {1, 0, 1, 2, 0}; /* non-contiguous is fine */
    CHECK(ad_assignment_validate(nc, 5, 3, &e) == AD_OK);
    int32_t gap[4] = {0, 0, 2, 2}; /* component 1 empty */
    CHECK(ad_assignment_validate(gap, 4, 3, &e) == AD_EINVAL && arg_is(&e, "assign"));
    int32_t big[3] = {0, 1, 3};
    CHECK(ad_assignment_validate(big, 3, 3, &e) == AD_EINVAL && arg_is(&e, "assign"));
    int32_t neg[3] = {0, -1, 1};
    CHECK(ad_assignment_validate(neg, 3, 2, &e) == AD_EINVAL && arg_is(&e, "assign"));
    CHECK(ad_assignment_validate(nc, 5, 0, &e) == AD_EINVAL && arg_is(&e, "n"));
    CHECK(ad_assignment_validate(nc, 5, 6, &e) == AD_EINVAL && arg_is(&e, "n"));
    CHECK(ad_assignment_validate(nc, 0, 1, &e) == AD_EINVAL && arg_is(&e, "assign"));
    CHECK(ad_assignment_validate(NULL, 5, 1, &e) == AD_EINVAL && arg_is(&e, "assign"));

    double c[5] = {1.0, 2.0, 4.0, 8.0, 16.0};
    double per[3], mx = 0.0, mean = 0.0;
    CHECK(ad_cost_summary(c, nc, 5, 3, per, &mx, &mean, &e) == AD_OK);
    CHECK(per[0] == 18.0 && per[1] == 5.0 && per[2] == 8.0);
    CHECK(mx == 18.0 && mean == 31.0 / 3.0);
    CHECK(ad_cost_summary(c, gap, 4, 3, per, &mx, &mean, &e) == AD_EINVAL && arg_is(&e, "assign"));
    c[1] = NAN;
    CHECK(ad_cost_summary(c, nc, 5, 3, per, &mx, &mean, &e) == AD_EINVAL && arg_is(&e, "costs"));
}

static ad_plan plan_of(int n, int s, int w, int ts, long L, int r, long k)
{
    ad_plan p;
    ad_err e = {0};
    memset(&p, 0x5a, sizeof p);
    ad_status st = ad_schedule_plan(n, s, w, ts, L, r, k, &p, &e);
    CHECK(st == AD_OK);
    if (st != AD_OK)
        fprintf(stderr, "  plan(%d,%d,%d,%d,%ld,%d,%ld): %s\n", n, s, w, ts, L, r, k, e.msg);
    return p;
}

static void test_schedule_examples(void)
{
    /* N=2, S=1, W=1, L=5. */
    ad_plan p = plan_of(2, 1, 1, 0, 5, 0, 0);
    CHECK(p.warmup && p.compute_all && !p.sync && p.store && p.publish && p.exchange);
    CHECK(p.compute_component == -1 && p.result_rank == -1 && p.timestep_index == 0);
    p = plan_of(2, 1, 1, 0, 5, 1, 3);
    CHECK(!p.warmup && p.sync && !p.compute_all && p.compute_component == 1);
    CHECK(p.store && p.publish && p.exchange && p.timestep_index == 3 && p.result_rank == 1);
    p = plan_of(2, 1, 1, 1, 5, 0, 4); /* last call, time shift */
    CHECK(p.sync && p.store && !p.publish && p.exchange && p.timestep_index == 3);

    /* W >= L: warm-up only, nothing is published. */
    p = plan_of(3, 1, 5, 0, 5, 2, 4);
    CHECK(p.warmup && p.store && !p.publish && !p.exchange);
    p = plan_of(3, 1, 9, 0, 5, 2, 4);
    CHECK(p.warmup && !p.store && !p.publish && !p.exchange);

    /* N=2, S=2, W=3, L=8: calls 3,5,7 compute; 4,6 sync. */
    p = plan_of(2, 2, 3, 0, 8, 0, 2); /* last warm-up: call 3 does not sync */
    CHECK(p.warmup && p.store && !p.publish && !p.exchange);
    p = plan_of(2, 2, 3, 0, 8, 1, 3);
    CHECK(!p.sync && p.compute_component == 1 && p.store && p.publish);
    CHECK(p.timestep_index == 4 && p.result_rank == 2 && p.exchange);
    p = plan_of(2, 2, 3, 1, 8, 2, 3); /* extra rank, time shift */
    CHECK(p.compute_component == 1 && !p.store && !p.publish && p.timestep_index == 2);
    p = plan_of(2, 2, 3, 0, 8, 0, 4);
    CHECK(p.sync && p.compute_component == -1 && !p.store && !p.exchange);
    CHECK(p.timestep_index == 4 && p.result_rank == -1);
    p = plan_of(2, 2, 3, 0, 8, 0, 7); /* final call */
    CHECK(p.timestep_index == 7 && !p.publish && p.exchange && p.result_rank == 2);
    p = plan_of(2, 2, 3, 1, 8, 1, 7);
    CHECK(p.timestep_index == 6);

    /* Even W with stride 2: call W syncs, so the warm-up stores publish. */
    p = plan_of(2, 2, 2, 0, 8, 0, 1);
    CHECK(p.store && p.publish && p.exchange);
    p = plan_of(2, 2, 2, 0, 8, 2, 1); /* the extra rank owns nothing */
    CHECK(p.store && !p.publish && p.exchange);
    p = plan_of(2, 2, 2, 0, 8, 0, 2);
    CHECK(p.sync && !p.warmup);
}

/* Rules that must hold for every configuration. */
static void test_schedule_invariants(void)
{
    int bad = 0, count = 0;
    for (int n = 1; n <= 5; n++)
        for (int s = 1; s <= 2; s++)
            for (long L = 1; L <= 9; L++)
                for (int w = 1; w <= L + 1; w++)
                    for (int ts = 0; ts <= 1; ts++)
                        for (long k = 0; k < L; k++) {
                            int M = n + s - 1;
                            ad_plan first = plan_of(n, s, w, ts, L, 0, k);
                            for (int r = 0; r < M; r++) {
                                ad_plan p = plan_of(n, s, w, ts, L, r, k);
                                count++;
                                bad += p.exchange != first.exchange;
                                bad += p.sync != first.sync;
                                bad += p.result_rank != first.result_rank;
                                bad += p.publish && (!p.store || r >= n);
                                bad += p.warmup != (k < w);
                                bad += p.compute_all != p.warmup;
                                bad += p.compute_all && p.compute_component != -1;
                                bad += p.compute_component < -1 || p.compute_component >= n;
                                bad += p.timestep_index < 0 || p.timestep_index >= L;
                                bad += p.result_rank < -1 || p.result_rank >= M;
                                bad += p.publish && k + 1 >= L;
                            }
                        }
    CHECK(count > 0);
    CHECK(bad == 0);
}

static void test_schedule_errors(void)
{
    ad_plan p;
    ad_err e = {0};
    CHECK(ad_schedule_plan(0, 1, 1, 0, 5, 0, 0, &p, &e) == AD_EINVAL && arg_is(&e, "model_n"));
    CHECK(ad_schedule_plan(2, 3, 1, 0, 5, 0, 0, &p, &e) == AD_EINVAL && arg_is(&e, "stride"));
    CHECK(ad_schedule_plan(2, 0, 1, 0, 5, 0, 0, &p, &e) == AD_EINVAL && arg_is(&e, "stride"));
    CHECK(ad_schedule_plan(2, 1, 0, 0, 5, 0, 0, &p, &e) == AD_EINVAL && arg_is(&e, "warm_up"));
    CHECK(ad_schedule_plan(2, 1, 1, 2, 5, 0, 0, &p, &e) == AD_EINVAL && arg_is(&e, "time_shift"));
    CHECK(ad_schedule_plan(2, 1, 1, 0, 0, 0, 0, &p, &e) == AD_EINVAL && arg_is(&e, "steps"));
    CHECK(ad_schedule_plan(2, 1, 1, 0, 5, 2, 0, &p, &e) == AD_EINVAL && arg_is(&e, "rank"));
    CHECK(ad_schedule_plan(2, 2, 1, 0, 5, 3, 0, &p, &e) == AD_EINVAL && arg_is(&e, "rank"));
    CHECK(ad_schedule_plan(2, 2, 1, 0, 5, -1, 0, &p, &e) == AD_EINVAL && arg_is(&e, "rank"));
    CHECK(ad_schedule_plan(2, 1, 1, 0, 5, 0, 5, &p, &e) == AD_EINVAL && arg_is(&e, "k"));
    CHECK(ad_schedule_plan(2, 1, 1, 0, 5, 0, -1, &p, &e) == AD_EINVAL && arg_is(&e, "k"));
    CHECK(ad_schedule_plan(2147483647, 2, 1, 0, 5, 0, 0, &p, &e) == AD_EINVAL &&
          arg_is(&e, "model_n"));
    CHECK(ad_schedule_validate(2, 2, 9, 1, 50, &e) == AD_OK);
    CHECK(ad_schedule_world_size(3, 2) == 4);
}

/* The new fields agree with the plans of all ranks: receive is "some owner
 * publishes", result_cached is "stride-2 sync call"; component_of is what
 * the async plans compute. */
static void test_schedule_receive_and_cached(void)
{
    int bad = 0, count = 0;
    for (int n = 1; n <= 5; n++)
        for (int s = 1; s <= 2; s++)
            for (long L = 1; L <= 9; L++)
                for (int w = 1; w <= L + 1; w++)
                    for (long k = 0; k < L; k++) {
                        const int M = n + s - 1;
                        int any_publish = 0;
                        ad_plan first = plan_of(n, s, w, 1, L, 0, k);
                        for (int r = 0; r < M; r++) {
                            ad_plan p = plan_of(n, s, w, 1, L, r, k);
                            count++;
                            any_publish |= p.publish && r < n;
                            bad += p.receive != first.receive;
                            bad += p.result_cached != first.result_cached;
                            bad += p.result_cached != (s == 2 && k >= w && k % 2 == 0);
                            bad += p.result_cached && (p.result_rank != -1 || p.exchange);
                            bad += p.receive && !p.exchange;
                            if (!p.warmup && p.compute_component >= 0)
                                bad += p.compute_component != ad_schedule_component_of(n, s, r);
                        }
                        bad += first.receive != any_publish;
                    }
    CHECK(count > 0);
    CHECK(bad == 0);

    CHECK(ad_schedule_component_of(3, 1, 0) == 0 && ad_schedule_component_of(3, 1, 2) == 2);
    CHECK(ad_schedule_component_of(3, 2, 3) == 2);
    CHECK(ad_schedule_component_of(3, 1, 3) == -1 && ad_schedule_component_of(3, 2, 4) == -1);
    CHECK(ad_schedule_component_of(3, 2, -1) == -1 && ad_schedule_component_of(0, 1, 0) == -1);
    CHECK(ad_schedule_component_of(3, 3, 0) == -1);
    ad_err e = {0};
    CHECK(ad_schedule_check_rank(3, 2, 3, &e) == AD_OK);
    CHECK(ad_schedule_check_rank(3, 2, 4, &e) == AD_EINVAL && arg_is(&e, "rank"));
}

/* ad_schedule_receives against the rule written out with plain loops. */
#define MAX_UNITS 12
static void reference_receives(int n, int s, const int32_t *owner, size_t U,
                               const unsigned char *reads, long final,
                               unsigned char *out)
{
    const int M = n + s - 1;
    for (int r = 0; r < M; r++) {
        const int c = r < n ? r : n - 1;
        for (size_t v = 0; v < U; v++) {
            int wanted = 0;
            for (size_t u = 0; u < U; u++)
                wanted |= owner[u] == c && reads[u * U + v];
            if (owner[v] == c)
                wanted = 0;
            if (s == 2 && (size_t)final == v && owner[final] != r)
                wanted = 1;
            if (r < n && owner[v] == r)
                wanted = 0;
            out[(size_t)r * U + v] = (unsigned char)wanted;
        }
    }
}

static void test_schedule_receives(void)
{
    int32_t owner[MAX_UNITS];
    unsigned char reads[MAX_UNITS * MAX_UNITS];
    unsigned char got[3 * 6 * MAX_UNITS], want[3 * 6 * MAX_UNITS];
    int bad = 0, cases = 0;

    for (int round = 0; round < 3000; round++) {
        const int n = 1 + (int)(rnd() % 5), s = 1 + (int)(rnd() % 2);
        const size_t U = (size_t)n + rnd() % (MAX_UNITS - (size_t)n + 1);
        long final = -1;
        ad_err e = {0};
        /* every component owns one unit at least, the rest at random */
        for (size_t u = 0; u < U; u++)
            owner[u] = u < (size_t)n ? (int32_t)u : (int32_t)(rnd() % (uint32_t)n);
        for (size_t u = U; u > 1; u--) {
            size_t j = rnd() % u;
            int32_t t = owner[u - 1];
            owner[u - 1] = owner[j];
            owner[j] = t;
        }
        for (size_t u = 0; u < U; u++)
            if (owner[u] == n - 1 && (final < 0 || rnd() % 2 == 0))
                final = (long)u;
        const int density = 1 + (int)(rnd() % 4);
        for (size_t i = 0; i < U * U; i++)
            reads[i] = rnd() % 5 < (uint32_t)density;
        memset(got, 0xa5, sizeof got);
        ad_status st = ad_schedule_receives(n, s, owner, U, reads, U, U, final, got, &e);
        reference_receives(n, s, owner, U, reads, final, want);
        bad += st != AD_OK;
        bad += memcmp(got, want, (size_t)(n + s - 1) * U) != 0;
        cases++;
    }
    CHECK(cases == 3000);
    CHECK(bad == 0);

    /* a chain of four units, components {0, 1} and {2, 3}, final unit 3 */
    const int32_t chain_owner[4] = {0, 0, 1, 1};
    unsigned char chain[16] = {0};
    for (int u = 1; u < 4; u++)
        chain[u * 4 + u - 1] = 1;
    unsigned char out[12];
    ad_err e = {0};
    CHECK(ad_schedule_receives(2, 1, chain_owner, 4, chain, 4, 4, 3, out, &e) == AD_OK);
    CHECK(memcmp(out, "\0\0\0\0" "\0\1\0\0", 8) == 0);
    CHECK(ad_schedule_receives(2, 2, chain_owner, 4, chain, 4, 4, 3, out, &e) == AD_OK);
    CHECK(memcmp(out, "\0\0\0\1" "\0\1\0\0" "\0\1\0\1", 12) == 0);
}

static void test_schedule_receives_errors(void)
{
    const int32_t owner[4] = {0, 0, 1, 1};
    unsigned char reads[16] = {0}, out[12];
    ad_err e = {0};
#define RECV(n, s, o, U, r, rows, cols, fin) \
    ad_schedule_receives((n), (s), (o), (U), (r), (rows), (cols), (fin), out, &e)
    CHECK(RECV(2, 1, owner, 4, reads, 4, 4, 3) == AD_OK);
    CHECK(RECV(0, 1, owner, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "model_n"));
    CHECK(RECV(2, 3, owner, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "stride"));
    CHECK(RECV(2, 1, NULL, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "owner"));
    CHECK(RECV(2, 1, owner, 0, reads, 0, 0, 0) == AD_EINVAL && arg_is(&e, "owner"));
    CHECK(RECV(3, 1, owner, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "owner"));
    CHECK(RECV(5, 1, owner, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "owner"));
    const int32_t out_of_range[4] = {0, 2, 1, 1}, negative[4] = {0, -1, 1, 1},
                  lonely[4] = {1, 1, 1, 1};
    CHECK(RECV(2, 1, out_of_range, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "owner"));
    CHECK(RECV(2, 1, negative, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "owner"));
    CHECK(RECV(2, 1, lonely, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "owner"));
    CHECK(RECV(2, 1, owner, 4, NULL, 4, 4, 3) == AD_EINVAL && arg_is(&e, "reads"));
    CHECK(RECV(2, 1, owner, 4, reads, 3, 4, 3) == AD_EINVAL && arg_is(&e, "reads"));
    CHECK(RECV(2, 1, owner, 4, reads, 4, 2, 3) == AD_EINVAL && arg_is(&e, "reads"));
    reads[5] = 2;
    CHECK(RECV(2, 1, owner, 4, reads, 4, 4, 3) == AD_EINVAL && arg_is(&e, "reads"));
    reads[5] = 0;
    CHECK(RECV(2, 1, owner, 4, reads, 4, 4, 4) == AD_EINVAL && arg_is(&e, "final"));
    CHECK(RECV(2, 1, owner, 4, reads, 4, 4, -1) == AD_EINVAL && arg_is(&e, "final"));
    CHECK(RECV(2, 1, owner, 4, reads, 4, 4, 0) == AD_EINVAL && arg_is(&e, "final"));
    CHECK(ad_schedule_receives(2, 1, owner, 4, reads, 4, 4, 3, NULL, &e) == AD_EINVAL &&
          arg_is(&e, "out"));
    CHECK(ad_schedule_receives(2, 1, owner, 4, reads, 4, 4, 3, out, NULL) == AD_OK);
#undef RECV
}

static void test_status(void)
{
    ad_err e = {0};
    CHECK(ad_err_set(&e, AD_ETIMEDOUT, NULL, "waited %d ms", 5) == AD_ETIMEDOUT);
    CHECK(strcmp(e.msg, "waited 5 ms") == 0 && e.arg == NULL);
    CHECK(ad_err_sys(&e, 2, "path", "open failed") == AD_EIO && e.sys_errno == 2);
    /* long messages are cut, not overflowed */
    char big[2000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    ad_err_set(&e, AD_EINVAL, "x", "%s", big);
    CHECK(strlen(e.msg) == sizeof e.msg - 1);
    for (int s = 0; s < AD_STATUS_COUNT; s++)
        CHECK(strcmp(ad_status_name(s), "unknown") != 0);
    CHECK(strcmp(ad_status_name(AD_STATUS_COUNT), "unknown") == 0);
    ad_err_clear(&e);
    CHECK(e.msg[0] == '\0' && e.arg == NULL && e.sys_errno == 0);
}

int main(void)
{
    test_status();
    test_partition_small();
    test_partition_medium();
    test_partition_large();
    test_partition_errors();
    test_validate_and_summary();
    test_schedule_examples();
    test_schedule_invariants();
    test_schedule_errors();
    test_schedule_receive_and_cached();
    test_schedule_receives();
    test_schedule_receives_errors();
    return check_summary();
}
