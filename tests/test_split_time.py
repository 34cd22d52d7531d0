"""The split balanced on measured time (``split="time"``, ``splits.count_times``).

Tiny denoisers only: each measurement is a couple of forwards of a model
with a few million parameters.  Timing values are never compared (they are
noise on a busy machine); what is checked is the shape of the answer, the
cache, and that the timing forwards leave nothing behind.
"""

import pytest
import torch

from asyncdiff import AsyncDiff, splits
from asyncdiff.arch import describe
from asyncdiff.testing import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    return tiny.build_unet("sd15", seed=0)


def inputs(model, side=16, batch=2):
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    args = (torch.randn(batch, cfg.in_channels, side, side, generator=gen), torch.full((batch,), 500))
    kwargs = {"encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen)}
    return args, kwargs


def hooks_left(model):
    return [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs
            or m._forward_pre_hooks_with_kwargs]


def test_every_fine_unit_once_in_the_probes_order_with_positive_times(unet):
    layout = describe(unet)
    args, kwargs = inputs(unet)
    order, costs = splits.count_times(layout, unet, args, kwargs, threads=1)
    flop_order, _ = splits.count_costs(layout, unet, args, kwargs)
    assert order == flop_order
    assert sorted(order) == sorted(layout.fine_units()) and len(set(order)) == len(order)
    assert len(costs) == len(order)
    assert all(isinstance(c, float) and c > 0 for c in costs)
    assert sum(costs) < 60  # seconds: a sanity bound, not a measurement


def test_cached_per_shapes_and_threads(unet):
    layout = describe(unet)
    args, kwargs = inputs(unet)
    first = splits.count_times(layout, unet, args, kwargs, threads=1)
    again_args, again_kwargs = inputs(unet)  # new tensors, same shapes
    assert splits.count_times(layout, unet, again_args, again_kwargs, threads=1) is first
    small_args, small_kwargs = inputs(unet, side=8)
    other = splits.count_times(layout, unet, small_args, small_kwargs, threads=1)
    assert other is not first and other[0] == first[0]
    assert splits.count_times(layout, unet, small_args, small_kwargs, threads=1) is other
    assert splits.count_times(layout, unet, args, kwargs, threads=2) is not first


def test_no_hooks_no_state_left_threads_restored(unet):
    layout = describe(unet)
    args, kwargs = inputs(unet, side=24)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    attrs = set(unet.__dict__)
    rng = torch.get_rng_state()
    torch.set_num_threads(2)
    try:
        splits.count_times(layout, unet, args, kwargs, threads=1, repeat=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert hooks_left(unet) == []
    assert set(unet.__dict__) == attrs
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert not unet.training  # the mode is the caller's


def test_hooks_removed_when_the_forward_fails(unet):
    layout = describe(unet)
    args, kwargs = inputs(unet, side=12)

    def failing(*a, **k):
        unet(*a, **k)
        raise RuntimeError("boom")

    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="boom"):
        splits.count_times(layout, unet, args, kwargs, forward=failing, threads=2)
    assert hooks_left(unet) == []
    assert torch.get_num_threads() == 1


def test_forward_is_the_one_measured(unet):
    layout = describe(unet)
    args, kwargs = inputs(unet, side=20)
    calls = []

    def forward(*a, **k):
        calls.append(len(a))
        return type(unet).forward(unet, *a, **k)

    order, costs = splits.count_times(layout, unet, args, kwargs, forward=forward, threads=1, repeat=3)
    assert calls == [2, 2, 2]
    assert sorted(order) == sorted(layout.fine_units()) and all(c > 0 for c in costs)


def test_bad_arguments(unet):
    layout = describe(unet)
    args, kwargs = inputs(unet)
    with pytest.raises(ValueError, match="threads"):
        splits.count_times(layout, unet, args, kwargs, threads=0)
    with pytest.raises(ValueError, match="repeat"):
        splits.count_times(layout, unet, args, kwargs, repeat=0)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_auto_with_time_source_is_a_valid_split(unet, n):
    layout = describe(unet)
    args, kwargs = inputs(unet)
    order, costs = splits.count_times(layout, unet, args, kwargs, threads=1)
    split = splits.auto(layout, n, order, costs, source="time")
    assert split.source == "time" and len(split.components) == n
    assert split.costs == dict(zip(order, costs))
    again = splits.validate(layout, split.components, n, "explicit")  # every rule holds
    assert again.components == split.components


@pytest.mark.parametrize("n", [2, 3, 5])
def test_time_and_auto_share_the_partitioner(unet, n):
    layout = describe(unet)
    order, flops = splits.count_costs(layout, unet, *inputs(unet))
    costs = [float(1 + (i * 7919) % 13) * f for i, f in enumerate(flops)]  # any fixed vector
    by_time = splits.auto(layout, n, order, costs, source="time")
    by_auto = splits.auto(layout, n, order, costs)
    assert by_time.components == by_auto.components
    assert (by_time.source, by_auto.source) == ("time", "auto")
    assert splits.component_costs(layout, by_time, order, costs) == splits.component_costs(layout, by_auto, order,
                                                                                           costs)


def test_time_is_decided_at_the_first_call(unet):
    layout = describe(unet)
    assert splits.resolve_static(layout, 2, "time") is None
    assert splits.resolve_static(layout, 2, "auto") is None


@pytest.mark.parametrize("word", ["tiem", "Time", "flops", "preset-ish"])
def test_a_misspelt_split_is_a_clear_error(unet, word):
    layout = describe(unet)
    with pytest.raises(ValueError, match=r"split: unknown value .*'time'"):
        splits.resolve_static(layout, 2, word)


def test_a_misspelt_split_is_refused_by_asyncdiff():
    pipe = tiny.build_pipeline("sd15", seed=0)
    with pytest.raises(ValueError, match="split"):
        AsyncDiff(pipe, model_n=2, split="tiem")
    assert "forward" not in pipe.unet.__dict__


def test_time_split_end_to_end():
    """Needs attach.py to call ``splits.count_times`` for split="time"."""
    pipe = tiny.build_pipeline("sd15", seed=0)
    ad = AsyncDiff(pipe, model_n=2, split="time", warm_up=1)
    try:
        assert ad.split is None  # decided at the first denoiser call
        kw = tiny.default_call_kwargs("sd15")
        out = pipe(**kw).images
        assert torch.isfinite(out).all()
        split = ad.split
        assert split.source == "time" and len(split.components) == 2
        assert sorted(split.costs) == sorted(ad.layout.fine_units())
        assert all(c > 0 for c in split.costs.values())
        assert hooks_left(pipe.unet) == []  # the timing hooks are gone
    finally:
        ad.remove()
    assert "forward" not in pipe.unet.__dict__
