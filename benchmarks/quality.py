"""Image quality of AsyncDiff on the trained digits model (emulation, one process).

The sequential pipeline and AsyncDiff with every (N, S, warm_up) draw the
same labels from the same seed.  For each configuration:

* PSNR (dB) of AsyncDiff's images vs the sequential images, per image, in
  [0, 1] (mean and worst image; inf = identical);
* accuracy of the shipped digit classifier on AsyncDiff's images, against
  the requested labels (the sequential images' accuracy is the first row).

Emulation gives the same images as a multi-process run (the test oracle),
so no rank processes are needed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

from asyncdiff.demo import digits  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-label", type=int, default=5, help="images per digit (x 10 labels)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--model-n", default="2,3,4", help="N values")
    ap.add_argument("--stride", default="1,2", help="S values")
    ap.add_argument("--warm-up", default="1,3,5,9", help="warm_up values")
    ap.add_argument("--time-shift", action="store_true", help="AsyncDiff time_shift=True")
    ap.add_argument("--split", default=None, help="AsyncDiff split (default: auto; the digits model has no preset)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--weights", default=None, help="digits weights folder (default: the shipped ones)")
    return ap.parse_args(argv)


def load(args):
    """(pipeline, classifier), or exit saying which weights are missing."""
    try:
        pipe = digits.load_pipeline(weights=args.weights)
        clf = digits.classifier(weights=args.weights)
    except (FileNotFoundError, OSError) as exc:
        raise SystemExit(f"quality.py needs the trained digits weights: {exc}\n"
                         "Train them with `python examples/train_digits.py` (or pass --weights DIR).")
    pipe.set_progress_bar_config(disable=True)
    return pipe, clf


def main(argv=None):
    args = parse_args(argv)
    import torch

    _util.set_threads(args.threads)
    pipe, clf = load(args)
    from asyncdiff import AsyncDiff

    labels = [d for d in range(10) for _ in range(args.per_label)]
    extra = {} if args.guidance is None else {"guidance_scale": args.guidance}

    def draw():
        return pipe(labels, num_inference_steps=args.steps, output_type="pt",
                    generator=torch.Generator().manual_seed(args.seed), **extra).images.float().cpu()

    y = torch.tensor(labels)
    _util.preamble(
        "AsyncDiff image quality on the digits model (emulation)",
        threads=args.threads,
        notes=[f"{len(labels)} images ({args.per_label} per digit), {args.steps} DDIM steps, seed {args.seed}, "
               f"guidance {args.guidance if args.guidance is not None else 'pipeline default'}, "
               f"time_shift={args.time_shift}, split={args.split or 'auto'}",
               "PSNR vs the sequential images of the same seed, per image, [0, 1] range; inf = identical; "
               "accuracy: digit classifier vs the requested labels"],
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = draw()
    ref_acc = float((clf.classify(ref) == y).float().mean())
    rows = [["sequential", "—", "—", "—", 1, math.inf, math.inf, ref_acc, 0.0, time.perf_counter() - t0]]
    splits_used = {}
    for n in _util.int_list(args.model_n):
        for s in _util.int_list(args.stride):
            for w in _util.int_list(args.warm_up):
                ad = AsyncDiff(pipe, model_n=n, stride=s, warm_up=w, time_shift=args.time_shift, split=args.split,
                               transport="emulate")
                try:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        out = draw()
                    dt = time.perf_counter() - t0
                    splits_used[n] = str(ad.split)
                finally:
                    ad.remove()
                p = digits.psnr(out, ref, per_image=True)
                acc = float((clf.classify(out) == y).float().mean())
                note = "W >= steps: sequential" if w >= args.steps else ""
                rows.append([f"AsyncDiff {note}".strip(), n, s, w, n + s - 1, float(p.mean()), float(p.min()),
                             acc, acc - ref_acc, dt])
                print(f"  done: N={n} S={s} W={w}", file=sys.stderr, flush=True)
    print(_util.table(["config", "N", "S", "warm_up", "devices", "PSNR mean dB", "PSNR min dB", "accuracy",
                       "Δ accuracy", "emulation s"], rows, align="lrrrrrrrrr"))
    print()
    for n, split in splits_used.items():
        print(f"- N={n} split: `{split}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
