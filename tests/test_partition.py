"""Property tests of the partitioner in asyncdiff._core against small
pure-Python references of the same rules.

A component's cost is always P[j] - P[i] with prefix sums P built left to
right in float64, so the C result and the references agree bit for bit.
"""
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncdiff import _core

SETTINGS = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- references

def prefix_sums(costs):
    P = [0.0]
    for c in costs:
        P.append(P[-1] + float(c))
    return P


def brute_best(costs, n):
    """Smallest largest-run cost over every way to cut into n runs."""
    P = prefix_sums(costs)
    B = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, B), n - 1):
        bounds = (0, *cuts, B)
        worst = max(P[b] - P[a] for a, b in zip(bounds, bounds[1:]))
        if best is None or worst < best:
            best = worst
    return best


def quadratic_dp_best(costs, n):
    """Plain O(n B^2) DP (no search tricks), vectorised over the cut."""
    P = np.array(prefix_sums(costs))
    B = len(costs)
    row = P - P[0]  # one run over the first j blocks (j >= 1)
    for m in range(2, n + 1):
        new = np.full(B + 1, np.inf)
        for j in range(m, B + 1):
            i = np.arange(m - 1, j)
            new[j] = np.min(np.maximum(row[i], P[j] - P[i]))
        row = new
    return float(row[B])


def tie_break_reference(costs, n, opt):
    """From the back, each component takes as many blocks as it can while
    staying <= opt and leaving one block for each component before it."""
    P = prefix_sums(costs)
    assign = [0] * len(costs)
    end = len(costs)
    for comp in range(n - 1, 0, -1):
        start = end - 1
        while start - 1 >= comp and P[end] - P[start - 1] <= opt:
            start -= 1
        assign[start:end] = [comp] * (end - start)
        end = start
    return assign


def summary_reference(costs, assign, n):
    """Per-component cost: sum of P[end] - P[start] over maximal runs."""
    P = prefix_sums(costs)
    per = [0.0] * n
    start = 0
    for i in range(1, len(costs) + 1):
        if i == len(costs) or assign[i] != assign[start]:
            per[assign[start]] += P[i] - P[start]
            start = i
    total = 0.0
    for value in per:  # plain left-to-right sum (builtin sum() may compensate)
        total += value
    return per, max(per), total / n


# ---------------------------------------------------------------- strategies

cost_value = st.one_of(
    st.integers(0, 4).map(float),  # many ties
    st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 0.1, 0.2, 0.3, 1e-300, 5e-324]),
)


@st.composite
def costs_and_n(draw, max_blocks=11):
    costs = draw(st.lists(cost_value, min_size=1, max_size=max_blocks))
    n = draw(st.integers(1, len(costs)))
    return costs, n


def check_contiguous(assign, n):
    assert assign.dtype == np.int32
    assert assign[0] == 0 and assign[-1] == n - 1
    steps = np.diff(assign.astype(np.int64))
    assert np.all((steps == 0) | (steps == 1))


# ---------------------------------------------------------------- tests

@SETTINGS
@given(costs_and_n())
def test_partition_is_optimal_and_valid(case):
    costs, n = case
    assign = _core.partition(costs, n)
    assert assign.shape == (len(costs),)
    check_contiguous(assign, n)
    _core.validate_assignment(assign, n)
    _, best, _ = _core.cost_summary(costs, assign, n)
    assert best == brute_best(costs, n)  # exact, not approximate


@SETTINGS
@given(costs_and_n(max_blocks=40))
def test_partition_tie_breaking_is_deterministic(case):
    costs, n = case
    first = _core.partition(costs, n)
    second = _core.partition(np.array(costs), n)
    np.testing.assert_array_equal(first, second)
    _, opt, _ = _core.cost_summary(costs, first, n)
    assert first.tolist() == tie_break_reference(costs, n, opt)


@SETTINGS
@given(costs_and_n(max_blocks=11))
def test_tie_breaking_matches_reference_from_brute_optimum(case):
    costs, n = case
    assert _core.partition(costs, n).tolist() == tie_break_reference(
        costs, n, brute_best(costs, n))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(cost_value, min_size=1, max_size=150), st.data())
def test_partition_medium_against_quadratic_dp(costs, data):
    n = data.draw(st.integers(1, min(len(costs), 12)))
    assign = _core.partition(costs, n)
    check_contiguous(assign, n)
    opt = quadratic_dp_best(costs, n)
    assert _core.cost_summary(costs, assign, n)[1] == opt
    assert assign.tolist() == tie_break_reference(costs, n, opt)


@st.composite
def costs_and_assignment(draw):
    costs = draw(st.lists(cost_value, min_size=1, max_size=30))
    n = draw(st.integers(1, len(costs)))
    # every component at least once, then anything, then shuffled
    extra = draw(st.lists(st.integers(0, n - 1), min_size=len(costs) - n,
                          max_size=len(costs) - n))
    assign = draw(st.permutations(list(range(n)) + extra))
    return costs, assign, n


@SETTINGS
@given(costs_and_assignment())
def test_cost_summary_matches_reference(case):
    costs, assign, n = case
    per, mx, mean = _core.cost_summary(costs, assign, n)
    ref_per, ref_max, ref_mean = summary_reference(costs, assign, n)
    assert isinstance(per, np.ndarray) and per.dtype == np.float64
    assert per.tolist() == ref_per
    assert mx == ref_max
    assert mean == ref_mean


@SETTINGS
@given(costs_and_assignment())
def test_validate_accepts_non_contiguous(case):
    _, assign, n = case
    assert _core.validate_assignment(assign, n) is None
    assert _core.validate_assignment(np.array(assign, dtype=np.int8), n) is None


@pytest.mark.parametrize("assign, n", [
    ([0, 0, 2, 2], 3),     # component 1 empty
    ([0, 1, 3], 3),        # value too large
    ([0, -1, 1], 2),       # negative
    ([0, 0, 0], 2),        # component 1 empty
    ([0], 2),              # more components than blocks
])
def test_validate_rejects(assign, n):
    with pytest.raises(ValueError) as info:
        _core.validate_assignment(assign, n)
    assert "assign" in str(info.value) or "n" in str(info.value)


def test_small_examples():
    assert _core.partition([1, 2, 3, 4, 5], 2).tolist() == [0, 0, 0, 1, 1]
    assert _core.partition([5], 1).tolist() == [0]
    assert _core.partition([0, 0, 0, 0, 0], 3).tolist() == [0, 1, 2, 2, 2]
    assert _core.partition([1, 1, 1, 1], 4).tolist() == [0, 1, 2, 3]
    # float64 rounding: 0.1 + 0.2 > 0.3, and the C side agrees
    costs = [0.1, 0.2, 0.3]
    assign = _core.partition(costs, 2)
    assert _core.cost_summary(costs, assign, 2)[1] == brute_best(costs, 2)


def test_large_partition_completes():
    rng = np.random.default_rng(1234)
    costs = rng.random(10_000)
    assign = _core.partition(costs, 8)
    check_contiguous(assign, 8)
    per, mx, mean = _core.cost_summary(costs, assign, 8)
    assert mx >= mean >= 0
    assert mx >= costs.max()
    # the optimum cannot beat the perfect split by more than one block
    assert mx <= costs.sum() / 8 + costs.max()
