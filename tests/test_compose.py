"""AsyncDiff composes with what diffusers users already do to a pipeline.

Other diffusers hooks on the same denoiser (before and after AsyncDiff),
torch.compile before or after attaching, accelerate's model offloading,
a callback that changes the batch mid-call, attaching twice.  All in
emulation, on the tiny SD 1.5 pipeline, one thread.
"""

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import asyncdiff
from asyncdiff import AsyncDiff
from asyncdiff.testing import tiny

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the whole module: the references are computed
    with the same kernels as every compared call."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def pipe(one_thread):
    return tiny.build_pipeline("sd15", seed=0)


@pytest.fixture(scope="module")
def reference(pipe):
    """(plain output, AsyncDiff N=2 output) of the untouched pipeline."""
    plain = call(pipe)
    ad = AsyncDiff(pipe, model_n=2, warm_up=1)
    try:
        return plain, call(pipe)
    finally:
        ad.remove()


def call(pipe, **extra):
    return pipe(**dict(tiny.default_call_kwargs("sd15"), num_inference_steps=STEPS, **extra)).images


class Counting(ModelHook):
    """Counts the calls of the module it is registered on."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def registry(module):
    return HookRegistry.check_if_exists_or_initialize(module)


@pytest.mark.parametrize("where", ["before", "after"])
def test_another_diffusers_hook_on_the_same_denoiser(pipe, reference, where):
    """A hook registered before AsyncDiff sits inside it and sees every forward
    AsyncDiff runs (here the emulation runs one per computing rank); one
    registered after it sits outside and sees the pipeline's calls."""
    plain, expected = reference
    counting = Counting()
    if where == "before":
        registry(pipe.unet).register_hook(counting, "counting")
    ad = AsyncDiff(pipe, model_n=2, warm_up=1)
    try:
        if where == "after":
            registry(pipe.unet).register_hook(counting, "counting")
        assert torch.equal(call(pipe), expected)
        # warm-up: one forward; each asynchronous step: one per rank (emulation)
        assert counting.calls == (1 + 2 * (STEPS - 1) if where == "before" else STEPS)
    finally:
        ad.remove()
    try:
        assert registry(pipe.unet).get_hook("counting") is counting  # the other hook is still there...
        before = counting.calls
        assert torch.equal(call(pipe), plain)  # ... AsyncDiff is gone ...
        assert counting.calls == before + STEPS  # ... and it still counts
    finally:
        registry(pipe.unet).remove_hook("counting")
    assert torch.equal(call(pipe), plain)
    assert {launch_device(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module)} == \
        {torch.device("cpu")}


def launch_device(module):
    return next(module.parameters()).device


@pytest.fixture(scope="module")
def ddim(one_thread):
    """A smaller denoiser for the compiled runs (tracing costs seconds per variant)."""
    pipe = tiny.build_pipeline("ddim", seed=0)
    def kw():  # a fresh generator for every call
        return dict(tiny.default_call_kwargs("ddim"), num_inference_steps=STEPS)

    ad = AsyncDiff(pipe, model_n=2, warm_up=1)
    try:
        expected = pipe(**kw()).images
    finally:
        ad.remove()
    return pipe, kw, expected


def test_compiled_before_attaching(pipe, ddim):
    """The compiled wrapper hides neither the architecture nor the timestep parameter."""
    real = pipe.unet
    pipe.unet = torch.compile(real)
    try:
        ad = AsyncDiff(pipe, model_n=2, warm_up=1)
        try:
            assert ad.layout.family == "sd1" and ad.split.source == "paper"
        finally:
            ad.remove()
    finally:
        pipe.unet = real
    small, kw, expected = ddim
    real = small.unet
    small.unet = torch.compile(real, backend="eager")
    torch._dynamo.reset()
    try:
        ad = AsyncDiff(small, model_n=2, warm_up=1)
        try:
            assert torch.equal(small(**kw()).images, expected)
        finally:
            ad.remove()
    finally:
        small.unet = real
        torch._dynamo.reset()


def test_compiled_after_attaching_breaks_the_graph_only_at_the_boundary(ddim):
    """Only the denoiser's own forward is compiled: no graph break inside
    AsyncDiff's per-call bookkeeping, one where the hook hands over to it."""
    from torch._dynamo.utils import counters

    small, kw, expected = ddim
    real = small.unet
    torch._dynamo.reset()
    counters.clear()
    ad = AsyncDiff(small, model_n=2, warm_up=1)
    small.unet = torch.compile(real, backend="eager")
    try:
        assert torch.equal(small(**kw()).images, expected)
        assert torch.equal(small(**kw()).images, expected)
        breaks = dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] >= 1  # the forward really was compiled
    finally:
        small.unet = real
        ad.remove()
        torch._dynamo.reset()
    ours = {reason: n for reason, n in breaks.items() if "Loop.__call__" not in reason}
    assert not ours, ours
    assert sum(breaks.values()) <= 2 * STEPS


def test_model_offload_after_attaching_then_remove(pipe, reference):
    """accelerate's offload hook, installed after AsyncDiff, survives remove();
    removing it later does not bring AsyncDiff back."""
    pytest.importorskip("accelerate")
    plain, expected = reference
    ad = AsyncDiff(pipe, model_n=2, warm_up=1)
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        assert torch.equal(call(pipe), expected)
        ad.remove()
        assert hasattr(pipe.unet, "_hf_hook")  # accelerate's hook is still installed ...
        assert torch.equal(call(pipe), plain)  # ... over the plain denoiser
        pipe.remove_all_hooks()
        assert torch.equal(call(pipe), plain)  # and without it, still no AsyncDiff
        assert not ad.counts or torch.equal(call(pipe), plain)
    finally:
        ad.remove()
        pipe.remove_all_hooks()
    assert not hasattr(pipe.unet, "_diffusers_hook") or not registry(pipe.unet).hooks


def test_a_callback_that_changes_the_batch_is_a_clear_error(pipe, reference):
    """diffusers' dynamic classifier-free-guidance recipe drops the
    unconditional half mid-call: refused at that step, naming the cause."""
    plain, expected = reference

    def drop_guidance(p, step, _t, kw):
        if step == 1:
            p._guidance_scale = 0.0
            kw["prompt_embeds"] = kw["prompt_embeds"].chunk(2)[-1]
        return kw

    ad = AsyncDiff(pipe, model_n=2, warm_up=1)
    try:
        with pytest.raises(ValueError, match=r"changed shape at step 2.*callback_on_step_end"):
            call(pipe, callback_on_step_end=drop_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"])
        assert torch.equal(call(pipe), expected)  # the pipeline is usable for the next call
    finally:
        ad.remove()
    assert torch.equal(call(pipe), plain)


def test_attaching_twice_is_a_clear_error(pipe, reference):
    """Re-running a notebook cell that attaches: refused until the first is removed."""
    plain, expected = reference
    ad = AsyncDiff(pipe, model_n=2, warm_up=1)
    try:
        with pytest.raises(RuntimeError, match=r"already attached.*remove\(\)"):
            AsyncDiff(pipe, model_n=2, warm_up=1)
        assert torch.equal(call(pipe), expected)  # the first one still works
    finally:
        ad.remove()
    again = AsyncDiff(pipe, model_n=2, warm_up=1)
    try:
        assert torch.equal(call(pipe), expected)
    finally:
        again.remove()
    assert torch.equal(call(pipe), plain)


def test_the_library_logs_and_never_prints():
    root = Path(asyncdiff.__file__).parent
    printing = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if not p.relative_to(root).parts[0] in
                ("testing", "demo") for i, line in enumerate(p.read_text().splitlines(), 1)
                if re.search(r"\bprint\(", line)]
    assert not printing, printing


def test_typed_and_versioned_in_one_place():
    root = Path(asyncdiff.__file__).parent
    assert (root / "py.typed").is_file()
    assert asyncdiff.__version__ == importlib.metadata.version("asyncdiff")
