"""Per-unit and per-component forward times on a GPU, and the speed-up they imply.

For SD 1.5 (512x512), SD 2.1 (768x768) and SDXL (1024x1024) in float16 with
random weights from the real configs, batch 2 (classifier-free guidance):

1. time every fine unit of the UNet (a resnet, an attention, a sampler, ...)
   with CUDA events recorded by forward hooks, median over ``--repeat``
   forwards after ``--warmup`` untimed ones; time the whole forward without
   hooks the same way; glue = whole forward - sum of the units (the code
   between units, which every rank runs);
2. for N = 2, 3, 4 and three splits (the paper preset, ``splits.auto`` on
   counted FLOPs, ``splits.auto`` on the measured unit times): component time
   = sum of its units + glue; exchange = the bytes each rank receives per
   the exchange plan's receives (``asyncdiff/exchange.py``) plus the result (shapes from the meta device);
3. implied time of one async step = largest component + busiest rank's
   received bytes / ``--bandwidth``; implied speed-up = whole forward / that.

Without a GPU the script says so and exits 0 (``--device cpu`` runs it on the
CPU, for a smoke test with a small ``--px``).  ``gpu_acceptance.py`` calls
:func:`measure_arch` for its timing line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

PX = {"sd15": 512, "sd21": 768, "sdxl": 1024}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sd15,sd21,sdxl", help="comma list of sd15, sd21, sdxl")
    ap.add_argument("--n", default="2,3,4", help="model_n values")
    ap.add_argument("--bandwidth", type=float, default=25.0, help="link bandwidth in GB/s (10^9 bytes/s)")
    ap.add_argument("--repeat", type=int, default=10, help="timed forwards (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed forwards first")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--px", type=int, default=None, help="image side for every model (default: 512/768/1024)")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    ap.add_argument("--per-unit", action="store_true", help="also print every fine unit's time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20, help="--e2e: denoising steps")
    ap.add_argument("--e2e", action="store_true", help=argparse.SUPPRESS)  # one rank of an end-to-end launch
    return ap.parse_args(argv)


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.torch = torch

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def time_units(c, clock: Clock, repeat: int, warmup: int) -> tuple[dict, float]:
    """({fine unit: median ms}, median ms of the whole forward without hooks)."""
    import torch

    fine = c.layout.fine_units()

    def forward():
        with torch.inference_mode():
            c.model(*c.args, **c.kwargs)

    for _ in range(warmup):
        forward()
    clock.sync()
    whole = []
    for _ in range(repeat):
        a = clock.mark()
        forward()
        b = clock.mark()
        clock.sync()
        whole.append(clock.ms(a, b))
    marks: dict[str, list] = {}
    handles = []

    def pre(name):
        def hook(_m, _a):
            marks[name] = [clock.mark()]
        return hook

    def post(name):
        def hook(_m, _a, _o):
            marks[name].append(clock.mark())
        return hook

    per_unit = {u: [] for u in fine}
    try:
        for u in fine:
            mod = c.layout.module(u, c.model)
            handles.append(mod.register_forward_pre_hook(pre(u)))
            handles.append(mod.register_forward_hook(post(u)))
        for _ in range(repeat):
            marks.clear()
            forward()
            clock.sync()
            for u in fine:
                per_unit[u].append(clock.ms(*marks[u]))
    finally:
        for h in handles:
            h.remove()
    return {u: statistics.median(v) for u, v in per_unit.items()}, statistics.median(whole)


def measure_arch(arch: str, args, clock: Clock, dtype) -> tuple[list, list, list]:
    """(top-level block rows, fine unit rows, implied-step rows) of one model,
    as main() prints them; the implied-step rows are
    [model, N, split label, component ms, max ms, busiest recv MiB, comm ms,
    step ms, implied speed-up, speed-up without comm]."""
    import torch

    import _models
    from asyncdiff import splits

    bw = args.bandwidth * 1e9
    px = args.px or PX[arch]
    c = _models.case(arch, device=args.device, dtype=dtype, batch=args.batch, px=px, seed=args.seed)
    meta = _models.case(arch, dtype=dtype, batch=args.batch, px=px)
    unit_ms, whole = time_units(c, clock, args.repeat, args.warmup)
    glue = max(whole - sum(unit_ms.values()), 0.0)
    name = f"{_models.NAMES[arch]} {px}px"
    block_rows, unit_rows, rows = [], [], []
    for top in c.layout.top:
        parts = c.layout.subs.get(top) or [top]
        block_rows.append([name, top, sum(unit_ms[p] for p in parts), 100 * sum(unit_ms[p] for p in parts) / whole])
    if args.per_unit:
        unit_rows += [[name, u, ms] for u, ms in unit_ms.items()]
    block_rows.append([name, "(glue)", glue, 100 * glue / whole])
    block_rows.append([name, "(whole forward)", whole, 100.0])
    order, flops = splits.count_costs(meta.layout, meta.model, meta.args, meta.kwargs)
    measured = [unit_ms[u] for u in order]
    for n in _util.int_list(args.n):
        choices = [("paper", _models.split_of(meta, n, "paper")),
                   ("auto (FLOPs)", splits.auto(meta.layout, n, order, flops)),
                   ("auto (measured)", splits.auto(meta.layout, n, order, measured))]
        for label, split in choices:
            comp = [sum(sum(unit_ms[p] for p in (c.layout.subs.get(u) or [u])) for u in units) + glue
                    for units in split.components]
            ex = _models.exchange(meta, split, n)
            size = {u: _models.size_of(s) for u, s in ex["units"].items()}
            result = _models.size_of(ex["result"])
            final_rank = split.owner[meta.layout.final]
            recv = [sum(size[u] for u in ex["needs"][r]) + (result if r != final_rank else 0)
                    for r in range(ex["world"])]
            comm = max(recv) / bw * 1e3
            step = max(comp) + comm
            rows.append([name, n, label, " / ".join(f"{x:.1f}" for x in comp), max(comp), max(recv) / 2**20,
                         comm, step, whole / step, whole / max(comp)])
    del c
    if clock.cuda:
        torch.cuda.empty_cache()
    return block_rows, unit_rows, rows


def _real_sd15(dev, args):
    """``timed()``: median wall time of 3 calls (after one) of a pipeline with the real
    SD 1.5 UNet (fp16, random weights) on ``dev``, 512 px, batch 2; ``timed.pipe`` is it."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from asyncdiff.testing import tiny

    small = tiny.build_pipeline("sd15", seed=args.seed)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel.from_config(tiny.real_config("sd15")).half().eval()
    pipe = StableDiffusionPipeline(vae=small.vae, text_encoder=small.text_encoder, tokenizer=small.tokenizer,
                                   unet=unet, scheduler=small.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(dev)
    pipe.set_progress_bar_config(disable=True)
    emb = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, device=dev, dtype=torch.float16)

    def call():
        pipe(prompt_embeds=emb, negative_prompt_embeds=emb, height=512, width=512, num_inference_steps=args.steps,
             guidance_scale=7.5, output_type="latent", generator=torch.Generator("cpu").manual_seed(0))
        torch.cuda.synchronize()

    def timed():
        call()
        spans = []
        for _ in range(3):
            t0 = time.perf_counter()
            call()
            spans.append(time.perf_counter() - t0)
        return statistics.median(spans)

    timed.pipe = pipe
    return timed


def in_process(args, n: int = 2) -> dict:
    """gpu_acceptance.py's devices-2gpu: the same pipeline in ONE process on cuda:0, plain, then
    AsyncDiff(model_n=n, devices=[cuda:0 .. cuda:n-1]) driven by one thread per device, then by one
    host thread for every device (ASYNCDIFF_ONE_HOST_THREAD=1): which is faster is docs/design.md §6.4's
    open question."""
    import torch

    from asyncdiff import AsyncDiff

    timed = _real_sd15(torch.device("cuda", 0), args)
    out = {}
    with torch.no_grad():
        out["plain"] = timed()
        for label, one in (("thread per device", "0"), ("one host thread", "1")):
            os.environ["ASYNCDIFF_ONE_HOST_THREAD"] = one
            ad = AsyncDiff(timed.pipe, model_n=n, stride=1, warm_up=1, devices=[f"cuda:{i}" for i in range(n)])
            try:
                out[label] = timed()
            finally:
                ad.remove()
                os.environ.pop("ASYNCDIFF_ONE_HOST_THREAD", None)
    return out


def e2e_rank(args):
    """``--e2e``, one rank of a launch over GPUs (``_util.launch``; gpu_acceptance.py's e2e-2gpu): the
    pipeline with the real SD 1.5 UNet (fp16, random weights) on cuda:LOCAL_RANK, 512 px, batch 2,
    median wall time of 3 calls after one, plain and then with AsyncDiff over NCCL (N = WORLD_SIZE)."""
    import torch

    from asyncdiff import AsyncDiff

    dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    timed = _real_sd15(dev, args)
    pipe = timed.pipe
    with torch.no_grad():
        plain = timed()
        ad = AsyncDiff(pipe, model_n=int(os.environ["WORLD_SIZE"]), stride=1, warm_up=1, transport="nccl",
                       timeout=300.0)
        try:
            asyn = timed()
        finally:
            ad.remove()
    _util.rank_result({"plain": plain, "asyncdiff": asyn})


STEP_HEADERS = ["model", "N", "split", "component ms", "max ms", "busiest recv MiB", "comm ms", "step ms",
                "implied speed-up", "without comm"]


def main(argv=None):
    args = parse_args(argv)
    if args.e2e:
        e2e_rank(args)
        return 0
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; gpu.py measures GPU forward times and needs one "
              "(use --device cpu for a smoke test).")
        return 0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    clock = Clock(args.device)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    _util.preamble(
        "GPU forward times per unit and component, and the implied AsyncDiff speed-up",
        threads=torch.get_num_threads(),
        notes=[f"device: {torch.cuda.get_device_name(0) if clock.cuda else args.device}; {args.dtype}, batch "
               f"{args.batch}, random weights (seed {args.seed}); median of {args.repeat} forwards after "
               f"{args.warmup} untimed; {'CUDA events' if clock.cuda else 'perf_counter'}",
               f"implied step = max component (units + glue) + busiest rank's received bytes / "
               f"{args.bandwidth:g} GB/s; speed-up = whole forward / implied step (stride 1, no overlap)"],
    )
    block_rows, unit_rows, rows = [], [], []
    for arch in archs:
        blocks, units, steps = measure_arch(arch, args, clock, dtype)
        block_rows += blocks
        unit_rows += units
        rows += steps
        print(f"  done: {arch}", file=sys.stderr, flush=True)
    print("Top-level blocks (sum of their fine units):\n")
    print(_util.table(["model", "block", "ms", "% of forward"], block_rows, align="llrr"))
    if unit_rows:
        print("\nFine units:\n")
        print(_util.table(["model", "unit", "ms"], unit_rows, align="llr"))
    print("\nImplied AsyncDiff step (stride 1):\n")
    print(_util.table(STEP_HEADERS, rows, align="lrllrrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
