"""Real rank processes over the shared-memory transport equal the emulation.

One launch per world size runs every configuration of that size (SD 1.x,
SD 2.x and SDXL topologies with the paper preset and the auto split; the
img2img, inpainting, ControlNet, upscaler, SVD, AnimateDiff and SD3 pipelines
with their default split; stride 1 and 2) in the same processes, which also checks that AsyncDiff can be attached,
removed and attached again.  The emulation of each configuration runs here,
in this process, on an identically built pipeline.

Latents must be bitwise equal: every rank runs the same CPU kernels with one
thread on the same inputs, and the transport copies bytes.
"""

import os
import re

import pytest
import torch

from asyncdiff import AsyncDiff
from asyncdiff.testing import tiny

import mp

SD_ARCHS = ("sd15", "sd21", "sdxl")
# the other pipeline families (issue: every model the original supports)
OTHER_ARCHS = ("sd15_img2img", "sdxl_img2img", "sdxl_inpaint", "upscaler", "svd", "animatediff", "sd3",
               "sdxl_controlnet")
SHAPES = {2: [(2, 1)], 3: [(3, 1), (2, 2)], 4: [(4, 1), (3, 2)], 5: [(4, 2)]}
STEPS = 5


def configs_for(world: int) -> list[dict]:
    out = []
    for n, stride in SHAPES[world]:
        runs = [(arch, split) for arch in SD_ARCHS for split in ("paper", "auto")]
        if n <= 3:
            runs += [(arch, None) for arch in OTHER_ARCHS]
        for i, (arch, split) in enumerate(runs):
            time_shift = i % 2 == 1  # both values over the set
            warm = 2 if stride == 2 and arch == "sd21" else 1  # an even warm-up once per size
            out.append(dict(id=f"{arch}-n{n}s{stride}-{split}", arch=arch, model_n=n, stride=stride,
                            warm_up=warm, time_shift=time_shift, split=split, steps=STEPS,
                            repeat=2 if arch == "sd15" else 1, timeout=120.0,
                            # the 2-process run also has the user's own process group
                            init_process_group=world == 2))
    return out


def shm_entries():
    try:
        return {e for e in os.listdir("/dev/shm") if e.startswith("asyncdiff")}
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="module")
def pipes():
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = tiny.build_pipeline(arch, seed=0)
        return built[arch]

    return get


def emulate(pipe, cfg):
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    ad = AsyncDiff(pipe, model_n=cfg["model_n"], stride=cfg["stride"], warm_up=cfg["warm_up"],
                   time_shift=cfg["time_shift"], split=cfg["split"], transport="emulate")
    try:
        kw = tiny.default_call_kwargs(cfg["arch"])
        kw["num_inference_steps"] = cfg["steps"]
        kw.pop("generator")
        out = pipe(**kw, generator=torch.Generator().manual_seed(0))
        return (out.images if hasattr(out, "images") else out.frames), ad
    finally:
        ad.remove()
        torch.set_num_threads(saved)


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_processes_equal_emulation(pipes, tmp_path, world):
    before = shm_entries()
    configs = configs_for(world)
    results = mp.launch(world, configs, tmp_path)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{log[-3000:]}"
    assert shm_entries() <= before, "shared-memory segments left behind"
    for cfg in configs:
        expected, ad = emulate(pipes(cfg["arch"]), cfg)
        for rank in range(world):
            got = torch.load(tmp_path / f"{cfg['id']}.rank{rank}.pt", weights_only=False)
            assert got["split"] == str(ad.split), cfg["id"]
            # every rank ends with the same result, equal to the emulation, on both calls
            for latents in got["latents"]:
                assert torch.equal(latents, expected), f"{cfg['id']} rank {rank}"
            # in the async phase this rank computed only its own blocks, once per call
            mine = {u for (r, u) in ad.counts if r == rank}
            assert {u for (_, u) in got["counts"]} == mine, f"{cfg['id']} rank {rank}"
            assert all(r == rank for (r, _) in got["counts"])
            for key, count in got["counts"].items():
                assert count == len(got["latents"]) * ad.counts[key]
            # one progress bar: rank 0's
            assert bool(got["progress"].get("disable")) == (rank != 0), f"{cfg['id']} rank {rank}"


def test_wrong_world_size_fails_on_every_rank(tmp_path):
    cfg = [dict(id="bad", arch="sd15", model_n=2, stride=1, warm_up=1, steps=3)]
    results = mp.launch(3, cfg, tmp_path)
    for rank, (code, log) in enumerate(results):
        assert code != 0
        assert "world size" in log and "ValueError" in log, log[-2000:]


def test_a_rank_that_dies_makes_the_others_fail_fast(tmp_path):
    before = shm_entries()
    cfg = [dict(id="die", arch="sd15", model_n=2, stride=1, warm_up=1, steps=8, timeout=60.0,
                die={"rank": 1, "step": 3})]
    results = mp.launch(2, cfg, tmp_path)
    assert results[1][0] == 3
    code, log = results[0]
    assert code != 0
    assert re.search(r"rank 1", log) and "AsyncDiffError" in log, log[-2000:]
    assert "Timeout" not in log  # noticed as gone, not waited out
    assert shm_entries() <= before
