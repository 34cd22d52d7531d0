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
CPU, for a smoke test with a small ``--px``).
"""

from __future__ import annotations

import argparse
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


def main(argv=None):
    args = parse_args(argv)
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; gpu.py measures GPU forward times and needs one "
              "(use --device cpu for a smoke test).")
        return 0
    import _models
    from asyncdiff import splits

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    clock = Clock(args.device)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bw = args.bandwidth * 1e9
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
        px = args.px or PX[arch]
        c = _models.case(arch, device=args.device, dtype=dtype, batch=args.batch, px=px, seed=args.seed)
        meta = _models.case(arch, dtype=dtype, batch=args.batch, px=px)
        unit_ms, whole = time_units(c, clock, args.repeat, args.warmup)
        glue = max(whole - sum(unit_ms.values()), 0.0)
        name = f"{_models.NAMES[arch]} {px}px"
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
        print(f"  done: {arch}", file=sys.stderr, flush=True)
    print("Top-level blocks (sum of their fine units):\n")
    print(_util.table(["model", "block", "ms", "% of forward"], block_rows, align="llrr"))
    if unit_rows:
        print("\nFine units:\n")
        print(_util.table(["model", "unit", "ms"], unit_rows, align="llr"))
    print("\nImplied AsyncDiff step (stride 1):\n")
    print(_util.table(["model", "N", "split", "component ms", "max ms", "busiest recv MiB", "comm ms",
                       "step ms", "implied speed-up", "without comm"], rows, align="lrllrrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
