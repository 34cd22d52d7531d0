"""What a rank holds (docs/design.md §6.5), in one process: which tensors are
glue, which a component keeps, the move to the meta device, the shapes a
receiver expects in a warm-up through the owners, and the errors.

The multi-process side (every rank of 2-5 rank runs holds exactly its blocks
and the glue, and the images equal the emulation) is in test_multiprocess.py.
"""

import pytest
import torch

from asyncdiff import AsyncDiff, arch, hooks, shard, splits
from asyncdiff.outputs import flatten
from asyncdiff.probe import probe
from asyncdiff.testing import tiny

from test_exchange import denoiser_call


def test_tensor_units_and_place_keep_exactly_the_component_and_the_glue():
    unet = tiny.build_unet("sd15", seed=0)
    layout = arch.describe(unet)
    split = splits.resolve_static(layout, 2, "paper")
    units = shard.tensor_units(layout, split.owner, unet)
    glue = {n for n, u in units.items() if u is None}
    # the glue of a UNet: time embedding and the output norm/conv are not in it when they are units
    assert any(n.startswith("time_embedding.") for n in glue)
    assert not any(n.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in.")) for n in glue)
    # a refined block's parts belong to their own units
    assert units["up_blocks.1.attentions.1.proj_in.weight"] == "u1.a1"
    assert units["up_blocks.1.resnets.1.conv1.weight"] == "u1.r1"
    sizes = {n: t.numel() * t.element_size() for n, t in [*unet.named_parameters(), *unet.named_buffers()]}
    before = dict(unet.named_parameters())
    held = shard.held_units(split.components, 1)
    freed = shard.place(unet, layout, split.owner, held, None)
    real = {n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if not t.is_meta}
    # and the first parameter, which diffusers reads the model's device from
    assert shard.first_parameter(unet) == "conv_in.weight" and units["conv_in.weight"] not in held
    assert real == glue | {n for n, u in units.items() if u in held} | {"conv_in.weight"}
    assert unet.device.type == "cpu"
    assert freed == sum(sizes[n] for n in units if n not in real)
    assert shard.meta_names(unet) and set(shard.meta_names(unet)) == set(units) - real
    # real tensors kept their Parameter objects; meta ones keep shape and dtype
    for name, p in unet.named_parameters():
        assert p.shape == before[name].shape and p.dtype == before[name].dtype
        if name in real:
            assert p is before[name]


def test_place_without_a_split_moves_only_the_glue():
    unet = tiny.build_unet("sd15", seed=0)
    layout = arch.describe(unet)
    assert shard.place(unet, layout, layout.top, None, "meta") > 0  # "meta" as the device: only glue moves
    units = shard.tensor_units(layout, layout.top, unet)
    # glue, and the first parameter, which goes wherever the glue goes
    assert set(shard.meta_names(unet)) == {n for n, u in units.items() if u is None} | {"conv_in.weight"}


@pytest.mark.parametrize("arch_name", ["sd15", "sdxl", "sd3"])
def test_probe_gives_every_units_output_as_it_runs(arch_name):
    """What a receiver allocates in a warm-up through the owners is exactly what
    the owner computes: structure, shapes and dtypes of every unit, and the result."""
    den, args, kwargs = denoiser_call(arch_name)
    layout = arch.describe(den)
    seen, handles = {}, []
    for name in layout.paths:
        def keep(_m, _a, _k, out, name=name):
            spec, ts = flatten(out)
            seen[name] = (spec, [(tuple(t.shape), t.dtype) for t in ts])
        handles.append(layout.module(name, den).register_forward_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            result = flatten(den(*args, **kwargs))[1][0]
    finally:
        for h in handles:
            h.remove()
    p = probe(layout, den, args, kwargs)
    assert p.outputs == seen
    assert p.result == (tuple(result.shape), result.dtype)


def test_a_denoiser_on_the_meta_device_is_refused_by_name(pipes):
    pipe = tiny.build_pipeline("sd15", seed=0)
    pipe.unet.down_blocks[1].to("meta")
    with pytest.raises(ValueError, match=r"pipeline: the denoiser's weights are on the meta device.*reload"):
        AsyncDiff(pipe, model_n=2)
    assert hooks.attached_hook(pipe.unet) is None


def test_keep_weights_is_validated_and_one_process_keeps_every_weight(pipes):
    pipe = pipes("sd15")
    with pytest.raises(TypeError, match="keep_weights: expected a bool"):
        AsyncDiff(pipe, model_n=2, keep_weights="no")
    for kwargs in ({}, {"devices": ["cpu", "cpu"]}):
        ad = AsyncDiff(pipe, model_n=2, **kwargs)
        try:
            assert not ad.sharded
            kw = tiny.default_call_kwargs("sd15")
            kw["num_inference_steps"] = 2
            pipe(**kw)
            assert not shard.meta_names(pipe.unet) and ad.freed == 0
        finally:
            ad.remove()
    assert hooks.attached_hook(pipe.unet, shard.GUARD_HOOK) is None


def test_the_guard_says_why_a_sharded_denoiser_cannot_run():
    unet = tiny.build_unet("sd15", seed=0)
    hooks.register(unet, shard.Guard(rank=1, component=1), shard.GUARD_HOOK)
    with pytest.raises(RuntimeError, match=r"rank 1 kept only the blocks of component 1.*keep_weights=True"):
        unet(torch.zeros(1, 4, 8, 8), 1, encoder_hidden_states=torch.zeros(1, 77, 32))


def test_split_memory_balances_weight_bytes_on_the_real_sd15_config():
    """split="memory": the least weight per rank, decided at attach (no input shapes needed)."""
    unet = tiny.build_real_unet("sd15")  # meta device: sizes only
    layout = arch.describe(unet)
    units = shard.tensor_units(layout, layout.paths, unet)
    sizes = {n: t.numel() * t.element_size() for n, t in [*unet.named_parameters(), *unet.named_buffers()]}
    full = sum(sizes.values())
    for n, bound in ((2, 0.6), (4, 0.33)):
        split = splits.resolve_static(layout, n, "memory", unet)
        assert split.source == "memory" and len(split.components) == n
        owner = split.owner
        per = [0] * n
        for name, unit in shard.tensor_units(layout, owner, unet).items():
            for r in range(n):
                if unit is None or owner[unit] == r:
                    per[r] += sizes[name]
        assert max(per) <= bound * full, (n, max(per) / full)
        paper = splits.resolve_static(layout, n, "paper")
        paper_max = max(sum(sizes[m] for m, u in shard.tensor_units(layout, paper.owner, unet).items()
                            if u is None or paper.owner[u] == r) for r in range(n))
        assert max(per) < paper_max
    assert units  # every unit of the layout has tensors
    with pytest.raises(TypeError, match="split: 'memory' needs the denoiser"):
        splits.resolve_static(layout, 2, "memory")


# ------------------------------------------------- text encoders on rank 0 only

def _relays(pipes_two, timeout=30.0):
    """Two ranks' PromptRelays in one process, meeting in a real (in-memory) store."""
    import torch.distributed as dist

    from asyncdiff import encoders, launch

    store = dist.HashStore()
    return [encoders.PromptRelay(pipe, launch.Board(store, rank, 2, timeout, hosted=False), torch.device("cpu"))
            for rank, pipe in enumerate(pipes_two)]


def test_rank0_encodes_and_the_other_rank_receives_the_same_embeddings():
    from asyncdiff import encoders

    pipes_two = [tiny.build_pipeline("sdxl", seed=0), tiny.build_pipeline("sdxl", seed=0)]
    names = sorted(encoders.text_encoders(pipes_two[1]))
    expected = pipes_two[1].encode_prompt("a red house", device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=True)
    relay0, relay1 = _relays(pipes_two)
    assert names == ["text_encoder", "text_encoder_2"] and encoders.text_encoders(pipes_two[1]) == {}
    assert relay1.freed > 0 and relay0.freed == 0 and sorted(encoders.text_encoders(pipes_two[0])) == names
    for _ in range(2):  # numbered posts: a second pipeline call reads the second post
        sent = pipes_two[0].encode_prompt("a red house", device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=True)
        got = pipes_two[1].encode_prompt("ignored on rank 1", device="cpu")
        assert len(got) == len(expected) == 4
        for a, b, c in zip(sent, got, expected):
            assert torch.equal(a, b) and torch.equal(b, c)
    relay0.remove()
    relay1.remove()
    assert "encode_prompt" not in pipes_two[0].__dict__
    with pytest.raises(RuntimeError, match="text encoders were dropped by AsyncDiff\\(encoders='rank0'\\)"):
        pipes_two[1].encode_prompt("again")


def test_a_failing_rank0_encode_reaches_the_other_rank_by_name():
    from asyncdiff import _core

    pipes_two = [tiny.build_pipeline("sd15", seed=0), tiny.build_pipeline("sd15", seed=0)]
    _relays(pipes_two)
    with pytest.raises(AttributeError):
        pipes_two[0].encode_prompt(None, "cpu", 1, True)  # no prompt and no embeddings
    with pytest.raises(_core.AsyncDiffPeerError, match="rank 0 failed: AttributeError"):
        pipes_two[1].encode_prompt("a red house", "cpu", 1, True)


def test_encoders_option_is_validated_and_changes_nothing_in_one_process(pipes):
    pipe = pipes("sd15")
    with pytest.raises(ValueError, match="encoders: expected 'all' .* or 'rank0'"):
        AsyncDiff(pipe, model_n=2, encoders="rank1")
    ad = AsyncDiff(pipe, model_n=2, encoders="rank0")
    try:
        assert pipe.text_encoder is not None and "encode_prompt" not in pipe.__dict__
    finally:
        ad.remove()


def test_stats_say_where_the_calls_time_went(pipes):
    """In one process: the forwards, the bookkeeping around them, no transport."""
    pipe = pipes("sd15")
    ad = AsyncDiff(pipe, model_n=2, warm_up=2)
    try:
        kw = tiny.default_call_kwargs("sd15")
        kw["num_inference_steps"] = 5
        pipe(**kw)
        stats = ad.stats
    finally:
        ad.remove()
    assert stats["warm-up"]["calls"] == 1 and stats["async"]["calls"] == 3  # the first call is left out
    ms = stats["async"]["ms per call"]
    assert ms["compute"] > 0 and 0 < ms["bookkeeping"] and "exchange" not in ms
    assert stats["async"]["events per call"] == 0
