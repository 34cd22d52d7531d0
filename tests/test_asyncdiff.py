"""AsyncDiff on real (tiny, same-topology) diffusers pipelines, in one process.

The emulation is the oracle the multi-process tests compare against, so here
it is checked against what it must equal on its own: the plain pipeline when
nothing is asynchronous, and the schedule's rules (docs/design.md §3) for what each rank computes.
"""

import pytest
import torch

from asyncdiff import AsyncDiff, splits
from asyncdiff.testing import tiny
from asyncdiff.arch import describe as arch_of

ARCHS = ("sd15", "sd21", "sdxl")
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes():
    return {arch: tiny.build_pipeline(arch, seed=0) for arch in ARCHS}


def call(pipe, arch, steps=6, seed=0, **extra):
    kw = tiny.default_call_kwargs(arch, seed=seed)
    kw["num_inference_steps"] = steps
    kw.update(extra)
    return pipe(**kw).images


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n,stride", [(2, 1), (2, 2), (3, 1)])
def test_warm_up_covering_all_steps_is_the_plain_pipeline(pipes, arch, n, stride):
    pipe = pipes[arch]
    plain = call(pipe, arch)
    ad = AsyncDiff(pipe, model_n=n, stride=stride, warm_up=6)
    try:
        assert torch.equal(call(pipe, arch), plain)
        assert not ad.counts  # no asynchronous call happened
    finally:
        ad.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_single_component_is_the_plain_pipeline(pipes, arch):
    # model_n=1: every async call recomputes every block from fresh inputs
    pipe = pipes[arch]
    plain = call(pipe, arch)
    ad = AsyncDiff(pipe, model_n=1, stride=1, warm_up=1, split="auto")
    try:
        assert torch.equal(call(pipe, arch), plain)
    finally:
        ad.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n,stride", [(2, 1), (3, 2), (4, 1)])
def test_async_differs_from_plain_and_each_rank_runs_only_its_blocks(pipes, arch, n, stride):
    pipe = pipes[arch]
    steps, warm = 7, 2
    plain = call(pipe, arch, steps=steps)
    ad = AsyncDiff(pipe, model_n=n, stride=stride, warm_up=warm)
    try:
        out = call(pipe, arch, steps=steps)
        assert torch.isfinite(out).all()
        assert not torch.equal(out, plain)
        owner = ad.split.owner
        if stride == 1:
            async_calls = steps - warm
            expected = {(owner[u], u): async_calls for u in owner}
        else:
            compute_calls = sum(1 for k in range(warm, steps) if k % 2 == 1)
            expected = {(owner[u], u): compute_calls for u in owner}
            # the extra rank recomputes the last component for the current step
            expected.update({(n, u): compute_calls for u in owner if owner[u] == n - 1})
        assert dict(ad.counts) == expected
    finally:
        ad.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_state_resets_between_pipeline_calls(pipes, arch):
    pipe = pipes[arch]
    plain = call(pipe, arch, steps=5)
    ad = AsyncDiff(pipe, model_n=2, stride=1, warm_up=1)
    try:
        first = call(pipe, arch, steps=5)
        second = call(pipe, arch, steps=5)
        assert torch.equal(first, second)
        other = call(pipe, arch, steps=3)  # a different length works too
        assert other.shape == first.shape and torch.isfinite(other).all()
        ad.reset_state(warm_up=5)  # the original's call still works, and its warm_up is honoured
        assert torch.equal(call(pipe, arch, steps=5), plain)
    finally:
        ad.remove()


def test_remove_restores_the_pipeline(pipes):
    pipe = pipes["sd15"]
    plain = call(pipe, "sd15")
    before = {name: dict(m.__dict__) for name, m in pipe.unet.named_modules()}
    ad = AsyncDiff(pipe, model_n=3, stride=2, warm_up=1)
    call(pipe, "sd15")
    ad.remove()
    after = {name: dict(m.__dict__) for name, m in pipe.unet.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
    assert torch.equal(call(pipe, "sd15"), plain)


def test_batched_guidance_and_several_images_per_prompt(pipes):
    pipe = pipes["sd15"]
    ad = AsyncDiff(pipe, model_n=2, stride=2, warm_up=1)
    try:
        out = call(pipe, "sd15", num_images_per_prompt=3)
        assert out.shape[0] == 3 and torch.isfinite(out).all()
    finally:
        ad.remove()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_paper_presets_are_recognised_by_structure(pipes, arch, n):
    ad = AsyncDiff(pipes[arch], model_n=n, split="paper")
    try:
        assert ad.layout.family == FAMILY[arch]
        assert ad.split.source == "paper"
        assert ad.split.components == splits.parse(splits.PRESETS[(FAMILY[arch], n)])
    finally:
        ad.remove()


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_auto_split_is_contiguous_and_balanced(pipes, n):
    pipe = pipes["sd15"]
    ad = AsyncDiff(pipe, model_n=n, split="auto", warm_up=1)
    try:
        call(pipe, "sd15", steps=2)
        split = ad.split
        assert split.source == "auto" and len(split.components) == n
        order = list(split.costs)
        # every fine unit maps to one component, in non-decreasing component order
        owner = split.owner
        comp_of = [owner.get(u, owner.get(u.split(".")[0])) for u in order]
        assert comp_of == sorted(comp_of) and set(comp_of) == set(range(n))
        totals = [0.0] * n
        for u, c in zip(order, comp_of):
            totals[c] += split.costs[u]
        best = max(totals)
        # no single move of a boundary unit lowers the largest component
        assert best <= sum(totals) / n + max(split.costs.values()) + 1e-6
    finally:
        ad.remove()


def test_explicit_split(pipes):
    pipe = pipes["sd15"]
    text = "conv_in d0 d1 d2 d3 mid | u0 u1 u2 u3 conv_norm_out conv_out"
    ad = AsyncDiff(pipe, model_n=2, split=text)
    try:
        assert ad.split.source == "explicit" and str(ad.split) == text
        assert torch.isfinite(call(pipe, "sd15")).all()
    finally:
        ad.remove()


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(stride=3), ValueError, "stride"),
        (dict(stride=1.0), TypeError, "stride"),
        (dict(model_n=0), ValueError, "model_n"),
        (dict(model_n=200), ValueError, "model_n"),
        (dict(model_n=True), TypeError, "model_n"),
        (dict(warm_up=0), ValueError, "warm_up"),
        (dict(time_shift="False"), TypeError, "time_shift"),
        (dict(timeout=-1), ValueError, "timeout"),
        (dict(transport="carrier-pigeon"), ValueError, "transport"),
        (dict(split="conv_in d0 | nonsense"), ValueError, "split"),
        (dict(split="conv_in d0-3 mid u0 u1 u2 u3 conv_norm_out | conv_out d0"), ValueError, "split"),
        (dict(split="conv_in d0-3 mid u0 u1 u2 u3 conv_out | conv_norm_out"), ValueError, "split"),
        (dict(split="conv_in d0-3 mid u0 u1 u2 | u3.r0 conv_norm_out conv_out"), ValueError, "split"),
        (dict(split=42), TypeError, "split"),
        (dict(model_n=5, split="paper"), ValueError, "split"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(pipes, kwargs, exc, word):
    pipe = pipes["sd15"]
    with pytest.raises(exc, match=word):
        AsyncDiff(pipe, **kwargs)
    assert "forward" not in pipe.unet.__dict__  # nothing was left attached


def test_unsupported_pipeline_is_refused():
    class NotAPipeline:
        scheduler = None

    with pytest.raises(TypeError, match="pipeline"):
        AsyncDiff(NotAPipeline())


def test_world_size_mismatch_is_refused(pipes, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="world size"):
        AsyncDiff(pipes["sd15"], model_n=2, stride=1)


OTHER_ARCHS = ("sd15_img2img", "sdxl_img2img", "sdxl_inpaint", "upscaler", "svd", "animatediff", "sd3",
               "sdxl_controlnet")


def frames(out):
    return out.images if hasattr(out, "images") else out.frames


@pytest.mark.parametrize("arch", OTHER_ARCHS)
@pytest.mark.parametrize("split", ["paper", "auto"])
def test_every_family_with_preset_and_auto_split(arch, split):
    pipe = tiny.build_pipeline(arch, seed=0)
    steps = 6
    kw = lambda: dict(tiny.default_call_kwargs(arch), num_inference_steps=steps)  # noqa: E731
    plain = frames(pipe(**kw()))
    # the preset at N=2 and N3S2 (its N=4 rows are the SD topologies', run at N=4
    # by the multi-process and reference tests); the auto split (one code path
    # for all shapes, walked at every shape by the SD and generic tests) at N3S2
    shapes = ((2, 1), (3, 2)) if split == "paper" else ((3, 2),)
    for n, stride in shapes:
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        if split == "paper" and splits.preset(arch_of(denoiser), n) is None:
            continue
        ad = AsyncDiff(pipe, model_n=n, stride=stride, warm_up=steps, split=split)
        try:
            assert torch.equal(frames(pipe(**kw())), plain)  # warm_up >= steps: the plain pipeline
        finally:
            ad.remove()
        ad = AsyncDiff(pipe, model_n=n, stride=stride, warm_up=1, split=split)
        try:
            out = frames(pipe(**kw()))
            assert torch.isfinite(out).all() and not torch.equal(out, plain)
            owner = ad.split.owner
            assert ad.split.source == split
            ranks_of = {u: {owner[u]} | ({n} if stride == 2 and owner[u] == n - 1 else set()) for u in owner}
            assert {(r, u) for (r, u) in ad.counts} == {(r, u) for u in owner for r in ranks_of[u]}
        finally:
            ad.remove()
