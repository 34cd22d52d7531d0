"""Real rank processes over the shared-memory transport equal the emulation.

One launch of the largest world runs every world size's configurations, the
largest first (see mp_worker.py): this starts the processes once.  They cover (SD 1.x, SD 2.x and
SDXL topologies with the paper preset, one of them with the auto split; the
img2img, inpainting, ControlNet, upscaler, SVD, AnimateDiff and SD3 pipelines
with their default split, spread over the small shapes; stride 1 and 2) in the
same processes, which also checks that AsyncDiff can be attached, removed and
attached again.  The emulation of each configuration runs here,
in this process, on an identically built pipeline.

Latents must be bitwise equal: every rank runs the same CPU kernels with one
thread on the same inputs, and the transport copies bytes.
"""

import os

import torch

from asyncdiff import AsyncDiff, _core, shard
from asyncdiff.testing import ranks, tiny

import mp

SD_ARCHS = ("sd15", "sd21", "sdxl", "sd3")
KEEP_WEIGHTS = ("sd21",)  # the others hold only their own blocks; sd21's pipeline is attached again and again
RANK0_ENCODERS = ("sdxl", "sd3")  # only rank 0 runs their text encoders (two and three of them)
# the other pipeline families (issue: every model the original supports)
OTHER_ARCHS = ("sd15_img2img", "sdxl_img2img", "sdxl_inpaint", "upscaler", "svd", "animatediff",
               "sdxl_controlnet")
SHAPES = {2: [(2, 1)], 3: [(3, 1), (2, 2)], 4: [(4, 1), (3, 2)], 5: [(4, 2)]}
STEPS = 5


def configs_for(world: int) -> list[dict]:
    """The configurations one launch of `world` processes runs.

    Every SD topology runs the paper preset at every shape; the auto split
    rotates over the SD topologies (one per shape, each at least once), and the
    other pipeline families are spread over the shapes with at most 3
    components (two per shape, each family once), so each family, split and
    shape is covered without running the full cross product.
    """
    all_shapes = [shape for w in sorted(SHAPES) for shape in SHAPES[w]]
    small = [shape for shape in all_shapes if shape[0] <= 3]
    per_small = -(-len(OTHER_ARCHS) // len(small))
    out = []
    for n, stride in SHAPES[world]:
        index = all_shapes.index((n, stride))
        # SD3 at the stride-1 shapes only: 2, 3 and 4 ranks holding their blocks
        runs = [(arch, "paper") for arch in SD_ARCHS if arch != "sd3" or stride == 1]
        runs.append((SD_ARCHS[index % len(SD_ARCHS)], "auto"))
        if (n, stride) == (2, 1):
            runs.append(("sd15", "time"))  # measured on rank 0, the same split on every rank
            runs.append(("sd15", "all-warm-up"))  # warm_up >= steps: only the pipeline through the owners
        if (n, stride) in small:
            at = small.index((n, stride)) * per_small
            runs += [(arch, None) for arch in OTHER_ARCHS[at:at + per_small]]
        for i, (arch, split) in enumerate(runs):
            time_shift = i % 2 == 1  # both values over the set
            warm = 2 if stride == 2 and arch == "sd21" else 1  # an even warm-up once per size
            if split == "all-warm-up":
                split, warm = None, STEPS
            out.append(dict(id=f"{arch}-n{n}s{stride}-{split}-w{warm}", world=world, arch=arch, model_n=n,
                            stride=stride, after_remove=warm == STEPS or (arch in KEEP_WEIGHTS and world == 2),
                            warm_up=warm, time_shift=time_shift, split=split, steps=STEPS,
                            repeat=2 if arch == "sd15" else 1, timeout=120.0, keep_weights=arch in KEEP_WEIGHTS,
                            encoders="rank0" if arch in RANK0_ENCODERS and split is not None else "all",
                            # the 2-process run also has the user's own process group
                            init_process_group=world == 2))
    return out


def test_every_family_split_and_shape_is_covered():
    configs = [c for w in SHAPES for c in configs_for(w)]
    assert {c["arch"] for c in configs} == set(SD_ARCHS) | set(OTHER_ARCHS)
    assert {(c["arch"], c["split"]) for c in configs} >= {(a, s) for a in SD_ARCHS for s in ("paper", "auto")}
    assert {(c["model_n"], c["stride"]) for c in configs} == {s for v in SHAPES.values() for s in v}
    assert {c["time_shift"] for c in configs} == {False, True}


def shm_left(pids) -> set:
    """Segments in /dev/shm created by one of the processes ``pids`` (their
    names carry the creator's pid), so that other tests running at the same
    time do not count."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return set()
    return {e for e in names if any(e.startswith(f"asyncdiff-{pid}-") for pid in pids)}


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


def test_processes_equal_emulation(pipes, tmp_path):
    configs = [cfg for world in sorted(SHAPES, reverse=True) for cfg in configs_for(world)]
    port = ranks.free_port()  # the world-2 runs' own process group
    for cfg in configs:
        if cfg["init_process_group"]:
            cfg["port"] = port
    pids = []
    results = mp.launch(max(SHAPES), configs, tmp_path, pids=pids)
    for rank, (code, log) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{log[-3000:]}"
    assert not shm_left(pids), "shared-memory segments left behind"
    for cfg in configs:
        world = cfg["world"]
        if cfg["split"] == "time":  # measured, so it may differ from run to run: emulate the ranks' split
            splits_got = {torch.load(tmp_path / f"{cfg['id']}.rank{r}.pt", weights_only=False)["split"]
                          for r in range(world)}
            assert len(splits_got) == 1, splits_got
            cfg = {**cfg, "split": splits_got.pop()}
        expected, ad = emulate(pipes(cfg["arch"]), cfg)
        assert not (tmp_path / f"{cfg['id']}.rank{world}.pt").exists(), "a rank outside the world ran"
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
            # the weights this rank held: its own blocks and the glue, or everything
            assert set(got["real"]) == held_names(ad, rank, cfg["keep_weights"]), f"{cfg['id']} rank {rank}"
            assert (got["freed"] > 0) != cfg["keep_weights"]
            # the step breakdown: one transport event per asynchronous call (stride 2: every other call);
            # a sharded warm-up call (the second pipeline call's first) is one event per unit, plus the one
            # that ends warm-up
            stats = got["stats"]
            assert ("async" in stats) == (cfg["warm_up"] < STEPS), (cfg["id"], stats)
            if "async" in stats:
                events = stats["async"]["events per call"]
                assert (events == 1) if cfg["stride"] == 1 else (0 < events < 1), (cfg["id"], stats)
                assert stats["async"]["bytes per call"]["bytes received"] > 0
                assert 0 < stats["async"]["ms per call"]["bookkeeping"] < stats["async"]["ms per call"]["compute"]
            if cfg["repeat"] == 2 and cfg["warm_up"] == 1:
                ends = int(_core.Schedule(cfg["model_n"], cfg["stride"], 1, 0, STEPS).plan(rank, 0).exchange)
                relays = 0 if cfg["keep_weights"] else len(ad.split.owner)
                assert stats["warm-up"]["events per call"] == relays + ends, (cfg["id"], stats)
            for phase in stats.values():
                assert all(v >= 0 for v in phase["ms per call"].values()), (cfg["id"], stats)
            # encoders="rank0": the other ranks received the embeddings and dropped their text encoders
            rank0 = cfg["encoders"] == "rank0"
            assert got["encoders_left"] == ([] if rank0 and rank else got["encoders"]), cfg["id"]
            assert len(got["encoders"]) >= 2 or not rank0  # SDXL has two, SD3 three
            # after remove(): a complete pipeline is usable; a sharded one says it must be reloaded
            if cfg["keep_weights"]:
                assert got["again"] == "attached" and got.get("guard", "ran") == "ran", cfg["id"]
            else:
                assert "meta device" in got["again"] and "reload" in got["again"], got["again"]
                if cfg["after_remove"]:
                    assert "keep_weights=True" in got["guard"] and f"rank {rank}" in got["guard"], got["guard"]


def held_names(ad, rank: int, keep_weights: bool) -> set:
    """The denoiser tensors a rank keeps (docs/design.md §6.5), from the split alone."""
    units = shard.tensor_units(ad.layout, ad.split.owner, ad.denoiser)
    if keep_weights:
        return set(units)
    component = rank if rank < ad.model_n else ad.model_n - 1
    mine = set(ad.split.components[component])
    held = {name for name, unit in units.items() if unit is None or unit in mine}
    held.add(shard.first_parameter(ad.denoiser))  # diffusers reads the device from it
    assert len(held) < len(units) and {u for u in units.values() if u is not None} - mine
    return held


def test_wrong_world_size_fails_on_every_rank(tmp_path):
    cfg = [dict(id="bad", arch="sd15", model_n=2, stride=1, warm_up=1, steps=3)]
    results = mp.launch(3, cfg, tmp_path)
    for rank, (code, log) in enumerate(results):
        assert code != 0
        assert "world size" in log and "ValueError" in log, log[-2000:]
