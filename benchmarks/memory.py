"""Denoiser weights per rank: sharded (the default under a launch) vs the whole model on every rank.

Under torchrun each rank keeps only the parameters and buffers of the units of
the component it computes (``Schedule.component_of(rank)``; with stride 2 the
extra rank keeps the last component's) plus the *glue*, every tensor outside
every unit of the split; ``AsyncDiff(..., keep_weights=True)`` keeps the whole
denoiser on every rank (the original AsyncDiff scheme).  This script counts
the bytes with the library's own functions (``shard.tensor_units``,
``shard.held_units``, ``Schedule.component_of``), in four parts:

1. **Per-rank denoiser bytes** of SD 1.5, SDXL, SD3 medium and FLUX.1-dev at
   their real sizes, built on the ``meta`` device from the shipped configs (no
   download, no memory), in the dtype they are deployed in (fp16; bf16 for
   Flux), for N = 2, 3, 4, 8 (stride 1) and N = 2, 3 (stride 2), with the split
   AsyncDiff uses by default (the paper preset where one exists, else the
   automatic FLOP split counted on the meta model with real-size inputs), next
   to the issue's targets (PASS/FAIL).  For the targets the automatic split and
   the contiguous split balanced on bytes are shown as well.
2. **The largest denoiser that fits** on N devices of 24 and 80 GiB, from the
   measured per-rank fraction of the Flux transformer (weights only).
3. **Measured RSS** of a 2-rank CPU run of the real SD 1.5 UNet (fp32, random
   weights), sharded vs ``keep_weights=True`` (``--skip-rss`` skips it).
4. **The other pipeline parts** (text encoders, VAE), built on the meta device
   from their published configurations written out below.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
ARCHS = "sd15,sdxl,sd3,flux"
NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "sd3": "SD3 medium", "flux": "FLUX.1-dev"}
FLUX_CONFIG = _util.ROOT / "asyncdiff" / "testing" / "configs" / "flux_dev_transformer.json"
FLUX_PX, FLUX_T5_TOKENS = 1024, 512
# (arch, N) -> the bound on the largest rank's share of the denoiser (stride 1)
TARGETS = {("sd15", 2): 0.6, ("sd15", 4): 0.33, ("flux", 4): 0.3}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=ARCHS, help=f"comma list of {ARCHS}")
    ap.add_argument("--n", default="2,3,4,8", help="model_n values (stride 1)")
    ap.add_argument("--stride2-n", default="2,3", help="model_n values also shown with stride 2 ('' for none)")
    ap.add_argument("--capacity-gib", default="24,80", help="device memory sizes for the 'largest model' table")
    ap.add_argument("--devices", default="1,2,4,8", help="device counts for the 'largest model' table")
    ap.add_argument("--headroom", type=float, default=0.10,
                    help="share of each device's memory kept free (CUDA context, allocator, fragmentation)")
    ap.add_argument("--skip-rss", action="store_true", help="skip the measured 2-rank CPU run")
    ap.add_argument("--rss-latent", type=int, default=16, help="RSS run: latent side (x8 = px); 16 -> 128x128 px")
    ap.add_argument("--rss-steps", type=int, default=4, help="RSS run: denoising steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0, help="RSS run: seconds of silence before giving up")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # set in the rank processes
    return ap.parse_args(argv)


# ------------------------------------------------------------------ models
@dataclass
class Model:
    arch: str
    model: object  # torch.nn.Module on the meta device
    layout: object  # asyncdiff.arch.Layout
    args: tuple
    kwargs: dict
    desc: str
    dtype: object


def build_flux(dtype=None, device="meta", batch: int = 1, px: int = FLUX_PX, t5_tokens: int = FLUX_T5_TOKENS):
    """FLUX.1-dev's transformer from the shipped config, and the inputs of one
    FluxPipeline denoiser call at ``px`` (guidance-distilled: batch 1, the
    guidance scale is an input; 2x2-packed latents: (px/16)^2 tokens of 64)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from asyncdiff import arch

    dtype = dtype or torch.bfloat16
    cfg = json.loads(FLUX_CONFIG.read_text())
    with torch.device(device):
        model = FluxTransformer2DModel.from_config(cfg)
    model = model.to(dtype=dtype).eval()
    side = px // 16
    tokens = side * side

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, device=device, dtype=dt)

    kwargs = dict(hidden_states=empty(batch, tokens, cfg["in_channels"]),
                  encoder_hidden_states=empty(batch, t5_tokens, cfg["joint_attention_dim"]),
                  pooled_projections=empty(batch, cfg["pooled_projection_dim"]),
                  timestep=empty(batch), img_ids=empty(tokens, 3), txt_ids=empty(t5_tokens, 3),
                  guidance=empty(batch, dt=torch.float32), return_dict=False)
    desc = (f"{px}x{px} px (latent {px // 8}x{px // 8} packed to {tokens} tokens), {t5_tokens} T5 tokens, "
            f"batch {batch}")
    return Model("flux", model, arch.describe(model), (), kwargs, desc, dtype)


def build(arch: str) -> Model:
    """The real-size denoiser of ``arch`` on the meta device, in its deployment dtype."""
    import torch

    if arch == "flux":
        return build_flux()
    import _models

    dtype = torch.float16
    c = _models.case(arch, dtype=dtype)
    return Model(arch, c.model, c.layout, c.args, c.kwargs, c.desc, dtype)


# ---------------------------------------------------------------- counting
def tensor_sizes(model) -> dict:
    """Bytes of every parameter and buffer of ``model``, by name, each tensor once."""
    out = {}
    for name, t in [*model.named_parameters(remove_duplicate=True), *model.named_buffers(remove_duplicate=True)]:
        out[name] = t.numel() * t.element_size()
    return out


@dataclass
class Holding:
    full: int  # bytes of the whole denoiser
    glue: int  # bytes outside every unit of the split (kept by every rank)
    units: dict  # unit -> bytes
    ranks: list  # bytes each rank holds, in rank order
    components: list  # the component each rank computes

    @property
    def max(self) -> int:
        return max(self.ranks)

    @property
    def fraction(self) -> float:
        return self.max / self.full


def rank_bytes(model, layout, split, stride: int = 1) -> Holding:
    """What each rank of a launch keeps of ``model`` with ``split`` (sharded):
    the glue plus the units of ``Schedule.component_of(rank)``."""
    from asyncdiff import _core, shard

    n = len(split.components)
    sizes = tensor_sizes(model)
    units = Counter()
    glue = 0
    for name, unit in shard.tensor_units(layout, split.owner, model).items():
        if unit is None:
            glue += sizes[name]
        else:
            units[unit] += sizes[name]
    schedule = _core.Schedule(n, stride, 1, 0, 1)
    comps = [schedule.component_of(r) for r in range(schedule.world_size)]
    ranks = [glue + sum(units[u] for u in shard.held_units(split.components, c)) for c in comps]
    # every rank also keeps the first parameter real (diffusers reads the device from it)
    first = shard.first_parameter(model)
    owner = shard.tensor_units(layout, split.owner, model).get(first)
    if owner is not None:
        ranks = [b + (0 if owner in shard.held_units(split.components, c) else sizes[first])
                 for b, c in zip(ranks, comps)]
    return Holding(sum(sizes.values()), glue, dict(units), ranks, comps)


class Splits:
    """The splits of one model: default (what AsyncDiff picks), auto (FLOPs), split="memory"."""

    def __init__(self, m: Model):
        from asyncdiff import splits

        self.m = m
        self.order, self.flops = splits.count_costs(m.layout, m.model, m.args, m.kwargs)

    def get(self, n: int, which: str = "default"):
        from asyncdiff import splits

        layout = self.m.layout
        if which == "default":
            static = splits.resolve_static(layout, n, None)
            return static if static is not None else splits.auto(layout, n, self.order, self.flops)
        if which == "auto":
            return splits.auto(layout, n, self.order, self.flops)
        if which == "bytes":  # AsyncDiff(split="memory")
            return splits.resolve_static(layout, n, "memory", self.m.model)
        raise ValueError(which)

    def flop_balance(self, split) -> float:
        from asyncdiff import splits

        per = splits.component_costs(self.m.layout, split, self.order, self.flops)
        return max(per) / (sum(per) / len(per))


# ------------------------------------------------------------ other parts
def other_parts():
    """(pipeline, part, class, params, dtype) of the text encoders and VAEs, each
    built on the meta device from its published configuration (written out
    here: the shared model configs hold only the denoisers)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    def count(make):
        with torch.device("meta"):
            mod = make()
        return sum(tensor_sizes(mod).values()) // 4  # built in fp32: bytes / 4 = elements

    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    clip_g = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
    t5_xxl = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    vae_cfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                   up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                   layers_per_block=2)
    n = {
        "clip_l": count(lambda: CLIPTextModel(CLIPTextConfig(**clip_l))),
        "clip_l_proj": count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip_l))),
        "clip_g_proj": count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip_g))),
        "t5": count(lambda: T5EncoderModel(T5Config(**t5_xxl))),
        "vae4": count(lambda: AutoencoderKL(**vae_cfg, latent_channels=4)),
        "vae16": count(lambda: AutoencoderKL(**vae_cfg, latent_channels=16, use_quant_conv=False,
                                             use_post_quant_conv=False)),
    }
    fp16, bf16 = "fp16", "bf16"
    return {
        "sd15": [("text encoder", "CLIP ViT-L/14 text (CLIPTextModel)", n["clip_l"], fp16),
                 ("VAE", "AutoencoderKL, 4 latent channels", n["vae4"], fp16)],
        "sdxl": [("text encoder", "CLIP ViT-L/14 text (CLIPTextModel)", n["clip_l"], fp16),
                 ("text encoder 2", "OpenCLIP bigG/14 text (CLIPTextModelWithProjection)", n["clip_g_proj"], fp16),
                 ("VAE", "AutoencoderKL, 4 latent channels", n["vae4"], fp16)],
        "sd3": [("text encoder", "CLIP ViT-L/14 text (CLIPTextModelWithProjection)", n["clip_l_proj"], fp16),
                ("text encoder 2", "OpenCLIP bigG/14 text (CLIPTextModelWithProjection)", n["clip_g_proj"], fp16),
                ("text encoder 3", "T5-XXL v1.1 encoder (T5EncoderModel)", n["t5"], fp16),
                ("VAE", "AutoencoderKL, 16 latent channels", n["vae16"], fp16)],
        "flux": [("text encoder", "CLIP ViT-L/14 text (CLIPTextModel)", n["clip_l"], bf16),
                 ("text encoder 2", "T5-XXL v1.1 encoder (T5EncoderModel)", n["t5"], bf16),
                 ("VAE", "AutoencoderKL, 16 latent channels", n["vae16"], bf16)],
    }


# ----------------------------------------------------------- the RSS runs
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_now() -> int:
    """Current resident set (bytes), after ``gc.collect()`` and glibc's ``malloc_trim(0)``."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass
    return _status_kib("VmRSS") * 1024


def rss_worker(args):
    import resource

    import end_to_end
    import torch

    from asyncdiff import AsyncDiff

    job = json.loads(args.job)
    _util.set_threads(1)
    start = _rss_now()
    e2e = argparse.Namespace(seed=args.seed, unet="real", latent=args.rss_latent, steps=args.rss_steps,
                             guidance=7.5)
    pipe, call = end_to_end.build("sd15", e2e)
    full = sum(tensor_sizes(pipe.unet).values())
    built = _rss_now()
    ad = AsyncDiff(pipe, model_n=2, stride=1, keep_weights=job["keep_weights"], timeout=args.timeout)
    attached = _rss_now()
    with torch.no_grad():
        out = call()
    real = sum(t.numel() * t.element_size() for t in [*pipe.unet.parameters(), *pipe.unet.buffers()]
               if not t.is_meta)
    after = _rss_now()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {"start": start, "built": built, "attached": attached, "after": after, "peak": peak,
              "full": full, "real": real, "freed": ad.freed,
              "split": str(ad.split), "out": out.detach().float().reshape(-1).tolist()}
    ad.remove()
    _util.rank_result(result)


def rss_counted(split_text: str) -> list:
    """Part 1's count for the RSS run: the fp32 SD 1.5 UNet on meta, this split, stride 1."""
    import _models
    import torch

    from asyncdiff import arch, splits

    model = _models.build("sd15", "meta", torch.float32)
    layout = arch.describe(model)
    split = splits.resolve_static(layout, 2, split_text)
    return rank_bytes(model, layout, split, 1).ranks


def rss_runs(args) -> dict:
    runs = {}
    argv = [a for a in sys.argv[1:]]
    for label, keep in (("sharded (default)", False), ("keep_weights=True", True)):
        job = json.dumps({"keep_weights": keep})
        runs[label] = _util.launch(Path(__file__).resolve(), argv + ["--job", job], world=2, threads=1,
                                   silence=args.timeout)
        print(f"  done: RSS run, {label}", file=sys.stderr, flush=True)
    return runs


# -------------------------------------------------------------------- main
def gib(x: float) -> float:
    return x / GIB


def short_dtype(dtype) -> str:
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))


def main(argv=None):
    args = parse_args(argv)
    if args.job is not None:
        return rss_worker(args)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        if a not in NAMES:
            raise SystemExit(f"--archs: unknown {a!r} (expected {ARCHS})")
    ns = _util.int_list(args.n)
    ns2 = _util.int_list(args.stride2_n) if args.stride2_n.strip() else []
    _util.preamble(
        "Denoiser memory per rank: sharded (default) vs whole model on every rank",
        threads=None,
        notes=[
            ("parts 1, 2, 4: meta device (shapes and dtypes only, nothing allocated), counted with the library's "
             "`shard.tensor_units` / `shard.held_units` / `Schedule.component_of`; bytes = parameters + buffers"),
            "deployment dtypes: SD 1.5, SDXL, SD3 medium in fp16; FLUX.1-dev in bf16 (its released weights)",
            ("split = what AsyncDiff uses by default: the paper preset where one exists for the family and N, else "
             "the automatic FLOP split (`splits.count_costs` on the meta model with the inputs listed below)"),
            ("glue = every tensor outside every unit of the split (time/text embeddings, patch embedding): every "
             "rank keeps it; a rank holds glue + the units of the component it computes (stride 2: the extra "
             "rank holds the last component's)"),
            "original = `keep_weights=True` (the original AsyncDiff scheme): the whole denoiser on every rank",
            "GiB = 2^30 bytes, MiB = 2^20 bytes; B = 10^9 parameters",
        ],
    )

    # ------------------------------------------------------ part 1
    models, split_sets, rows, split_notes, inputs_notes = {}, {}, [], [], []
    fractions: dict = {}
    for arch in archs:
        m = build(arch)
        models[arch] = m
        split_sets[arch] = s = Splits(m)
        inputs_notes.append(f"{NAMES[arch]}: {type(m.model).__name__}, "
                            f"{sum(p.numel() for p in m.model.parameters()) / 1e9:.3f} B parameters, "
                            f"{short_dtype(m.dtype)}; FLOPs counted (traced on the meta device) for {m.desc}")
        for n in ns:
            split = s.get(n)
            for stride in [1] + ([2] if n in ns2 else []):
                h = rank_bytes(m.model, m.layout, split, stride)
                fractions[(arch, n, stride)] = h.fraction
                target = TARGETS.get((arch, n)) if stride == 1 else None
                verdict = None if target is None else f"{'PASS' if h.fraction <= target else 'FAIL'} (<= {target})"
                rows.append([NAMES[arch], n, stride, len(h.ranks), split.source, gib(h.full), h.glue / MIB,
                             " / ".join(f"{gib(b):.2f}" for b in h.ranks), gib(h.max), h.fraction, gib(h.full),
                             verdict])
            split_notes.append(f"{NAMES[arch]} N={n} ({split.source}): `{split}`")
        print(f"  done: {arch}", file=sys.stderr, flush=True)
    print("### 1. Denoiser bytes per rank\n")
    for note in inputs_notes:
        print(f"- {note}")
    print()
    print(_util.table(["model", "N", "S", "ranks", "split", "full GiB", "glue MiB", "per rank GiB",
                       "max rank GiB", "max / full", "original GiB / rank", "target"], rows,
                      align="lrrrlrrlrrrl"))
    print()

    # targets: default vs auto vs bytes-balanced
    trows = []
    for (arch, n), target in TARGETS.items():
        if arch not in models or n not in ns:
            continue
        m, s = models[arch], split_sets[arch]
        default = s.get(n)
        cands = [("default (" + default.source + ")", default)]
        h = rank_bytes(m.model, m.layout, default, 1)
        if default.source != "auto":
            cands.append(("auto (FLOPs)", s.get(n, "auto")))
        cands.append(('split="memory" (balanced on bytes)', s.get(n, "bytes")))
        for label, sp in cands:
            hh = rank_bytes(m.model, m.layout, sp, 1)
            trows.append([NAMES[arch], n, label, hh.fraction, target, "PASS" if hh.fraction <= target else "FAIL",
                          s.flop_balance(sp), f"`{sp}`" if "memory" in label else ""])
    if trows:
        print("Targets (stride 1): the default split, the automatic FLOP split (when the default is a preset) "
              "and `split=\"memory\"` (the C partitioner run on each fine unit's weight bytes); FLOP max/mean "
              "shows what each split costs in compute balance (1.00 = perfect):\n")
        print(_util.table(["model", "N", "split", "max / full", "target", "verdict", "FLOP max/mean",
                           "split used"], trows, align="lrlrrlrl"))
        print()

    # ------------------------------------------------------ part 2
    if "flux" in models:
        flux = models["flux"]
        flux_full = sum(tensor_sizes(flux.model).values())
        flux_params = sum(p.numel() for p in flux.model.parameters())
        parts = other_parts()["flux"]
        rest = sum(p[2] for p in parts) * 2  # bf16
        caps = [float(c) for c in args.capacity_gib.replace(",", " ").split()]
        usable = 1 - args.headroom
        frows = []
        for n in _util.int_list(args.devices):
            if n == 1:
                f = fb = 1.0
            else:
                f = rank_bytes(flux.model, flux.layout, split_sets["flux"].get(n), 1).fraction
                fb = rank_bytes(flux.model, flux.layout, split_sets["flux"].get(n, "bytes"), 1).fraction
            for cap in caps:
                budget = usable * cap * GIB
                frows.append([n, f"{cap:g} GiB", f, fb, budget / (2 * f) / 1e9, budget / (2 * fb) / 1e9,
                              budget / 2 / 1e9, "yes" if flux_full * f <= budget else "no",
                              "yes" if flux_full <= budget else "no",
                              "yes" if flux_full * f + rest <= budget else "no"])
        print("### 2. The largest denoiser that fits (weights only)\n")
        print(f"- per-rank share f(N) = max rank / full of the FLUX.1-dev transformer with the default split "
              f"(N = 1: the whole model); a larger model of the same family (same block mix, uniformly wider or "
              f"deeper) is assumed to keep f(N).  Largest = (1 - {args.headroom:g}) x device memory / "
              f"(2 bytes x f(N)) parameters in bf16; original = the whole model on every device")
        print(f"- {args.headroom:.0%} of each device's memory is kept free (CUDA context, allocator); "
              "NOT counted: activations and attention workspace, the text encoders and the VAE (see part 4), "
              "the scheduler's latents, the exchange buffers")
        print("- a '24 GB' card is taken as 24 GiB and an '80 GB' card as 80 GiB (e.g. RTX 3090/4090, A100 80GB)")
        print(f"- FLUX.1-dev: {flux_params / 1e9:.2f} B parameters, {gib(flux_full):.2f} GiB in bf16; its CLIP-L "
              f"+ T5-XXL + VAE: {gib(rest):.2f} GiB in bf16 (last column: those on every rank as well)")
        print()
        print(_util.table(["devices", "per device", "f(N) default", "f(N) bytes-balanced",
                           "largest, sharded (B params)", "largest, sharded bytes-balanced (B params)",
                           "largest, original (B params)", "FLUX.1-dev fits, sharded",
                           "FLUX.1-dev fits, original", "FLUX.1-dev + text enc. + VAE per rank fits, sharded"],
                          frows, align="rlrrrrrlll"))
        print()

    # ------------------------------------------------------ part 3
    if not args.skip_rss:
        runs = rss_runs(args)
        counted = rss_counted(runs["sharded (default)"][0]["split"])
        rrows = []
        outs = {}
        for label, results in runs.items():
            for r, res in enumerate(results):
                expect = counted[r] if label.startswith("sharded") else res["full"]
                rrows.append([label, r, gib(res["full"]), gib(expect), gib(res["real"]), gib(res["freed"]),
                              gib(res["start"]), gib(res["built"]), gib(res["attached"]), gib(res["after"]),
                              gib(res["peak"])])
            outs[label] = results[0]["out"]
            split = results[0]["split"]
        same = len(set(map(tuple, outs.values()))) == 1
        print("### 3. Measured RSS per rank: 2-rank CPU run, SD 1.5 real config\n")
        print(f"- SD 1.5 UNet at full width (real config), random weights (seed {args.seed}), fp32, "
              f"{args.rss_latent * 8}x{args.rss_latent * 8} px, {args.rss_steps} DDIM steps, guidance 7.5 (batch 2 "
              "per UNet call), tiny text encoder / VAE of `asyncdiff.testing.tiny` (prompt embeddings given, "
              "output_type=latent); AsyncDiff N=2, S=1, warm_up=1, shm transport; 2 rank processes x 1 thread "
              "started with the torchrun variables (as `end_to_end.py`)")
        print(f"- split: `{split}`")
        print("- RSS columns: /proc/self/status VmRSS after `gc.collect()` and `malloc_trim(0)`: at start "
              "(imports done), after building the pipeline (whole UNet on every rank: the model is built "
              "whole before AsyncDiff shards it), after `AsyncDiff(...)`, after the pipeline call; peak = "
              "`ru_maxrss`, which includes the whole model built before sharding")
        print("- counted GiB: what part 1's counting (`rank_bytes`) gives for this rank, on the same UNet in "
              "fp32 on the meta device with the same split (keep_weights=True: the whole UNet)")
        print("- real GiB: the denoiser's parameters and buffers not on the meta device after the call; "
              "freed GiB: `AsyncDiff.freed`, bytes moved to the meta device")
        print(f"- output of the sharded run == output of the keep_weights=True run (bit for bit): "
              f"{'yes' if same else 'NO'}")
        print()
        print(_util.table(["run", "rank", "UNet GiB", "counted GiB", "real GiB", "freed GiB", "RSS start GiB",
                           "RSS built GiB",
                           "RSS after AsyncDiff GiB", "RSS after call GiB", "peak (ru_maxrss) GiB"], rrows,
                          align="lrrrrrrrrrr"))
        print()

    # ------------------------------------------------------ part 4
    parts = other_parts()
    prows, srows = [], []
    for arch in archs:
        m = models[arch]
        full = sum(tensor_sizes(m.model).values())
        prows.append([NAMES[arch], "denoiser", type(m.model).__name__,
                      sum(p.numel() for p in m.model.parameters()) / 1e9, short_dtype(m.dtype),
                      gib(full)])
        rest = 0
        for part, cls, params, dt in parts[arch]:
            prows.append([NAMES[arch], part, cls, params / 1e9, dt, gib(params * 2)])
            rest += params * 2
        shard_cells = []
        for n in (2, 4):
            key = (arch, n, 1)
            shard_cells.append(gib(full * fractions[key]) if key in fractions else None)
        srows.append([NAMES[arch], gib(full), gib(rest), rest / full, *shard_cells])
    print("### 4. The other pipeline parts\n")
    print("- text encoders and VAEs built on the meta device from their published configurations (written out "
          "in `benchmarks/memory.py`; the shared model configs hold only the denoisers): CLIP ViT-L/14 text "
          "(hidden 768, 12 layers), OpenCLIP bigG/14 text (hidden 1280, 32 layers), T5-XXL v1.1 encoder (d_model "
          "4096, d_ff 10240, 24 layers, 64 heads, vocab 32128), AutoencoderKL (128/256/512/512, 2 layers per "
          "block); parameter counts match the released checkpoints' (e.g. T5-XXL encoder 4.76 B, CLIP-L "
          "123 M, bigG 695 M, VAE 83.7 M)")
    print("- GiB at 2 bytes per parameter (the pipeline's dtype); SDXL's VAE is often run in fp32 "
          "(fp16 overflows without the fp16-fix VAE): double its figure then")
    print()
    print(_util.table(["pipeline", "part", "class", "B params", "dtype", "GiB"], prows, align="lllrlr"))
    print()
    print(_util.table(["pipeline", "denoiser GiB", "text encoders + VAE GiB", "(text enc. + VAE) / denoiser",
                       "denoiser max rank N=2 GiB", "denoiser max rank N=4 GiB"], srows, align="lrrrrr"))
    print()
    print("### Splits used (default)\n")
    for note in split_notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
