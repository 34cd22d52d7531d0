"""The exchange plan: what each rank receives (traced, minimal, the same in every dtype)
and the moves of one event."""

import functools
import warnings

import pytest
import torch

from asyncdiff import _core, arch, splits
from asyncdiff.config import AsyncDiffConfig
from asyncdiff.exchange import RESULT, ExchangePlan, Slots
from asyncdiff.testing import tiny


@functools.lru_cache(maxsize=None)
def denoiser_call(arch_name, dtype=torch.float32):
    """The tiny pipeline and the arguments of its denoiser's first call."""
    pipe = tiny.build_pipeline(arch_name, dtype=dtype)
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    seen = {}
    handle = den.register_forward_pre_hook(lambda _m, a, k: seen.setdefault("call", (a, k)), with_kwargs=True)
    kw = tiny.default_call_kwargs(arch_name)
    kw["num_inference_steps"] = 1
    try:
        pipe(**kw)
    finally:
        handle.remove()
    return den, *seen["call"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch_name", ["sd15", "sdxl", "svd"])
@pytest.mark.parametrize("n,stride", [(2, 1), (3, 2), (4, 1)])
def test_trace_is_minimal_and_dtype_independent(arch_name, n, stride):
    results = {}
    dtypes = (torch.float32, torch.float16) if arch_name != "svd" else (torch.float32,)
    for dtype in dtypes:
        den, args, kwargs = denoiser_call(arch_name, dtype)
        layout = arch.describe(den)
        split = splits.resolve_static(layout, n, "paper")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to "send everything"
            results[dtype] = ExchangePlan.trace(AsyncDiffConfig(n, stride), layout, split, den, args, kwargs).receives
    assert all(r == results[torch.float32] for r in results.values())
    needs = results[torch.float32]
    full = ExchangePlan.everything(split, n + stride - 1, n).receives
    owner = split.owner
    for rank, units in needs.items():
        assert set(units) <= set(full[rank])  # never a unit the rank owns
        if stride == 2 and owner[layout.final] != rank:
            assert layout.final in units  # a sync call returns the replayed final unit
    # the first component reads nothing: its inputs are the denoiser's own
    if owner.get("conv_in") == 0 and stride == 1:
        assert needs[0] == ()
    assert sum(map(len, needs.values())) < sum(map(len, full.values()))


def test_untraceable_model_falls_back_loudly():
    den, args, kwargs = denoiser_call("sd15")
    layout = arch.describe(den)
    split = splits.resolve_static(layout, 2, "paper")
    with pytest.warns(RuntimeWarning, match="every rank receives"):
        got = ExchangePlan.trace(AsyncDiffConfig(2, 1), layout, split, den, args[:1], {})  # a call that cannot run
    assert got.receives == ExchangePlan.everything(split, 2, 2).receives


@pytest.mark.parametrize("n,stride", [(2, 1), (3, 1), (2, 2), (3, 2)])
def test_event_moves_match_the_plan_on_every_rank(n, stride):
    """Every receive has a matching send at the same offset, and the moves
    follow the schedule's plan alone: publishers send, receivers receive when
    owners deliver, the result rank hands out the result."""
    den, args, kwargs = denoiser_call("sd15")
    layout = arch.describe(den)
    split = splits.resolve_static(layout, n, "paper")
    xplan = ExchangePlan.trace(AsyncDiffConfig(n, stride), layout, split, den, args, kwargs)
    shapes = {u: [((2, 4, 8, 8), torch.float32)] * (1 + i % 2) for i, u in enumerate(split.owner)}
    slots = Slots(shapes, ((2, 4, 16, 16), torch.float16))
    offsets = sorted(off for entries in slots.of.values() for off, _ in entries)
    assert all(off % 64 == 0 for off in offsets) and len(set(offsets)) == len(offsets)
    steps, world = 7, n + stride - 1
    schedule = _core.Schedule(n, stride, 1, 0, steps)
    for k in range(steps):
        plans = [schedule.plan(r, k) for r in range(world)]
        moves = [xplan.event(r, plans[r], slots) for r in range(world)]
        sent = {(m.offset, dst) for r, (sends, _) in enumerate(moves) for m in sends for dst in m.peers}
        got = {(m.offset, r) for r, (_, recvs) in enumerate(moves) for m in recvs}
        assert got == sent, k
        for r, (sends, recvs) in enumerate(moves):
            assert bool(sends or recvs) <= bool(plans[r].exchange)
            units_sent = {m.unit for m in sends} - {RESULT}
            assert units_sent <= set(split.components[r] if r < n and plans[r].publish else ())
            assert {m.unit for m in recvs} - {RESULT} == (set(xplan.receives[r]) if plans[r].receive else set())
            assert (RESULT in {m.unit for m in sends}) == (plans[r].result_rank == r)
