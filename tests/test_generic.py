"""AsyncDiff on denoisers that have no paper preset, through the automatic split.

Three tiny, offline pipelines stand for "any diffusers denoiser": an
unconditional pixel-space ``UNet2DModel`` (DDIMPipeline), a PixArt-alpha
transformer and a FLUX.1-dev style transformer with double- and single-stream
blocks.  All runs are emulated (one process plays every rank), which is the
oracle of the multi-process runs.  Denoisers AsyncDiff cannot cut, and loops
that call the denoiser twice per step, must be refused loudly.
"""

import pytest
import torch

from asyncdiff import AsyncDiff
from asyncdiff.testing import tiny

ARCHS = ("ddim", "pixart", "flux")

# diffusers' DPM-Solver builds its sigmas with np.array(tensor): harmless under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

def arch_params():
    # FluxPipeline passes `t / 1000` to its transformer: the schedule must match that exactly
    return list(ARCHS)


pytestmark = pytest.mark.usefixtures("one_thread")


class Pipes:
    """Pipelines and their plain (no AsyncDiff) outputs, built on first use."""

    def __init__(self):
        self._pipes, self._plain = {}, {}

    def __getitem__(self, arch):
        if arch not in self._pipes:
            self._pipes[arch] = tiny.build_pipeline(arch, seed=0)
        return self._pipes[arch]

    def plain(self, arch, steps):
        if (arch, steps) not in self._plain:
            self._plain[(arch, steps)] = call(self[arch], arch, steps)
        return self._plain[(arch, steps)]


@pytest.fixture(scope="module")
def pipes():
    return Pipes()


def call(pipe, arch, steps):
    kw = tiny.default_call_kwargs(arch, seed=0)
    kw["num_inference_steps"] = steps
    return pipe(**kw).images


def denoiser_of(pipe):
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def expected_counts(ad, n, stride, steps, warm):
    """(rank, unit) -> executions in the async phase, from the schedule (docs/design.md §3)."""
    owner = ad.split.owner
    if stride == 1:
        return {(owner[u], u): steps - warm for u in owner}
    computes = sum(1 for k in range(warm, steps) if k % 2 == 1)
    counts = {(owner[u], u): computes for u in owner}
    counts.update({(n, u): computes for u in owner if owner[u] == n - 1})  # the extra rank
    return counts


# ----------------------------------------------------------- the three models


@pytest.mark.parametrize("arch", arch_params())
@pytest.mark.parametrize("n,stride", [(2, 1), (3, 2)])
def test_warm_up_covering_all_steps_is_the_plain_pipeline(pipes, arch, n, stride):
    pipe, steps = pipes[arch], 4
    plain = pipes.plain(arch, steps)
    ad = AsyncDiff(pipe, model_n=n, stride=stride, warm_up=steps)
    try:
        out = call(pipe, arch, steps)
        assert ad.split.source == "auto"  # no preset for these: the default is the automatic split
        assert torch.equal(out, plain)
        assert not ad.counts
    finally:
        ad.remove()


@pytest.mark.parametrize("arch", arch_params())
@pytest.mark.parametrize("n,stride", [(2, 1), (3, 2)])
def test_async_differs_and_each_rank_computes_only_its_component(pipes, arch, n, stride):
    pipe, steps, warm = pipes[arch], 6, 1
    plain = pipes.plain(arch, steps)
    ad = AsyncDiff(pipe, model_n=n, stride=stride, warm_up=warm)
    try:
        out = call(pipe, arch, steps)
        assert ad.split.source == "auto" and len(ad.split.components) == n
        assert torch.isfinite(out).all()
        assert not torch.equal(out, plain)
        assert dict(ad.counts) == expected_counts(ad, n, stride, steps, warm)
    finally:
        ad.remove()


@pytest.mark.parametrize("arch", arch_params())
def test_consecutive_calls_are_identical(pipes, arch):
    pipe = pipes[arch]
    ad = AsyncDiff(pipe, model_n=2, stride=1, warm_up=1)
    try:
        first = call(pipe, arch, 6)
        second = call(pipe, arch, 6)
        assert torch.equal(first, second)
    finally:
        ad.remove()


@pytest.mark.parametrize("arch", arch_params())
def test_remove_restores_the_plain_pipeline(pipes, arch):
    pipe = pipes[arch]
    plain = pipes.plain(arch, 6)
    ad = AsyncDiff(pipe, model_n=3, stride=2, warm_up=1)
    try:
        assert not torch.equal(call(pipe, arch, 6), plain)
    finally:
        ad.remove()
    assert not [(n, m.__dict__.get("forward")) for n, m in denoiser_of(pipe).named_modules() if "forward" in m.__dict__]
    assert torch.equal(call(pipe, arch, 6), plain)


@pytest.mark.parametrize("arch", arch_params())
@pytest.mark.parametrize("n,stride", [(4, 1), (8, 1), (8, 2)])
def test_many_components(pipes, arch, n, stride):
    pipe, steps, warm = pipes[arch], 6, 1
    ad = AsyncDiff(pipe, model_n=n, stride=stride, warm_up=warm)
    try:
        out = call(pipe, arch, steps)
        split = ad.split
        assert split.source == "auto" and len(split.components) == n
        # contiguous in execution order: the fine units' owners never go back
        owner = split.owner
        comp_of = [owner.get(u, owner.get(u.split(".")[0])) for u in split.costs]
        assert comp_of == sorted(comp_of) and set(comp_of) == set(range(n))
        assert torch.isfinite(out).all()
        assert dict(ad.counts) == expected_counts(ad, n, stride, steps, warm)
        assert {r for r, _ in ad.counts} == set(range(n + stride - 1))
    finally:
        ad.remove()


# ------------------------------------------------------------------- refusals


class _Holder:
    """The smallest "pipeline" AsyncDiff looks at: a denoiser and a scheduler."""

    def __init__(self, attr, denoiser):
        from diffusers import DDIMScheduler

        setattr(self, attr, denoiser)
        self.scheduler = DDIMScheduler()


class HalfAUNet(torch.nn.Module):
    """conv_in and down_blocks, but no up path: neither UNet nor transformer."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.down_blocks = torch.nn.ModuleList([torch.nn.Conv2d(8, 8, 3, padding=1)])
        self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, sample, timestep):
        return self.conv_out(self.down_blocks[0](self.conv_in(sample)))


class ListOfBlocks(torch.nn.Module):
    """Blocks in a plain Python list, not a ModuleList named transformer_blocks."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)])

    def forward(self, hidden_states, timestep):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


@pytest.mark.parametrize(
    "attr,make",
    [
        ("unet", lambda: torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3))),
        ("unet", HalfAUNet),
        ("transformer", ListOfBlocks),
    ],
)
def test_unsplittable_denoiser_is_refused_by_name(attr, make):
    denoiser = make()
    with pytest.raises(TypeError, match=type(denoiser).__name__):
        AsyncDiff(_Holder(attr, denoiser), model_n=2)
    assert not any("forward" in m.__dict__ for m in denoiser.modules())  # nothing left attached


def _custom_loop(pipe, calls_per_step, steps=6):
    """A hand-written sampling loop over the tiny SD 1.5 UNet and scheduler."""
    gen = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    cond = torch.randn(1, 77, 32, generator=gen)
    uncond = torch.zeros_like(cond)
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            if calls_per_step == 2:  # guidance as two separate denoiser calls
                eps_c = pipe.unet(x, t, encoder_hidden_states=cond).sample
                eps_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
                eps = eps_u + 5.0 * (eps_c - eps_u)
            else:
                eps = pipe.unet(x, t, encoder_hidden_states=cond).sample
            x = sched.step(eps, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def sd15():
    return tiny.build_pipeline("sd15", seed=0)


def test_custom_loop_with_one_call_per_step_works(sd15):
    plain = _custom_loop(sd15, 1)
    ad = AsyncDiff(sd15, model_n=2, stride=1, warm_up=6)
    try:
        assert torch.equal(_custom_loop(sd15, 1), plain)
        ad.reset_state(warm_up=1)
        out = _custom_loop(sd15, 1)
        assert torch.isfinite(out).all() and not torch.equal(out, plain)
    finally:
        ad.remove()


@pytest.mark.parametrize("warm_up", [1, 6])
def test_two_denoiser_calls_per_step_are_refused(sd15, warm_up):
    ad = AsyncDiff(sd15, model_n=2, stride=1, warm_up=warm_up)
    try:
        with pytest.raises(RuntimeError, match="more than once per step"):
            _custom_loop(sd15, 2)
        # refused again on the next loop: never a silently wrong result
        with pytest.raises(RuntimeError, match="more than once per step"):
            _custom_loop(sd15, 2)
    finally:
        ad.remove()
    assert torch.isfinite(_custom_loop(sd15, 2)).all()  # fine without AsyncDiff
