"""cfg_parallel: the same devices, less staleness.

AsyncDiff's speed-up is paid for in staleness: the more components, the
further the image drifts from the sequential one.  ``cfg_parallel=True``
doubles the devices without adding components (the two halves of the
classifier-free-guidance batch are independent), so on 2 M devices
``model_n=M, cfg_parallel=True`` should be closer to the sequential image
than ``model_n=2 M`` (or a stride-2 shape of as many ranks).

For tiny SD-family pipelines (``asyncdiff.testing.tiny``: the real models'
module trees with tiny widths and random weights), in emulation (one process;
the multi-process runs give the same images, ``tests/test_cfg.py``), this
prints the relative difference ``|out - sequential| / |sequential|`` of the
output latents per configuration, mean and per seed, where sequential is the
plain pipeline with the same seed; the device count of each configuration;
and whether ``cfg_parallel=True`` gave bitwise the images of
``cfg_parallel=False`` at the same shape, with one image per prompt (halves
of 1 row) and with 4 (halves of 4 rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

# (label, model_n, stride, cfg_parallel)
CONFIGS = [("N=2", 2, 1, False), ("N=2 + cfg", 2, 1, True), ("N=4", 4, 1, False), ("N=3 S=2", 3, 2, False),
           ("N=1 + cfg", 1, 1, True), ("N=4 + cfg", 4, 1, True)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sd15,sd21,sdxl", help="tiny pipelines (comma list)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from asyncdiff import AsyncDiff
    from asyncdiff.testing import tiny

    _util.set_threads(1)
    _util.preamble("cfg_parallel: quality on the same devices", threads=1, notes=[
        f"tiny same-topology pipelines, random weights, {args.steps} steps, guidance 5.0, warm_up 1, "
        f"default split; seeds 0..{args.seeds - 1}",
        "rel. diff = |out - sequential| / |sequential| (latents), emulation"])

    def run(pipe, arch, seed, images=1, **options):
        ad = AsyncDiff(pipe, **options) if options else None
        try:
            kw = tiny.default_call_kwargs(arch, seed=seed)
            kw.update(num_inference_steps=args.steps, num_images_per_prompt=images)
            return pipe(**kw).images
        finally:
            if ad is not None:
                ad.remove()

    rows, exact = [], []
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        pipe = tiny.build_pipeline(arch, seed=0)
        seq = [run(pipe, arch, s) for s in range(args.seeds)]
        for label, n, stride, cfg in CONFIGS:
            options = dict(model_n=n, stride=stride, cfg_parallel=cfg, split="auto" if n == 1 else None)
            rel = [float((run(pipe, arch, s, **options) - seq[s]).norm() / seq[s].norm()) for s in range(args.seeds)]
            devices = (n + stride - 1) * (2 if cfg else 1)
            rows.append([arch, label, devices, f"{statistics.mean(rel):.4f}", " ".join(f"{r:.4f}" for r in rel)])
            print(f"  done: {arch} {label}", file=sys.stderr, flush=True)
        for images in (1, 4):
            same = torch.equal(run(pipe, arch, 0, images, model_n=2), run(pipe, arch, 0, images, model_n=2,
                                                                        cfg_parallel=True))
            exact.append([arch, images, "yes" if same else "no"])
    print(_util.table(["model", "config", "devices", "rel. diff (mean)", "per seed"], rows, align="llrrl"))
    print("\ncfg_parallel=True bitwise equal to cfg_parallel=False (N=2, seed 0):\n")
    print(_util.table(["model", "images per prompt (rows per half)", "bitwise equal"], exact, align="lrl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
