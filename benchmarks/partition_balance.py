"""Load balance of the automatic split vs the paper presets, in FLOPs.

For each model at real size on the meta device (shapes only, nothing
computed), ``splits.count_costs`` counts the FLOPs of every fine unit (a
resnet, an attention, a downsampler, a transformer block, ...) for one
denoiser call with representative inputs (batch 2 = classifier-free guidance).
The cost of a component is the sum of its units' FLOPs (a unit that is a whole
block counts all its fine parts).  For each N:

* max/mean = the largest component over the average one (1.00 = perfect);
* ideal speed-up = total / max: what N devices could give if only the
  slowest component mattered (no communication, glue code ignored).

The automatic split is ``splits.auto`` (optimal contiguous split of the fine
units); the paper presets exist for N = 2, 3, 4.  Glue = the FLOPs of the
code between units (time embedding, ...), which every rank runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

ARCHS = "sd15,sd21,sdxl,svd,upscaler,sd3"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=ARCHS, help=f"comma list of {ARCHS}")
    ap.add_argument("--max-n", type=int, default=8, help="largest N for the automatic split")
    ap.add_argument("--svd-frames", type=int, default=25,
                    help="SVD frames at 576x1024 (25: SVD-XT, whose config ships here; 14: SVD)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--show-splits", action="store_true", help="print the automatic splits")
    return ap.parse_args(argv)


def whole_forward_flops(c) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        c.model(*c.args, **c.kwargs)
    return float(counter.get_total_flops())


def main(argv=None):
    args = parse_args(argv)
    import _models
    from asyncdiff import splits

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    _util.preamble(
        "Partition balance (FLOPs): automatic split vs paper preset",
        threads=None,
        notes=["meta device, fp16, FLOPs by torch.utils.flop_counter through splits.count_costs; "
               "GFLOP = 10^9 FLOPs per denoiser call",
               "max/mean: largest component / average component; ideal speed-up: total unit FLOPs / largest "
               "component; — where the paper has no preset"],
    )
    rows, split_notes, inputs_notes = [], [], []
    for arch in archs:
        c = _models.case(arch, batch=args.batch, frames=args.svd_frames)
        order, costs = splits.count_costs(c.layout, c.model, c.args, c.kwargs)
        total = sum(costs)
        forward = whole_forward_flops(c)
        glue = max(forward - total, 0.0)
        inputs_notes.append(f"{_models.NAMES[arch]}: {c.desc}; {total / 1e9:,.0f} GFLOP in units, glue "
                            f"{100 * glue / forward:.2f} % of the forward; {len(order)} fine units")
        for n in range(2, args.max_n + 1):
            if n > len(order):
                break
            auto = splits.auto(c.layout, n, order, costs)
            a = splits.component_costs(c.layout, auto, order, costs)
            row = [_models.NAMES[arch], n]
            text = splits.preset(c.layout, n)
            if text:
                p = splits.component_costs(c.layout, splits.resolve_static(c.layout, n, "paper"), order, costs)
                row += [max(p) / (sum(p) / n), total / max(p)]
            else:
                row += [None, None]
            row += [max(a) / (sum(a) / n), total / max(a), total / n / 1e9, max(a) / 1e9]
            rows.append(row)
            split_notes.append(f"{_models.NAMES[arch]} N={n} auto: `{auto}`")
        print(f"  done: {arch}", file=sys.stderr, flush=True)
    print("Inputs per denoiser call:\n")
    for note in inputs_notes:
        print(f"- {note}")
    print()
    print(_util.table(["model", "N", "paper max/mean", "paper ideal speed-up", "auto max/mean",
                       "auto ideal speed-up", "mean GFLOP", "auto max GFLOP"], rows, align="lrrrrrrr"))
    if args.show_splits:
        print()
        for note in split_notes:
            print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
