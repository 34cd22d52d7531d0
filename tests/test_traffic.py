"""What each rank receives: traced, minimal, and the same in every dtype."""

import functools
import warnings

import pytest
import torch

from asyncdiff import arch, splits, tiny, traffic


@functools.lru_cache(maxsize=None)
def denoiser_call(arch_name, dtype=torch.float32):
    """The tiny pipeline and the arguments of its denoiser's first call."""
    pipe = tiny.build_pipeline(arch_name, dtype=dtype)
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    seen = {}
    orig = den.forward

    def spy(*args, **kwargs):
        seen.setdefault("call", (args, kwargs))
        return orig(*args, **kwargs)

    den.forward = spy
    kw = tiny.default_call_kwargs(arch_name)
    kw["num_inference_steps"] = 1
    try:
        pipe(**kw)
    finally:
        del den.__dict__["forward"]
    return den, *seen["call"]


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


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
            results[dtype] = traffic.needs(layout, den, args, kwargs, split, n, stride)
    assert all(r == results[torch.float32] for r in results.values())
    needs = results[torch.float32]
    full = traffic.everything_else(split, n + stride - 1, n)
    owner = split.owner
    for rank, units in needs.items():
        assert set(units) <= set(full[rank])  # never a unit the rank owns
        if stride == 2 and owner[layout.final] != rank:
            assert layout.final in units  # a sync call returns the replayed final unit
    # the first component reads nothing: its inputs are the denoiser's own
    if owner.get("conv_in") == 0 and stride == 1:
        assert needs[0] == []
    assert sum(map(len, needs.values())) < sum(map(len, full.values()))


def test_untraceable_model_falls_back_loudly():
    den, args, kwargs = denoiser_call("sd15")
    layout = arch.describe(den)
    split = splits.resolve_static(layout, 2, "paper")
    with pytest.warns(RuntimeWarning, match="every rank receives"):
        got = traffic.needs(layout, den, args[:1], {}, split, 2, 1)  # a call that cannot run
    assert got == traffic.everything_else(split, 2, 2)
