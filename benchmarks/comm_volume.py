"""Bytes moved per asynchronous step: AsyncDiff's targeted exchange vs the original broadcast.

For SD 1.5 (512x512), SD 2.1 (768x768) and SDXL (1024x1024), float16,
batch 2 (classifier-free guidance), stride 1, the paper preset for each N:

* ours = for every rank, the outputs of the units it receives per
  ``ExchangePlan.receives`` (``asyncdiff/exchange.py``: the units whose outputs reach the blocks it computes),
  plus the denoiser output sent by the last rank to every other rank;
* original = every unit's output broadcast to every other rank
  (sum of all unit outputs x (world - 1)), as the original code does;
* fallback = what the rank step moves when the exchange plan cannot trace
  the model (``ExchangePlan.everything``: every unit a rank does not own,
  plus the result).

Everything runs on the meta device: the real-size UNet and its inputs have
shapes and dtypes but no storage, so nothing is computed or allocated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sd15,sd21,sdxl", help="comma list of sd15, sd21, sdxl")
    ap.add_argument("--n", default="2,3,4", help="model_n values")
    ap.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = one prompt with guidance)")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--steps", type=int, default=50, help="steps per image, for the per-image totals")
    ap.add_argument("--warm-up", type=int, default=1, help="warm-up steps (no exchange), for the per-image totals")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    import _models

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    mib = 2.0 ** -20
    events = max(args.steps - args.warm_up, 0)
    _util.preamble(
        "Communication volume per asynchronous step (stride 1): ours vs the original broadcast",
        threads=None,
        notes=[f"{args.dtype}, batch {args.batch}, paper presets, meta device (shapes only)",
               "MiB = 2^20 bytes, summed over all receiving ranks; busiest = the rank receiving the most; "
               f"per image = x {events} async steps ({args.steps} steps, warm_up {args.warm_up})"],
    )
    rows, notes = [], []
    for arch in archs:
        c = _models.case(arch, dtype=dtype, batch=args.batch)
        for n in _util.int_list(args.n):
            split = _models.split_of(c, n, "paper")
            ex = _models.exchange(c, split, n)
            size = {u: _models.size_of(shapes) for u, shapes in ex["units"].items()}
            result = _models.size_of(ex["result"])
            world = ex["world"]
            per_rank = {r: sum(size[u] for u in ex["needs"][r]) + (result if r != n - 1 else 0)
                        for r in range(world)}
            ours = sum(per_rank.values())
            original = sum(size.values()) * (world - 1)
            fallback = sum(size[u] for r in range(world) for u in ex["everything"][r]) + result * (world - 1)
            rows.append([_models.NAMES[arch], c.desc.split(" (")[0], n, len(split.owner), ours * mib,
                         max(per_rank.values()) * mib, original * mib, fallback * mib, original / ours,
                         ours * events / 2**30, original * events / 2**30,
                         "NO (fell back)" if ex["fell_back"] else "yes"])
            recv = "; ".join(f"r{r}: {' '.join(ex['needs'][r]) or '-'}" for r in range(world))
            notes.append(f"{_models.NAMES[arch]} N={n}: {recv}; result from r{split.owner[c.layout.final]}")
            print(f"  done: {arch} N={n}", file=sys.stderr, flush=True)
    print(_util.table(["model", "size", "N", "units", "ours MiB", "busiest MiB", "original MiB", "fallback MiB",
                       "original/ours", "ours GiB/image", "original GiB/image", "fp16 trace ok"], rows,
                      align="llrrrrrrrrrl"))
    print("\nUnits each rank receives (ours):\n")
    for note in notes:
        print(f"- {note}")
    if any(r[-1] != "yes" for r in rows):
        print("\nfp16 trace ok = NO: the exchange plan could not trace the model on these fp16 inputs and would "
              "send the fallback volume; the 'ours' columns use its answer for the same inputs in float32 "
              "(dependencies do not depend on the dtype).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
