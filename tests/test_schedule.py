"""The C schedule (asyncdiff._core.Schedule) against docs/design.md §3.

Four independent checks:
  1. a pure-Python reference written from the design's prose, compared field
     by field for every rank and call over a grid of configurations;
  2. a data-flow simulation: every rank keeps a cache of block outputs, the
     plans are executed symbolically, and the design's promises (what a sync
     delivers, which timestep the output was computed with, that every
     published output is read and every read was published) are checked;
  3. a few plans written out by hand from the design text;
  4. Schedule.receives (what each rank receives at a delivery) against a
     reference of the rule on random splits and read graphs.
"""
import itertools
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncdiff import _core

FIELDS = ("warmup", "sync", "compute_all", "compute_component", "store",
          "publish", "exchange", "timestep_index", "result_rank", "receive",
          "result_cached")


# --------------------------------------------------------------------------
# 1. Reference from the prose of docs/design.md §3
# --------------------------------------------------------------------------

def call_kind(k, N, S, W):
    """'warmup', 'stride1', 'compute' (stride 2, odd) or 'sync' (stride 2, even)."""
    if k < W:
        return "warmup"
    if S == 1:
        return "stride1"
    return "compute" if k % 2 == 1 else "sync"


def starts_with_sync(k, N, S, W):
    return call_kind(k, N, S, W) in ("stride1", "sync")


def reference_plan(N, S, W, ts, L, r, k):
    kind = call_kind(k, N, S, W)
    shift = 1 if ts else 0
    # Outputs stored at call k are read by others only at the next call's
    # sync, if there is a next call and it syncs.
    read_next = k + 1 < L and starts_with_sync(k + 1, N, S, W)
    plan = dict(warmup=False, sync=False, compute_all=False,
                compute_component=-1, store=False, publish=False,
                exchange=False, timestep_index=k, result_rank=-1,
                receive=False, result_cached=False)
    if kind == "warmup":
        # "every rank computes every block. At k = W - 1 every rank stores"
        stores = k == W - 1
        plan.update(warmup=True, compute_all=True, store=stores,
                    publish=stores and read_next and r < N,
                    exchange=stores and read_next,
                    receive=stores and read_next)
    elif kind == "stride1":
        # sync; rank r computes component r with T[k] (T[k-1] with time
        # shift) and stores; result from the owner of the final block.
        plan.update(sync=True, compute_component=r, store=True,
                    publish=read_next, exchange=True, receive=read_next,
                    timestep_index=k - shift, result_rank=N - 1)
    elif kind == "compute":
        if r < N:
            t = k - shift if k == L - 1 else k + 1 - shift
            plan.update(compute_component=r, store=True, publish=read_next,
                        timestep_index=t)
        else:  # extra rank: component N-1, T[k - ts], stores nothing
            plan.update(compute_component=N - 1, timestep_index=k - shift)
        # the owners' outputs reach everyone at this event, the extra rank
        # included, when the next (sync) call reads them
        plan.update(exchange=True, result_rank=N, receive=read_next)
    else:  # stride-2 sync call: sync only, nothing computes, no exchange;
        # the output is the final block replayed from the cache
        plan.update(sync=True, result_cached=True)
    return plan


def as_dict(plan):
    return {name: getattr(plan, name) for name in FIELDS}


GRID_L = (1, 2, 3, 5, 8, 13)


def configurations():
    for N, S, L, ts in itertools.product(range(1, 9), (1, 2), GRID_L, (False, True)):
        for W in range(1, L + 2):  # W = L + 1: warm-up covers every call
            yield N, S, W, ts, L


def test_against_reference_for_every_rank_and_call():
    checked = 0
    for N, S, W, ts, L in configurations():
        sched = _core.Schedule(N, S, W, ts, L)
        assert sched.world_size == N + S - 1
        for k in range(L):
            for r in range(N + S - 1):
                got = as_dict(sched.plan(r, k))
                want = reference_plan(N, S, W, ts, L, r, k)
                assert got == want, (N, S, W, ts, L, r, k)
                checked += 1
    assert checked > 10_000


# --------------------------------------------------------------------------
# 2. Data-flow simulation
# --------------------------------------------------------------------------

def simulate(N, S, W, ts, L):
    """Run the plans of all ranks symbolically; assert the design's promises.

    A cached block output is a tuple (component, call, timestep_index, rank)
    telling who produced it when.  Components stand for their blocks.
    """
    M = N + S - 1
    sched = _core.Schedule(N, S, W, ts, L)
    cache = [[None] * N for _ in range(M)]
    published = [None] * N   # what each owner made available for a sync
    unread = set()           # owners whose publication was not read yet
    outputs = []
    for k in range(L):
        plans = [sched.plan(r, k) for r in range(M)]
        p0 = plans[0]
        for p in plans:  # collective decisions agree across ranks
            assert (p.sync, p.exchange, p.result_rank, p.warmup, p.receive, p.result_cached) == \
                (p0.sync, p0.exchange, p0.result_rank, p0.warmup, p0.receive, p0.result_cached)
        # a delivery happens exactly when an owner publishes
        assert p0.receive == any(p.publish for p in plans[:N])
        # in the async phase each rank computes the component the schedule names
        for r, p in enumerate(plans):
            if p.compute_component >= 0:
                assert p.compute_component == sched.component_of(r)

        if p0.sync:
            # Each cached output is replaced by its owner's, which the owner
            # computed at call k - 1 and published.
            for c in range(N):
                assert published[c] is not None, (k, c)
                assert published[c][1] == k - 1, (k, c, published[c])
                for r in range(M):
                    cache[r][c] = published[c]
            unread.clear()
        assert not unread, f"published at call {k-1} but never read: {unread}"

        produced = [None] * M  # each rank's denoiser output this call
        for r, p in enumerate(plans):
            if p.compute_all:
                # every rank computes the same thing: no rank in the tag
                made = [(c, k, p.timestep_index, None) for c in range(N)]
                if p.store:
                    cache[r] = list(made)
                produced[r] = made[N - 1]
            elif p.compute_component >= 0:
                c = p.compute_component
                made = (c, k, p.timestep_index, r)
                if p.store:
                    cache[r][c] = made
                # the final block's output: own if computed, else replayed
                produced[r] = made if c == N - 1 else cache[r][N - 1]
            else:
                produced[r] = cache[r][N - 1]  # pure replay
            if p.publish:
                assert p.store and r < N
                published[r] = cache[r][r]
                unread.add(r)

        if p0.result_cached:
            # nothing computed: every rank's output is its replayed final block
            assert p0.result_rank == -1
            assert all(p.compute_component == -1 and not p.compute_all for p in plans)
            assert produced == [cache[r][N - 1] for r in range(M)]
        if p0.result_rank >= 0:
            produced = [produced[p0.result_rank]] * M
        assert all(x == produced[0] for x in produced), (k, produced)
        any_publish = any(p.publish for p in plans)
        assert p0.exchange == (any_publish or p0.result_rank >= 0)
        outputs.append(produced[0])
    assert not unread
    return outputs


def test_simulated_data_flow():
    for N, S, W, ts, L in configurations():
        out = simulate(N, S, W, ts, L)
        shift = 1 if ts else 0
        for k, (comp, call, t, rank) in enumerate(out):
            assert comp == N - 1
            if k < W:
                assert (call, t) == (k, k)
            elif S == 1:
                # result from rank N-1, computed now with T[k - ts]
                assert (call, t, rank) == (k, k - shift, N - 1)
            elif k % 2 == 1:
                # result from the extra rank, computed now with T[k - ts]
                assert (call, t, rank) == (k, k - shift, N)
            elif k == W:
                # even W: reuse of the last warm-up output
                assert (call, t) == (k - 1, k - 1)
            else:
                # the final block computed by its owner at k-1 with T[k]
                # (T[k - ts] looked one step ahead from call k - 1)
                assert (call, rank) == (k - 1, N - 1)
                assert t == k - shift


# --------------------------------------------------------------------------
# 3. Hand-written plans
# --------------------------------------------------------------------------

def P(**kw):
    base = dict(warmup=False, sync=False, compute_all=False,
                compute_component=-1, store=False, publish=False,
                exchange=False, timestep_index=0, result_rank=-1,
                receive=False, result_cached=False)
    base.update(kw)
    return base


@pytest.mark.parametrize("config, rank, k, expected", [
    # N=2, S=1, W=1, L=50: first call is the whole warm-up.
    ((2, 1, 1, False, 50), 0, 0,
     P(warmup=True, compute_all=True, store=True, publish=True, exchange=True,
       receive=True)),
    ((2, 1, 1, False, 50), 1, 10,
     P(sync=True, compute_component=1, store=True, publish=True, exchange=True,
       timestep_index=10, result_rank=1, receive=True)),
    # time shift uses T[k-1]; the last call publishes nothing
    ((2, 1, 1, True, 50), 0, 49,
     P(sync=True, compute_component=0, store=True, exchange=True,
       timestep_index=48, result_rank=1)),
    # N=3, S=2, W=9, L=50: rank 3 is the extra rank.
    ((3, 2, 9, False, 50), 0, 8,
     P(warmup=True, compute_all=True, store=True, timestep_index=8)),
    ((3, 2, 9, False, 50), 1, 9,
     P(compute_component=1, store=True, publish=True, exchange=True,
       timestep_index=10, result_rank=3, receive=True)),
    ((3, 2, 9, True, 50), 3, 9,
     P(compute_component=2, exchange=True, timestep_index=8, result_rank=3,
       receive=True)),
    ((3, 2, 9, False, 50), 2, 10, P(sync=True, timestep_index=10, result_cached=True)),
    ((3, 2, 9, True, 50), 0, 49,
     P(compute_component=0, store=True, exchange=True, timestep_index=48,
       result_rank=3)),
    # even W with stride 2: call W is a sync call fed by the warm-up stores
    ((2, 2, 4, False, 10), 1, 3,
     P(warmup=True, compute_all=True, store=True, publish=True, exchange=True,
       timestep_index=3, receive=True)),
    ((2, 2, 4, False, 10), 2, 3,
     P(warmup=True, compute_all=True, store=True, exchange=True, timestep_index=3,
       receive=True)),
    ((2, 2, 4, False, 10), 0, 4, P(sync=True, timestep_index=4, result_cached=True)),
    # W >= L: the plain pipeline, nothing moves
    ((4, 1, 50, False, 50), 3, 49,
     P(warmup=True, compute_all=True, store=True, timestep_index=49)),
])
def test_hand_written(config, rank, k, expected):
    assert as_dict(_core.Schedule(*config).plan(rank, k)) == expected


def test_plan_fields_and_types():
    plan = _core.Schedule(2, 2, 3, True, 8).plan(rank=2, k=5)
    assert isinstance(plan, _core.Plan) and isinstance(plan, tuple)
    assert len(plan) == len(FIELDS)
    assert tuple(plan) == tuple(getattr(plan, f) for f in FIELDS)
    for name in ("warmup", "sync", "compute_all", "store", "publish", "exchange", "receive",
                 "result_cached"):
        assert type(getattr(plan, name)) is bool
    for name in ("compute_component", "timestep_index", "result_rank"):
        assert type(getattr(plan, name)) is int


def test_schedule_attributes():
    s = _core.Schedule(model_n=3, stride=2, warm_up=9, time_shift=True, steps=50)
    assert (s.model_n, s.stride, s.warm_up, s.time_shift, s.steps, s.world_size) == \
        (3, 2, 9, True, 50, 4)
    assert s.time_shift is True
    assert "model_n=3" in repr(s) and "time_shift=True" in repr(s)
    for name in ("model_n", "stride", "warm_up", "time_shift", "steps", "world_size"):
        with pytest.raises(AttributeError):
            setattr(s, name, 1)


def test_pickle_round_trip():
    s = _core.Schedule(3, 2, 9, True, 50)
    s2 = pickle.loads(pickle.dumps(s))
    assert repr(s2) == repr(s)
    plan = s.plan(3, 11)
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_plan_field_order_is_stable():
    """New fields come after the old ones: positional readers keep working."""
    assert _core.Plan.n_fields == len(FIELDS)
    plan = _core.Schedule(2, 1, 1, False, 5).plan(1, 2)
    assert tuple(plan) == tuple(getattr(plan, f) for f in FIELDS)


# --------------------------------------------------------------------------
# 4. Who computes what, and what each rank receives
# --------------------------------------------------------------------------

def test_component_of():
    for N, S in itertools.product(range(1, 9), (1, 2)):
        sched = _core.Schedule(N, S, 1, False, 4)
        got = [sched.component_of(r) for r in range(N + S - 1)]
        assert got == [min(r, N - 1) for r in range(N + S - 1)]
        assert sched.component_of(rank=N - 1) == N - 1
        for bad in (-1, N + S - 1):
            with pytest.raises(ValueError, match="rank"):
                sched.component_of(bad)


def reference_receives(N, S, owner, reads, final):
    """The rule of Schedule.receives, written out with sets."""
    U = len(owner)
    out = []
    for rank in range(N + S - 1):
        c = min(rank, N - 1)  # the extra rank of stride 2 computes the last component
        computed = {u for u in range(U) if owner[u] == c}
        wanted = set().union(*({v for v in range(U) if reads[u][v]} for u in computed)) - computed
        if S == 2 and owner[final] != rank:
            wanted.add(final)  # a sync call's output is the replayed final unit
        mine = {u for u in range(U) if owner[u] == rank} if rank < N else set()
        out.append(tuple(sorted(wanted - mine)))
    return tuple(out)


@st.composite
def splits(draw):
    """(N, S, owner, reads, final) with every component owning a unit and the
    final unit owned by the last component."""
    N = draw(st.integers(1, 5))
    S = draw(st.sampled_from((1, 2)))
    U = draw(st.integers(N, 12))
    owner = list(range(N)) + draw(st.lists(st.integers(0, N - 1), min_size=U - N, max_size=U - N))
    owner = draw(st.permutations(owner))
    final = draw(st.sampled_from([u for u in range(U) if owner[u] == N - 1]))
    reads = draw(st.lists(st.lists(st.booleans(), min_size=U, max_size=U), min_size=U, max_size=U))
    return N, S, owner, reads, final


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(splits(), st.sampled_from(("list", "bool", "uint8", "int64")))
def test_receives_against_reference(split, kind):
    N, S, owner, reads, final = split
    want = reference_receives(N, S, owner, reads, final)
    if kind == "list":
        reads_arg = reads
    else:
        reads_arg = np.array(reads, dtype=kind)
    sched = _core.Schedule(N, S, 3, True, 20)
    got = sched.receives(np.array(owner, dtype=np.int64), reads_arg, final)
    assert got == want
    assert all(type(u) is int for row in got for u in row)
    # independent of warm_up, time_shift and steps
    assert _core.Schedule(N, S, 1, False, 1).receives(owner, reads, final=final) == want


def test_receives_examples():
    # four units in a chain (unit u reads unit u - 1); components {0, 1} and {2, 3}
    owner, final = [0, 0, 1, 1], 3
    chain = np.eye(4, k=-1, dtype=bool)
    assert _core.Schedule(2, 1, 1, False, 5).receives(owner, chain, final) == ((), (1,))
    # stride 2: everyone but the final unit's owner also needs the final unit
    assert _core.Schedule(2, 2, 1, False, 5).receives(owner, chain, final) == ((3,), (1,), (1, 3))
    # one component: nothing moves with stride 1; with stride 2 the extra rank
    # computes every unit too but, owning none, receives the final one
    assert _core.Schedule(1, 1, 1, False, 5).receives([0, 0], np.ones((2, 2), bool), 1) == ((),)
    assert _core.Schedule(1, 2, 1, False, 5).receives([0, 0], np.ones((2, 2), bool), 1) == ((), (1,))
