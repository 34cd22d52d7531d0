"""Real-size denoisers and their inputs, for the benchmarks that need shapes or FLOPs.

Everything defaults to the ``meta`` device: the modules and tensors have real
shapes and dtypes but no storage, so a forward computes nothing and costs no
memory.  The same builders give real tensors on another device (``gpu.py``).

Inputs are those of one denoiser call of the pipeline at the stated size,
with classifier-free guidance batched in (``batch=2``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from asyncdiff import _core, splits
from asyncdiff import arch as _arch
from asyncdiff.config import AsyncDiffConfig
from asyncdiff.exchange import ExchangePlan, Slots
from asyncdiff.outputs import flatten
from asyncdiff.testing import tiny

# arch -> default image side in pixels (SVD: height; its width is fixed below)
DEFAULT_PX = {"sd15": 512, "sd21": 768, "sdxl": 1024, "svd": 576, "upscaler": 512, "sd3": 1024}
NAMES = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL", "svd": "SVD", "upscaler": "x4 upscaler", "sd3": "SD3"}
SVD_WIDTH = 1024
TEXT_TOKENS = 77
SD3_TOKENS = 77 + 256  # CLIP tokens followed by T5 tokens, as SD3's pipeline concatenates them


@dataclass
class Case:
    arch: str
    model: torch.nn.Module
    layout: _arch.Layout
    args: tuple
    kwargs: dict
    desc: str  # human description of the inputs


def build(arch: str, device="meta", dtype=torch.float16, seed: int | None = None) -> torch.nn.Module:
    """The real-size denoiser of ``arch`` (random weights when not on meta)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = tiny.build_real_unet(arch, device=device, dtype=dtype)
    # Some parameters are made with legacy constructors that ignore the device
    # context (SVD's mix_factor ends up on the CPU): move everything.
    return model.to(device=device)


def inputs(arch: str, model, device="meta", dtype=torch.float16, batch: int = 2, px: int | None = None,
           frames: int = 25, generator=None):
    """(args, kwargs, description) of one denoiser call at real size."""
    cfg = model.config
    px = px or DEFAULT_PX[arch]

    def rand(*shape, dt=dtype):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device, dtype=dt)
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dt)

    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    if arch in ("sd15", "sd21"):
        lat = px // 8
        kw = dict(encoder_hidden_states=rand(batch, TEXT_TOKENS, cfg.cross_attention_dim))
        return (rand(batch, cfg.in_channels, lat, lat), t), kw, f"{px}x{px} px (latent {lat}x{lat}), batch {batch}"
    if arch == "sdxl":
        lat = px // 8
        kw = dict(
            encoder_hidden_states=rand(batch, TEXT_TOKENS, cfg.cross_attention_dim),
            added_cond_kwargs=dict(text_embeds=rand(batch, 1280), time_ids=rand(batch, 6)),
        )
        return (rand(batch, cfg.in_channels, lat, lat), t), kw, f"{px}x{px} px (latent {lat}x{lat}), batch {batch}"
    if arch == "upscaler":
        lat = px // 4  # the x4 upscaler works at the low-resolution size
        kw = dict(encoder_hidden_states=rand(batch, TEXT_TOKENS, cfg.cross_attention_dim),
                  class_labels=torch.full((batch,), 20, device=device, dtype=torch.long))
        return ((rand(batch, cfg.in_channels, lat, lat), t), kw,
                f"{px}x{px} px out ({lat}x{lat} low-res input and latent), batch {batch}")
    if arch == "svd":
        h, w = px // 8, SVD_WIDTH // 8
        kw = dict(encoder_hidden_states=rand(batch, 1, cfg.cross_attention_dim), added_time_ids=rand(batch, 3))
        return ((rand(batch, frames, cfg.in_channels, h, w), t), kw,
                f"{frames} frames at {px}x{SVD_WIDTH} px (latent {h}x{w}), batch {batch}")
    if arch == "sd3":
        lat = px // 8
        kw = dict(encoder_hidden_states=rand(batch, SD3_TOKENS, cfg.joint_attention_dim),
                  pooled_projections=rand(batch, cfg.pooled_projection_dim),
                  timestep=torch.full((batch,), 500.0, device=device, dtype=dtype))
        return ((rand(batch, cfg.in_channels, lat, lat),), kw,
                f"{px}x{px} px (latent {lat}x{lat}), {SD3_TOKENS} text tokens, batch {batch}")
    raise ValueError(f"no real-size inputs for {arch!r}")


def case(arch: str, device="meta", dtype=torch.float16, batch: int = 2, px: int | None = None, frames: int = 25,
         seed: int | None = None) -> Case:
    model = build(arch, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    args, kwargs, desc = inputs(arch, model, device, dtype, batch, px, frames, gen)
    return Case(arch, model, _arch.describe(model), args, kwargs, desc)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def output_shapes(c: Case, units) -> tuple[dict, list]:
    """({unit: [(shape, dtype), ...]}, [(shape, dtype)] of the denoiser output) from one forward."""
    got: dict[str, list] = {}
    handles = []

    def hook(name):
        def fn(_m, _a, out):
            got[name] = [(tuple(x.shape), x.dtype) for x in flatten(out)[1]]
        return fn

    try:
        for u in units:
            handles.append(c.layout.module(u, c.model).register_forward_hook(hook(u)))
        with torch.no_grad():
            out = c.model(*c.args, **c.kwargs)
    finally:
        for h in handles:
            h.remove()
    tensors = flatten(out)[1]
    return got, [(tuple(tensors[0].shape), tensors[0].dtype)]


def size_of(shapes) -> int:
    return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for s, d in shapes)


def split_of(c: Case, n: int, which: str = "paper") -> splits.Split:
    if which == "paper":
        return splits.resolve_static(c.layout, n, "paper")
    order, costs = splits.count_costs(c.layout, c.model, c.args, c.kwargs)
    return splits.auto(c.layout, n, order, costs)


def _float32(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to(torch.float32) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    return obj


def exchange_plan(c: Case, split: splits.Split, n: int, stride: int = 1) -> tuple[ExchangePlan, bool]:
    """(the library's exchange plan for this case, whether it fell back on these inputs).

    ``ExchangePlan.trace`` answers "everything" when its trace cannot run.
    When that happens here, the trace is retried in float32 on the meta device
    (the dependencies do not depend on the dtype) and the second answer is
    returned with ``fell_back=True``, so that a table can show both what the
    design moves and that the library did not get there on these inputs."""
    config = AsyncDiffConfig(n, stride, 1, False, split=str(split))
    everything = ExchangePlan.everything(split, config.world_size, n).receives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = ExchangePlan.trace(config, c.layout, split, c.model, c.args, c.kwargs)
        if got.receives != everything:
            return got, False
        model32 = build(c.arch, "meta", torch.float32)
        again = ExchangePlan.trace(config, c.layout, split, model32, _float32(c.args), _float32(c.kwargs))
    return again, again.receives != got.receives


def exchange(c: Case, split: splits.Split, n: int, stride: int = 1) -> dict:
    """What one asynchronous event moves for this split, with the library's exchange plan.

    Returns ``units`` {unit: [(shape, dtype)]}, ``result`` [(shape, dtype)],
    ``plan`` (the ``ExchangePlan``), ``needs`` {rank: units it receives},
    ``fell_back`` (see :func:`exchange_plan`), ``everything`` {rank: units}
    (the conservative fallback), ``world``, ``stride``."""
    world = n + stride - 1
    units, result = output_shapes(c, list(split.owner))
    plan, fell_back = exchange_plan(c, split, n, stride)
    return {"units": units, "result": result, "plan": plan, "needs": plan.receives, "fell_back": fell_back,
            "everything": ExchangePlan.everything(split, world, n).receives, "world": world, "stride": stride,
            "n": n}


def slot_plan(ex: dict) -> dict:
    """Byte slots and per-rank sends/receives of one stride-1 asynchronous event
    (a call k >= warm_up that is not the last), as the rank step lays them out.

    Returns ``{"bytes": total slot bytes, "ranks": {rank: {"sends": [(dsts, off, nbytes, tag)],
    "recvs": [(src, off, nbytes, tag)]}}}``; ``tag`` numbers the slots."""
    slots = Slots(ex["units"], ex["result"][0])
    schedule = _core.Schedule(ex["n"], ex["stride"], 1, 0, 3)
    tags = {off: i for i, off in enumerate(sorted(off for entries in slots.of.values() for off, _ in entries))}
    ranks = {}
    for r in range(ex["world"]):
        sends, recvs = ex["plan"].event(r, schedule.plan(r, 1), slots)
        ranks[r] = {"sends": sorted(([*m.peers], m.offset, m.nbytes, tags[m.offset]) for m in sends),
                    "recvs": sorted((m.peers[0], m.offset, m.nbytes, tags[m.offset]) for m in recvs)}
    return {"bytes": slots.nbytes, "ranks": ranks}
