"""Fuzzing of the asyncdiff._core bindings: wrong types, shapes, dtypes and
values must give TypeError / ValueError (OverflowError accepted for huge
ints) whose message names the argument -- never a crash, never a wrong
answer."""
import sys
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncdiff import _core

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ARG_ERRORS = (TypeError, ValueError, OverflowError)


def raises_naming(exc_types, name, fn, *args, **kwargs):
    with pytest.raises(exc_types) as info:
        fn(*args, **kwargs)
    assert name in str(info.value), f"{info.value!r} does not name {name!r}"
    return info.value


# ------------------------------------------------------------------ partition

@pytest.mark.parametrize("costs", [
    "abc", b"abc", None, {"a": 1}, [None, 1.0], [1.0, "x"], [1 + 2j],
    np.array([1 + 1j, 2]), np.array(["1", "2"]), np.array([True, False]),
    [True, False], np.array([1, 2], dtype=object), np.array(["2020-01-01"], dtype="M8[D]"),
    np.zeros(2, dtype=[("a", "f8")]), object(),
])
def test_partition_costs_wrong_type(costs):
    raises_naming(TypeError, "costs", _core.partition, costs, 1)


@pytest.mark.parametrize("costs", [
    5.0, 3, np.float64(2.0), np.zeros((2, 2)), [[1.0, 2.0]], [[1.0], [2.0, 3.0]],
    [], np.array([]),
])
def test_partition_costs_wrong_shape(costs):
    raises_naming(ValueError, "costs", _core.partition, costs, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0, -1e-300])
def test_partition_costs_bad_values(bad):
    exc = raises_naming(ValueError, "costs", _core.partition, [1.0, bad, 2.0], 1)
    assert exc.argument == "costs" and exc.status == "invalid_argument"


def test_partition_costs_sum_overflow():
    raises_naming(ValueError, "costs", _core.partition, [1e308, 1e308], 1)


@pytest.mark.parametrize("n", [1.0, 2.5, "2", None, [2], True, False, np.bool_(True),
                               np.float64(2.0), 1j])
def test_partition_n_wrong_type(n):
    raises_naming(TypeError, "n", _core.partition, [1.0, 2.0, 3.0], n)


@pytest.mark.parametrize("n", [0, -1, 4, 2**31, -2**31 - 1, 2**63, 2**64, 10**100,
                               -10**100])
def test_partition_n_bad_value(n):
    raises_naming((ValueError, OverflowError), "n", _core.partition, [1.0, 2.0, 3.0], n)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.longdouble,
                                   np.int8, np.uint8, np.int32, np.uint64, np.int64,
                                   ">f8", "<i4"])
def test_partition_accepts_numeric_dtypes(dtype):
    costs = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=dtype)
    expected = _core.partition([3.0, 1, 4, 1, 5, 9, 2, 6], 3)
    np.testing.assert_array_equal(_core.partition(costs, 3), expected)


def test_partition_accepts_views_and_numpy_ints():
    base = np.arange(20, dtype=np.float64)
    view = base[::2]
    np.testing.assert_array_equal(_core.partition(view, np.int64(3)),
                                  _core.partition(view.copy(), 3))
    assert _core.partition(costs=(1, 2, 3), n=2).tolist() == [0, 0, 1]
    before = base.copy()
    _core.partition(base, 4)
    np.testing.assert_array_equal(base, before)  # input untouched


def test_partition_missing_or_extra_args():
    with pytest.raises(TypeError):
        _core.partition([1.0])
    with pytest.raises(TypeError):
        _core.partition([1.0], 1, 2)
    with pytest.raises(TypeError):
        _core.partition([1.0], m=1)


# ------------------------------------------------------- assignment functions

@pytest.mark.parametrize("assign", [
    [0.0, 1.0], np.array([0, 1], dtype=np.float32), [True, False], "01", None,
    [None, 0], np.array([0, 1], dtype=object), [2**70, 0],
])
def test_validate_assign_wrong_type(assign):
    raises_naming(TypeError, "assign", _core.validate_assignment, assign, 2)


@pytest.mark.parametrize("assign", [
    0, [[0, 1]], [], [0, 2], [-1, 0, 1], np.array([2**40, 0, 1]),
    np.array([2**64 - 1, 0, 1], dtype=np.uint64), np.array([-2**63, 0, 1]),
])
def test_validate_assign_bad_value(assign):
    raises_naming(ValueError, "assign", _core.validate_assignment, assign, 2)


@pytest.mark.parametrize("n", [0, -5, 2**40, 10**30])
def test_validate_bad_n(n):
    raises_naming((ValueError, OverflowError), "n", _core.validate_assignment, [0, 1], n)


@pytest.mark.parametrize("n", [True, 1.0, "2", None])
def test_validate_n_wrong_type(n):
    raises_naming(TypeError, "n", _core.validate_assignment, [0, 1], n)


def test_cost_summary_errors():
    raises_naming(ValueError, "assign", _core.cost_summary, [1.0, 2.0], [0, 1, 1], 2)
    raises_naming(ValueError, "assign", _core.cost_summary, [1.0, 2.0], [0, 0], 2)
    raises_naming(ValueError, "costs", _core.cost_summary, [1.0, np.nan], [0, 1], 2)
    raises_naming(ValueError, "costs", _core.cost_summary, [], [], 1)
    raises_naming(ValueError, "n", _core.cost_summary, [1.0, 2.0], [0, 1], 0)
    raises_naming(ValueError, "n", _core.cost_summary, [1.0, 2.0], [0, 1], 3)
    raises_naming(TypeError, "n", _core.cost_summary, [1.0, 2.0], [0, 1], 2.0)
    raises_naming(TypeError, "costs", _core.cost_summary, "ab", [0, 1], 2)
    raises_naming(TypeError, "assign", _core.cost_summary, [1.0, 2.0], [0.0, 1.0], 2)
    per, mx, mean = _core.cost_summary([1.0, 2.0, 4.0], np.array([1, 0, 1], np.uint8), 2)
    assert per.tolist() == [2.0, 5.0] and mx == 5.0 and mean == 3.5
    assert isinstance(mx, float) and isinstance(mean, float)


# ------------------------------------------------------------------ Schedule

GOOD = dict(model_n=2, stride=2, warm_up=3, time_shift=False, steps=10)


@pytest.mark.parametrize("name, value, exc", [
    ("model_n", 0, ValueError), ("model_n", -3, ValueError),
    ("model_n", 2**31, ValueError), ("model_n", 10**40, ValueError),
    ("model_n", 2.0, TypeError), ("model_n", True, TypeError), ("model_n", None, TypeError),
    ("model_n", "2", TypeError),
    ("stride", 3, ValueError), ("stride", 0, ValueError), ("stride", -1, ValueError),
    ("stride", 1.0, TypeError), ("stride", False, TypeError),
    ("warm_up", 0, ValueError), ("warm_up", -1, ValueError), ("warm_up", 2**33, ValueError),
    ("warm_up", 1.5, TypeError),
    ("time_shift", 2, ValueError), ("time_shift", -1, ValueError),
    ("time_shift", "False", TypeError), ("time_shift", None, TypeError),
    ("time_shift", 0.0, TypeError), ("time_shift", 10**30, ValueError),
    ("steps", 0, ValueError), ("steps", -1, ValueError), ("steps", 2**64, ValueError),
    ("steps", 50.0, TypeError), ("steps", True, TypeError),
])
def test_schedule_bad_arguments(name, value, exc):
    kwargs = dict(GOOD, **{name: value})
    raises_naming(exc, name, _core.Schedule, **kwargs)


def test_schedule_accepts_flag_and_index_types():
    for ts in (True, False, 0, 1, np.bool_(True), np.int8(1)):
        s = _core.Schedule(2, 1, 1, ts, 5)
        assert s.time_shift is bool(ts)
    s = _core.Schedule(np.int64(3), np.int32(2), np.uint8(9), False, np.int64(50))
    assert s.world_size == 4


@pytest.mark.parametrize("rank, k, name, exc", [
    (3, 0, "rank", ValueError), (-1, 0, "rank", ValueError), (2**31, 0, "rank", ValueError),
    (10**50, 0, "rank", ValueError), (0, 10, "k", ValueError), (0, -1, "k", ValueError),
    (0, 2**63, "k", ValueError), (0, -10**50, "k", ValueError),
    (0.0, 0, "rank", TypeError), (True, 0, "rank", TypeError), (None, 0, "rank", TypeError),
    (0, "1", "k", TypeError), (0, 1.0, "k", TypeError), (0, False, "k", TypeError),
    (0, np.bool_(False), "k", TypeError),
])
def test_plan_bad_arguments(rank, k, name, exc):
    s = _core.Schedule(**GOOD)
    raises_naming(exc, name, s.plan, rank, k)


def test_plan_call_forms():
    s = _core.Schedule(**GOOD)
    want = s.plan(1, 4)
    assert s.plan(1, k=4) == want
    assert s.plan(rank=1, k=4) == want
    assert s.plan(k=4, rank=1) == want
    assert s.plan(np.int64(1), np.int16(4)) == want
    for args, kwargs in [((), {}), ((1,), {}), ((1, 2, 3), {}), ((1,), {"rank": 1}),
                         ((1, 2), {"k": 2}), ((1, 2), {"x": 1}), ((), {"k": 1}),
                         ((), {"rank": 1})]:
        with pytest.raises(TypeError):
            s.plan(*args, **kwargs)


@pytest.mark.parametrize("rank, exc", [
    (3, ValueError), (-1, ValueError), (2**31, ValueError), (10**40, ValueError),
    (1.0, TypeError), (True, TypeError), (None, TypeError), ("0", TypeError),
])
def test_component_of_bad_arguments(rank, exc):
    raises_naming(exc, "rank", _core.Schedule(**GOOD).component_of, rank)


def test_component_of_call_forms():
    s = _core.Schedule(**GOOD)
    assert s.component_of(2) == s.component_of(rank=2) == s.component_of(np.int8(2)) == 1
    for args, kwargs in [((), {}), ((1, 2), {}), ((1,), {"rank": 1}), ((), {"r": 1})]:
        with pytest.raises(TypeError):
            s.component_of(*args, **kwargs)


# A valid receives() call for GOOD (model_n=2): units 0, 1 of component 0,
# units 2, 3 of component 1, unit 3 the final one.
OWNER = [0, 0, 1, 1]
READS = np.eye(4, k=-1, dtype=bool)
FINAL = 3


@pytest.mark.parametrize("name, value, exc", [
    ("owner", [0.0, 0.0, 1.0, 1.0], TypeError), ("owner", [True, False, True, True], TypeError),
    ("owner", "0011", TypeError), ("owner", None, TypeError), ("owner", [None] * 4, TypeError),
    ("owner", np.array(OWNER, dtype=object), TypeError), ("owner", [2**70, 0, 1, 1], TypeError),
    ("owner", 0, ValueError), ("owner", [OWNER], ValueError), ("owner", [], ValueError),
    ("owner", [0, 2, 1, 1], ValueError), ("owner", [-1, 0, 1, 1], ValueError),
    ("owner", [0, 0, 0, 1, 1], ValueError), ("owner", [1, 1, 1, 1], ValueError),
    ("owner", np.array([2**40, 0, 1, 1]), ValueError),
    ("owner", np.array([2**64 - 1, 0, 1, 1], dtype=np.uint64), ValueError),
    ("reads", np.eye(4), TypeError), ("reads", [[0.5] * 4] * 4, TypeError), ("reads", "abcd", TypeError),
    ("reads", None, TypeError), ("reads", np.zeros((4, 4), dtype=object), TypeError),
    ("reads", np.zeros((4, 4), dtype=complex), TypeError),
    ("reads", [1, 0, 0, 0], ValueError), ("reads", np.zeros((4, 4, 1), bool), ValueError),
    ("reads", np.zeros((3, 4), bool), ValueError), ("reads", np.zeros((4, 5), bool), ValueError),
    ("reads", [], ValueError), ("reads", np.zeros((0, 0), bool), ValueError),
    ("reads", np.full((4, 4), 2), ValueError), ("reads", np.full((4, 4), -1), ValueError),
    ("reads", np.full((4, 4), 255, dtype=np.uint8), ValueError),
    ("reads", np.full((4, 4), 2**64 - 1, dtype=np.uint64), ValueError),
    ("final", 4, ValueError), ("final", -1, ValueError), ("final", 10**30, ValueError),
    ("final", 0, ValueError),  # owned by component 0, not by the last one
    ("final", 3.0, TypeError), ("final", True, TypeError), ("final", None, TypeError),
    ("final", "3", TypeError),
])
def test_receives_bad_arguments(name, value, exc):
    kwargs = dict(owner=OWNER, reads=READS, final=FINAL)
    kwargs[name] = value
    raises_naming(exc, name, _core.Schedule(**GOOD).receives, **kwargs)


def test_receives_accepts_dtypes_and_views():
    s = _core.Schedule(**GOOD)
    want = s.receives(OWNER, READS, FINAL)
    for dtype in (np.int8, np.uint8, np.int32, np.uint64, ">i8"):
        assert s.receives(np.array(OWNER, dtype=dtype), READS.astype(dtype), np.int16(FINAL)) == want
    wide = np.zeros((4, 8), dtype=bool)
    wide[:, ::2] = READS
    assert s.receives(np.repeat(OWNER, 2)[::2], wide[:, ::2], FINAL) == want  # strided views
    assert s.receives(owner=OWNER, final=FINAL, reads=READS.tolist()) == want
    for args, kwargs in [((OWNER, READS), {}), ((OWNER, READS, FINAL, 1), {}),
                         ((OWNER, READS), {"last": FINAL})]:
        with pytest.raises(TypeError):
            s.receives(*args, **kwargs)


def test_schedule_type_is_final_and_missing_args():
    with pytest.raises(TypeError):
        class Sub(_core.Schedule):  # noqa: F841
            pass
    with pytest.raises(TypeError):
        _core.Schedule(2, 1, 1, False)
    with pytest.raises(TypeError):
        _core.Schedule(2, 1, 1, False, 5, bogus=1)


def test_exception_types():
    assert issubclass(_core.AsyncDiffError, RuntimeError)
    assert _core.AsyncDiffError.__module__ == "asyncdiff._core"
    exc = raises_naming(ValueError, "stride", _core.Schedule, 2, 3, 1, False, 5)
    assert exc.status == "invalid_argument" and exc.argument == "stride"


# ------------------------------------------------------------- random objects

def anything():
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
        st.floats(), st.complex_numbers(), st.text(max_size=5), st.binary(max_size=5),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=5),
                                st.tuples(inner, inner),
                                st.dictionaries(st.text(max_size=2), inner, max_size=3)),
        max_leaves=8,
    ) | st.builds(np.array, st.lists(st.floats(), max_size=6)) \
      | st.builds(np.array, st.lists(st.integers(-2**63, 2**63 - 1), max_size=6))


def call_fuzzed(fn, names, *args):
    try:
        fn(*args)
    except ARG_ERRORS as exc:
        assert any(name in str(exc) for name in names), repr(exc)


@SETTINGS
@given(anything(), anything())
def test_fuzz_partition(costs, n):
    call_fuzzed(_core.partition, ("costs", "n"), costs, n)


@SETTINGS
@given(anything(), anything())
def test_fuzz_validate_assignment(assign, n):
    call_fuzzed(_core.validate_assignment, ("assign", "n"), assign, n)


@SETTINGS
@given(anything(), anything(), anything())
def test_fuzz_cost_summary(costs, assign, n):
    call_fuzzed(_core.cost_summary, ("costs", "assign", "n"), costs, assign, n)


@SETTINGS
@given(st.lists(st.one_of(anything(), st.integers(-3, 60)), min_size=5, max_size=5))
def test_fuzz_schedule(args):
    call_fuzzed(_core.Schedule, ("model_n", "stride", "warm_up", "time_shift", "steps"),
                *args)


@SETTINGS
@given(st.one_of(anything(), st.integers(-3, 5)), st.one_of(anything(), st.integers(-3, 12)))
def test_fuzz_plan(rank, k):
    call_fuzzed(_core.Schedule(**GOOD).plan, ("rank", "k"), rank, k)


@SETTINGS
@given(st.one_of(anything(), st.integers(-3, 5)))
def test_fuzz_component_of(rank):
    call_fuzzed(_core.Schedule(**GOOD).component_of, ("rank",), rank)


@SETTINGS
@given(st.one_of(anything(), st.lists(st.integers(-1, 2), max_size=5)),
       st.one_of(anything(), st.lists(st.lists(st.integers(-1, 2), max_size=5), max_size=5)),
       st.one_of(anything(), st.integers(-1, 5)))
def test_fuzz_receives(owner, reads, final):
    call_fuzzed(_core.Schedule(**GOOD).receives, ("owner", "reads", "final"), owner, reads, final)


# ----------------------------------------------------- GIL release and leaks

def test_partition_from_threads():
    rng = np.random.default_rng(7)
    inputs = [rng.random(3000) for _ in range(4)]
    expected = [_core.partition(c, 6) for c in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = _core.partition(inputs[i], 6)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def _error_paths():
    s = _core.Schedule(**GOOD)
    for fn in (lambda: _core.partition([1.0, np.nan], 1),
               lambda: _core.partition("x", 1),
               lambda: _core.partition([[1.0], [1.0, 2.0]], 1),
               lambda: _core.partition([1.0], 2),
               lambda: _core.validate_assignment([0, 2**40], 2),
               lambda: _core.cost_summary([1.0], [0, 0], 1),
               lambda: s.plan(9, 0),
               lambda: s.component_of(7),
               lambda: s.receives([0, 0, 1, 1], np.ones((4, 3), bool), 3),
               lambda: s.receives([0, 0, 1, 1], [[2] * 4] * 4, 3),
               lambda: s.receives([0.0, 1.0], READS, 3),
               lambda: s.receives(OWNER, READS, 0),
               lambda: _core.Schedule(2, 3, 1, False, 5)):
        try:
            fn()
        except ARG_ERRORS:
            pass
    _core.partition(np.arange(50.0), 4)
    _core.cost_summary(np.arange(4.0), [0, 1, 1, 0], 2)
    s.plan(1, 3)
    s.receives(OWNER, READS, FINAL)


@pytest.mark.skipif(hasattr(sys, "pypy_version_info"), reason="CPython allocator")
def test_no_leak_on_repeated_calls():
    for _ in range(200):  # warm caches (interned strings, numpy internals)
        _error_paths()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            _error_paths()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 3000 rounds x ~17 calls: a leak of even one small object per call
    # would be far above this.
    assert grown < 200_000, grown
