"""Which basis balances the components better: FLOPs or measured time?

The real SD 1.5 UNet config (random weights, fp32, CPU) at 128x128 px
(latent 16x16), batch 2 (classifier-free guidance), 77 text tokens.  Three
splits for each N:

* paper: the original AsyncDiff preset;
* auto:  ``split="auto"``, balanced on each fine unit's FLOPs
  (``splits.count_costs``, meta device);
* time:  ``split="time"``, balanced on each fine unit's measured wall time
  (``splits.count_times``, ``--threads`` intra-op threads, the fastest of
  ``--repeat`` forwards).

Every split is then judged on a second, independent timing run (same
method, run after the first: the time split is not judged on the numbers it
was chosen from).  A component's time is the sum of its fine units' times;
max/mean is the largest component over the average one (1.00 = perfect),
by FLOPs and by time; the ideal speed-up is
``L / (W + (L - W) * max component time / total unit time)`` for ``L``
steps, ``W`` warm-up steps: every rank runs every unit during warm-up, then
the slowest component sets the pace (no communication, glue code ignored).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2,3,4", help="comma list of model_n")
    ap.add_argument("--px", type=int, default=128, help="image side in pixels (latent = px / 8)")
    ap.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = classifier-free guidance)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads the units are timed with")
    ap.add_argument("--repeat", type=int, default=3, help="forwards per timing run (each unit keeps its fastest)")
    ap.add_argument("--steps", type=int, default=20, help="L of the ideal speed-up")
    ap.add_argument("--warm-up", type=int, default=1, help="W of the ideal speed-up")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def ideal(steps: int, warm: int, worst: float, total: float) -> float:
    return steps / (warm + (steps - warm) * worst / total)


def main(argv=None):
    args = parse_args(argv)
    _util.set_threads(args.threads)
    import torch

    import _models
    from asyncdiff import splits

    ns = _util.int_list(args.n)
    t0 = time.perf_counter()
    c = _models.case("sd15", device="cpu", dtype=torch.float32, batch=args.batch, px=args.px, seed=args.seed)
    built = time.perf_counter() - t0
    order, flops = splits.count_costs(c.layout, c.model, c.args, c.kwargs)
    with torch.no_grad():  # untimed: first-call allocations and kernel set-up
        c.model(*c.args, **c.kwargs)
    # run 1 decides the time split; run 2, made afresh (the cache is emptied), judges every split
    t_order, decide = splits.count_times(c.layout, c.model, c.args, c.kwargs, threads=args.threads,
                                         repeat=args.repeat)
    splits._TIMES.clear()
    e_order, judge = splits.count_times(c.layout, c.model, c.args, c.kwargs, threads=args.threads,
                                        repeat=args.repeat)
    assert t_order == order == e_order, "the timing runs and the FLOP count disagree on the order of the units"
    with torch.no_grad():
        whole = _util.measure(lambda: c.model(*c.args, **c.kwargs), repeat=args.repeat, warmup=0)["min"]
    total = sum(judge)
    print(f"  built in {built:.1f} s, measured in {time.perf_counter() - t0 - built:.1f} s", file=sys.stderr)

    _util.preamble(
        "Split basis: FLOPs (split=\"auto\") vs measured time (split=\"time\")",
        threads=args.threads,
        notes=[
            (f"SD 1.5 real config, random weights (seed {args.seed}), fp32, CPU; {c.desc}, "
             f"{_models.TEXT_TOKENS} text tokens; {len(order)} fine units"),
            f"FLOPs: splits.count_costs (meta device), {sum(flops) / 1e9:.1f} GFLOP in units per denoiser call",
            (f"time: splits.count_times, {args.threads} thread(s), fastest of {args.repeat} forwards per unit; "
             "two runs: the first decides the time split, the second (independent) gives every time below"),
            (f"plain forward (no hooks) {whole * 1e3:,.0f} ms, fastest of {args.repeat}; sum of the units' times "
             f"{total * 1e3:,.0f} ms (another run: the machine's load moves both)"),
            ("component ms: each component's time (sum of its fine units'), rank 0 first; max/mean: largest "
             "component / average; ideal speed-up: L / (W + (L - W) * max / total) with "
             f"L={args.steps}, W={args.warm_up}, glue and communication ignored"),
            "max/mean time (deciding run): the same split judged on the run that chose the time split",
        ],
    )
    rows, texts = [], []
    for n in ns:
        chosen = []
        if splits.preset(c.layout, n):
            chosen.append(("paper", splits.resolve_static(c.layout, n, "paper")))
        chosen.append(("auto (FLOPs)", splits.auto(c.layout, n, order, flops)))
        chosen.append(("time", splits.auto(c.layout, n, order, decide, source="time")))
        for name, split in chosen:
            f = splits.component_costs(c.layout, split, order, flops)
            t = splits.component_costs(c.layout, split, order, judge)
            d = splits.component_costs(c.layout, split, order, decide)
            rows.append([n, name, " / ".join(f"{x * 1e3:.0f}" for x in t), max(f) / (sum(f) / n),
                         max(t) / (sum(t) / n), max(d) / (sum(d) / n), ideal(args.steps, args.warm_up, max(t), sum(t))])
            texts.append(f"N={n} {name}: `{split}`")
    print(_util.table(["N", "split", "component ms", "max/mean FLOPs", "max/mean time",
                       "max/mean time (deciding run)", "ideal speed-up"], rows, align="llrrrrr"))
    print()
    for text in texts:
        print(f"- {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
