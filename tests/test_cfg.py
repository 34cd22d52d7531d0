"""cfg_parallel: the two halves of the classifier-free-guidance batch on two groups of ranks.

Each half runs the schedule as a whole run would on a whole batch, so the
output equals the run without the split whenever the denoiser gives a half
batch the same bits as the same rows of the whole batch.  On this CPU that
holds for halves of 4 rows (``num_images_per_prompt=4``); with 1 or 2 rows
MKL's small matrix products and oneDNN's convolutions sum in another order,
a float rounding the plain pipeline shows too (``test_kernels_...`` below
states it, so the bitwise tests cannot pass by accident).
"""

import os

import pytest
import torch

from asyncdiff import AsyncDiff, _core, shard
from asyncdiff.config import AsyncDiffConfig
from asyncdiff.testing import tiny

import mp

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 5
FOUR = {"num_images_per_prompt": 4}  # halves of 4 rows: bitwise the rows of the whole batch here


def call(pipe, arch, steps=STEPS, seed=0, **extra):
    kw = tiny.default_call_kwargs(arch, seed=seed)
    kw.update(num_inference_steps=steps, **extra)
    out = pipe(**kw)
    return out.images if hasattr(out, "images") else out.frames


def run(pipe, arch, extra=FOUR, steps=STEPS, **options):
    ad = AsyncDiff(pipe, **options)
    try:
        return call(pipe, arch, steps=steps, **extra), ad
    finally:
        ad.remove()


def test_kernels_give_half_batches_the_rows_bits_only_from_four_rows(pipes):
    # the premise of the bitwise tests, measured: one denoiser call on the whole batch against its halves
    pipe = pipes("sd15")
    seen = []
    original = pipe.unet.forward
    pipe.unet.forward = lambda *a, **kw: seen.append((a, kw)) or original(*a, **kw)
    try:
        for images in (1, 4):
            call(pipe, "sd15", steps=1, num_images_per_prompt=images)
    finally:
        del pipe.unet.forward
    for (args, kwargs), rows in zip(seen, (1, 4)):
        whole = original(*args, **kwargs)[0]
        halves = [original(args[0][g * rows:(g + 1) * rows], args[1],
                           encoder_hidden_states=kwargs["encoder_hidden_states"][g * rows:(g + 1) * rows])[0]
                  for g in (0, 1)]
        assert torch.equal(torch.cat(halves), whole) == (rows == 4)
        assert torch.allclose(torch.cat(halves), whole, atol=1e-5)


@pytest.mark.parametrize("arch", ("sd15", "sdxl", "sd3"))
@pytest.mark.parametrize("n,stride", [(2, 1), (3, 2)])
def test_equals_the_run_without_the_split(pipes, arch, n, stride):
    pipe = pipes(arch)
    plain, _ = run(pipe, arch, model_n=n, stride=stride, time_shift=stride == 2)
    split, ad = run(pipe, arch, model_n=n, stride=stride, time_shift=stride == 2, cfg_parallel=True)
    assert torch.equal(split, plain)
    group = n + stride - 1
    assert ad.world_size == 2 * group
    # both groups ran the asynchronous phase, each rank of each group its own component only
    for r in range(2 * group):
        mine = {u for (rank, u) in ad.counts if rank == r}
        twin = {u for (rank, u) in ad.counts if rank == (r + group) % (2 * group)}
        assert mine and mine == twin
    for c, units in enumerate(ad.split.components):
        assert {u for (rank, u) in ad.counts if rank == c} <= set(units)


@pytest.mark.parametrize("arch", ("sd15", "sdxl"))
def test_warm_up_covering_all_steps_is_the_plain_pipeline(pipes, arch):
    pipe = pipes(arch)
    plain = call(pipe, arch, **FOUR)
    got, ad = run(pipe, arch, model_n=2, warm_up=STEPS, cfg_parallel=True)
    assert torch.equal(got, plain) and not ad.counts


def test_two_components_on_four_ranks_beat_four_components(pipes):
    # the same four devices: N=2 with the CFG split is closer to the sequential image than N=4 without
    pipe = pipes("sd15")
    extra = {}
    sequential = call(pipe, "sd15", steps=10)
    cfg2, _ = run(pipe, "sd15", extra, steps=10, model_n=2, cfg_parallel=True)
    n4, _ = run(pipe, "sd15", extra, steps=10, model_n=4)

    def rel(x):
        return float((x - sequential).norm() / sequential.norm())

    assert 0 < rel(cfg2) < rel(n4), (rel(cfg2), rel(n4))


def test_one_component_is_cfg_parallel_alone(pipes):
    # model_n=1: two ranks, each the whole denoiser on its half; the plain pipeline's result
    pipe = pipes("sd15")
    plain = call(pipe, "sd15", **FOUR)
    got, ad = run(pipe, "sd15", model_n=1, split="auto", cfg_parallel=True)
    assert torch.equal(got, plain) and ad.world_size == 2


def test_calls_without_two_halves_are_refused(pipes):
    pipe = pipes("sd15")
    ad = AsyncDiff(pipe, model_n=2, cfg_parallel=True)
    try:
        with pytest.raises(ValueError, match="cfg_parallel: .*no classifier-free guidance"):
            call(pipe, "sd15", guidance_scale=1.0)
        # the next call, with guidance, runs from a fresh start
        got = call(pipe, "sd15", **FOUR)
    finally:
        ad.remove()
    assert torch.equal(got, run(pipe, "sd15", model_n=2)[0])


def test_sd3_skip_layer_guidance_is_refused(pipes):
    pipe = pipes("sd3")
    ad = AsyncDiff(pipe, model_n=2, cfg_parallel=True)
    try:
        with pytest.raises(ValueError, match="cfg_parallel: skip-layer guidance"):
            call(pipe, "sd3", skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    finally:
        ad.remove()


def test_flux_and_bad_options_are_refused(pipes):
    with pytest.raises(ValueError, match="cfg_parallel: FluxTransformer2DModel .*distilled guidance"):
        AsyncDiff(pipes("flux"), model_n=2, cfg_parallel=True)
    with pytest.raises(TypeError, match="cfg_parallel: expected a bool"):
        AsyncDiffConfig(cfg_parallel=1)
    with pytest.raises(ValueError, match=r"devices: 2 given, but 2 \* \(model_n \+ stride - 1\) = 4 ranks"):
        AsyncDiffConfig(cfg_parallel=True, devices=["cpu"] * 2)
    assert AsyncDiffConfig(model_n=3, stride=2, cfg_parallel=True).world_size == 8


@pytest.mark.parametrize("n,stride", [(2, 1), (1, 1), (3, 2)])
@pytest.mark.parametrize("copies", ["0", "1"])
def test_devices_in_one_process_equal_emulation(pipes, monkeypatch, n, stride, copies):
    # devices=: both groups' forwards in one round of threads; ASYNCDIFF_REPLICAS=1 takes the path of
    # several GPUs on the CPU (the second group's rank 0 gets a whole copy, the others their blocks)
    pipe = pipes("sd15")
    monkeypatch.setenv("ASYNCDIFF_REPLICAS", copies)
    world = 2 * (n + stride - 1)
    options = dict(model_n=n, stride=stride, time_shift=stride == 2, cfg_parallel=True)
    expected, emulated = run(pipe, "sd15", {}, **options)
    ad = AsyncDiff(pipe, devices=["cpu"] * world, **options)
    try:
        got = call(pipe, "sd15")
        held = {g: {r: {u for u in ad.split.owner if any(not t.is_meta for t in ad.layout.module(u, c).parameters())}
                    for r, c in mode.replicas.items()} for g, mode in enumerate(ad._modes)}
    finally:
        ad.remove()
    assert torch.equal(got, expected)
    assert ad.counts == emulated.counts and {r for r, _ in ad.counts} == set(range(world))
    if copies == "1":
        assert set(held[0]) == set(range(1, world // 2)) and set(held[1]) == set(range(world // 2))
        assert held[1][0] == set(ad.split.owner)  # the second group's warm-up runs whole on its own device
        for g in (0, 1):
            for r, units in held[g].items():
                if r:
                    assert units == set(ad.split.components[min(r, n - 1)]), (g, r)
    else:
        assert not held[0] and not held[1]


CONFIGS = [  # one launch of 6 ranks: stride 2 on all, then 4 ranks, then the 2-rank configuration
    # stride 2 (an event every other call, the join every call), an even warm-up, time_shift
    dict(id="sd15-n2s2", arch="sd15", call={}, stride=2, warm_up=2, time_shift=True, world=6),
    # halves of one row; whole weights and warm_up 2: the first join comes before any slot layout
    dict(id="sd15-n2-one", arch="sd15", call={}, keep_weights=True, warm_up=2),
    dict(id="sd15-n2-four", arch="sd15", call=FOUR, repeat=2),  # a new pipeline (the last is sharded); 2 calls
    dict(id="sdxl-n2-four", arch="sdxl", call=FOUR, encoders="rank0"),
    dict(id="sd15-n1", arch="sd15", call=FOUR, model_n=1, split="auto", world=2),
]


def test_rank_processes_equal_emulation(pipes, tmp_path):
    configs = [{"model_n": 2, "stride": 1, "warm_up": 1, "steps": STEPS, "timeout": 120.0, "world": 4,
                "cfg_parallel": True, "repeat": 1, **c} for c in CONFIGS]
    pids = []
    results = mp.launch(6, configs, tmp_path, pids=pids)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{log[-3000:]}"
    left = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    assert not [n for n in left if n.startswith(tuple(f"asyncdiff-{p}-" for p in pids))], "segments left behind"
    for cfg in configs:
        pipe = pipes(cfg["arch"])
        options = dict(model_n=cfg["model_n"], stride=cfg["stride"], warm_up=cfg["warm_up"],
                       time_shift=cfg.get("time_shift", False), split=cfg.get("split"), cfg_parallel=True)
        expected, ad = run(pipe, cfg["arch"], cfg["call"], **options)
        if cfg["call"] == FOUR:  # and so the run without the split
            assert torch.equal(run(pipe, cfg["arch"], cfg["call"], **{**options, "cfg_parallel": False})[0],
                               expected)
        group = cfg["model_n"] + cfg["stride"] - 1
        for rank in range(cfg["world"]):
            got = torch.load(tmp_path / f"{cfg['id']}.rank{rank}.pt", weights_only=False)
            for latents in got["latents"]:
                assert torch.equal(latents, expected), (f"{cfg['id']} rank {rank}", (latents - expected).abs().max())
            # this rank computed exactly what the emulation's rank of the same number did
            assert {u for (_, u) in got["counts"]} == {u for (r, u) in ad.counts if r == rank}
            assert all(r == rank for (r, _) in got["counts"]) and got["counts"]
            # and held only its group place's blocks
            if not cfg.get("keep_weights"):
                units = shard.tensor_units(ad.layout, ad.split.owner, ad.denoiser)
                mine = set(ad.split.components[min(rank % group, cfg["model_n"] - 1)])
                held = {n for n, u in units.items() if u is None or u in mine}
                held.add(shard.first_parameter(ad.denoiser))
                assert set(got["real"]) == held, f"{cfg['id']} rank {rank}"
            # per asynchronous call: the schedule's events and the join with the twin
            stats = got["stats"]["async"]
            schedule = _core.Schedule(cfg["model_n"], cfg["stride"], cfg["warm_up"], 0, STEPS)
            async_calls = range(cfg["warm_up"], STEPS)
            events = sum(schedule.plan(rank % group, k).exchange for k in async_calls) / len(async_calls)
            assert stats["events per call"] == pytest.approx(events + 1), stats
            assert stats["ms per call"]["join"] >= 0
